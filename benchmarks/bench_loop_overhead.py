"""Overhead of the SiD loop: its time per iteration over a minimal reference loop with the same networks and math.

The reference loop does only what one SiD iteration must do: draw labels, latents, sigma and noise from one
generator, the fake-score step (G forward without a graph, EDM loss, backward, Adam), the generator step (G forward,
teacher and fake-score forwards, SiD loss, backward, Adam) and the EMA update. The real loop
(:func:`sidlib.distill.distill`) adds its random streams, NaN guards, statistics and bookkeeping; it is timed from its
own log over every iteration but the first (ticks and snapshots are disabled). Both run on one thread.

Usage::

    python benchmarks/bench_loop_overhead.py                  # toy2d and digits, 300 / 40 iterations
    python benchmarks/bench_loop_overhead.py --bench toy2d --iters 500 --rng per_sample

Prints one line per benchmark with both times and their ratio (target <= 1.15).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _setup(bench: str):
    """(teacher, student kwargs or None, batch): the networks of the embedded benchmark at its batch size."""
    from sidlib.networks import EDMPrecond
    if bench == "toy2d":
        from experiments.toy2d.mixture import MixtureDenoiser
        student = dict(img_resolution=1, img_channels=2, label_dim=0, model_type="MLPNet", model_channels=128,
                       num_layers=3)
        return MixtureDenoiser(8, 1.0, 0.1), student, 64
    from experiments.common.params import load_params
    from experiments.digits.bench import teacher_config
    torch.manual_seed(0)
    net = EDMPrecond(**teacher_config(load_params(smoke=False)["digits"], "cond").network_kwargs())
    return net, None, 64


def reference_loop(teacher, G, fake, batch: int, iters: int, alpha=1.2, tmax=800.0, init_sigma=2.5) -> float:
    """Seconds per iteration of the minimal loop (the first iteration excluded)."""
    from sidlib.ema import update_ema
    from sidlib.losses import EDMLoss, sample_sid_sigma, sid_generator_loss
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-4, betas=(0.0, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.999))
    teacher.eval().requires_grad_(False)
    edm = EDMLoss()
    shape = [batch, int(G.img_channels), int(G.img_resolution), int(G.img_resolution)]
    label_dim = int(getattr(teacher, "label_dim", 0) or 0)
    gen = torch.Generator().manual_seed(0)
    sig_g = torch.full([batch, 1, 1, 1], init_sigma)

    def labels():
        if not label_dim:
            return None
        return torch.nn.functional.one_hot(torch.randint(label_dim, [batch], generator=gen), label_dim).float()

    t0 = None
    for it in range(iters + 1):
        if it == 1:
            t0 = time.perf_counter()
        G.eval()
        fake.train().requires_grad_(True)
        c = labels()
        with torch.no_grad():
            x_g = G(torch.randn(shape, generator=gen) * init_sigma, sig_g, c)
        sigma = edm.sample_sigma(batch, gen)
        loss = edm(fake, x_g, c, sigma=sigma, noise=torch.randn(shape, generator=gen))
        opt_f.zero_grad(set_to_none=True)
        loss.sum().div(batch).backward()
        opt_f.step()
        fake.eval().requires_grad_(False)
        G.train().requires_grad_(True)
        c = labels()
        x_g = G(torch.randn(shape, generator=gen) * init_sigma, sig_g, c)
        sigma = sample_sid_sigma(batch, tmax, generator=gen)
        x_t = x_g + sigma * torch.randn(shape, generator=gen)
        loss = sid_generator_loss(x_g, teacher(x_t, sigma, c), fake(x_t, sigma, c), alpha)
        opt_g.zero_grad(set_to_none=True)
        loss.sum().mul(100 / batch).backward()
        opt_g.step()
        update_ema(G_ema, G, 0.99)
    return (time.perf_counter() - t0) / iters


def sid_loop(bench: str, iters: int, rng: str) -> float:
    """Seconds per iteration of :func:`sidlib.distill.distill` over every iteration but the first."""
    from sidlib.distill import distill, register_teacher
    from sidlib.io.checkpoints import save_network
    from sidlib.io.logs import read_jsonl
    teacher, student, batch = _setup(bench)
    with tempfile.TemporaryDirectory() as tmp:
        if student is None:
            source = str(save_network(Path(tmp) / "teacher", teacher))
            extra = {}
        else:
            register_teacher("bench-teacher", lambda: teacher)
            source, extra = "bench-teacher", {"student": student}
        cfg = dict(teacher=source, batch=batch, iterations=iters + 1, lr=1e-4, glr=1e-4, tick_kimg=1e9, snap_ticks=0,
                   state_ticks=0, grid_size=0, progress=False, num_threads=1, rng=rng, ema_halflife_kimg=1.0, **extra)
        run = distill(cfg, run_dir=Path(tmp) / "run")
        last = read_jsonl(run / "log.jsonl")[-1]
        return last["sec_per_iter"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", choices=("toy2d", "digits"), action="append")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 300 toy2d, 40 digits)")
    p.add_argument("--rng", default="per_batch", help="the loop's random-stream scheme")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for bench in args.bench or ["toy2d", "digits"]:
        iters = args.iters or (300 if bench == "toy2d" else 40)
        sid = sid_loop(bench, iters, args.rng)
        teacher, student, batch = _setup(bench)
        if student is None:
            G = copy.deepcopy(teacher)
        else:
            from sidlib.networks import build_network
            torch.manual_seed(0)
            G = build_network("EDMPrecond", student)
        ref = reference_loop(teacher, G, copy.deepcopy(G), batch, iters)
        print(f"{bench}: SiD loop {sid * 1e3:.1f} ms/iteration (rng={args.rng}), minimal reference loop "
              f"{ref * 1e3:.1f} ms/iteration, ratio {sid / ref:.3f} (target <= 1.15)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
