"""Train a small EDM teacher (EDMPrecond + SongUNet, EDM loss) on an in-memory image set, resumably.

Used by the digits benchmark: the teacher SiD distils is trained inside the pipeline. The run directory holds

* ``training-state.pt``: network, EMA, optimiser, iteration and RNG (atomic, written every ``checkpoint_every``
  iterations), so an interrupted run resumes where it stopped and loses at most ``checkpoint_every`` iterations;
* ``log.jsonl``: one record per ``log_every`` iterations (iteration, images seen, loss, learning rate, seconds);
* ``network.safetensors`` + ``network.json``: the EMA teacher written by :func:`sidlib.io.checkpoints.save_network`
  when training is complete (its presence with the full iteration count marks the run as done).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sidlib.ema import ema_beta, update_ema
from sidlib.io.checkpoints import save_network
from sidlib.io.logs import JsonlLogger
from sidlib.io.training_state import capture_rng, load_training_state, restore_rng, save_training_state
from sidlib.losses import EDMLoss
from sidlib.networks import EDMPrecond, edm_kwargs

__all__ = ["TeacherConfig", "build_teacher", "train_teacher", "teacher_is_complete"]


@dataclass
class TeacherConfig:
    """Everything that defines a teacher run. Units: iterations, images per batch, kimg for the EMA half-life."""

    label_dim: int = 0
    img_resolution: int = 8
    img_channels: int = 1
    model_channels: int = 32
    channel_mult: list = field(default_factory=lambda: [1, 2])
    num_blocks: int = 2
    attn_resolutions: list = field(default_factory=lambda: [4])
    dropout: float = 0.1
    iterations: int = 1500
    batch: int = 128
    lr: float = 2e-3
    warmup_iterations: int = 200
    ema_halflife_kimg: float = 10.0
    ema_rampup: float = 0.1
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 25

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "teacher") -> "TeacherConfig":
        """Build from a params.yaml mapping; unknown keys raise ValueError naming ``where.key``."""
        from .params import ParamsError

        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ParamsError(f"unknown key(s) {', '.join(where + '.' + k for k in unknown)}; "
                              f"expected some of {sorted(known)}")
        return cls(**d)

    def validate(self, where: str = "teacher") -> None:
        """Raise :class:`ParamsError` naming ``where.key`` for a value the network or the loop cannot use."""
        from .params import ParamsError, check_list, check_number

        for k in ("img_resolution", "img_channels", "model_channels", "num_blocks", "iterations", "batch",
                  "checkpoint_every", "log_every"):
            check_number(getattr(self, k), f"{where}.{k}", integer=True, low=1, high=1_000_000)
        for k in ("warmup_iterations", "seed", "label_dim"):
            check_number(getattr(self, k), f"{where}.{k}", integer=True, low=0)
        check_number(self.lr, f"{where}.lr", low=0, low_open=True, high=1.0)
        check_number(self.ema_halflife_kimg, f"{where}.ema_halflife_kimg", low=0)
        check_number(self.ema_rampup, f"{where}.ema_rampup", low=0, low_open=True)
        check_number(self.dropout, f"{where}.dropout", low=0, high=0.99)
        mult = check_list(self.channel_mult, f"{where}.channel_mult", unique=False)
        for i, m in enumerate(mult):
            check_number(m, f"{where}.channel_mult[{i}]", integer=True, low=1, high=64)
        # The U-Net halves the resolution between levels: every level needs at least a 1x1 image.
        if self.img_resolution >> (len(mult) - 1) < 1 or self.img_resolution % (1 << (len(mult) - 1)):
            raise ParamsError(f"{where}.channel_mult has {len(mult)} levels, too many for "
                              f"{self.img_resolution}x{self.img_resolution} images (each level halves the size)")
        levels = [self.img_resolution >> i for i in range(len(mult))]
        for r in self.attn_resolutions:
            if r not in levels:
                raise ParamsError(f"{where}.attn_resolutions lists {r}; the U-Net's resolutions are {levels}")

    def network_kwargs(self) -> dict:
        """EDMPrecond constructor kwargs (SongUNet in its DDPM++ configuration, scaled down)."""
        return edm_kwargs("ddpmpp", img_resolution=self.img_resolution, img_channels=self.img_channels,
                          label_dim=self.label_dim, channel_mult=self.channel_mult, model_channels=self.model_channels,
                          num_blocks=self.num_blocks, attn_resolutions=list(self.attn_resolutions),
                          dropout=self.dropout)


def build_teacher(cfg: TeacherConfig) -> torch.nn.Module:
    """A freshly initialised teacher (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    return EDMPrecond(**cfg.network_kwargs())


def teacher_is_complete(run_dir: str | Path, cfg: TeacherConfig | None = None) -> bool:
    """True when ``run_dir/network.json`` exists and records the requested number of iterations."""
    meta_path = Path(run_dir) / "network.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text()).get("meta", {})
    return cfg is None or (meta.get("iterations") == cfg.iterations and meta.get("config") == asdict(cfg))


def _lr(cfg: TeacherConfig, it: int) -> float:
    return cfg.lr * min(1.0, (it + 1) / max(cfg.warmup_iterations, 1))


def train_teacher(cfg: TeacherConfig, run_dir: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None,
                  *, num_classes: int = 10, max_seconds: float | None = None, progress=None) -> Path:
    """Train (or resume, or skip if complete) a teacher on ``images`` ``[N, C, H, W]`` in [-1, 1].

    labels: ``[N]`` int class indices (needed when ``cfg.label_dim > 0``).
    max_seconds: stop early (after a checkpoint) when exceeded; a later call resumes. None = no limit.
    progress: optional callable(record dict) called at every log record.
    Returns the path of ``network.safetensors``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if teacher_is_complete(run_dir, cfg):
        return run_dir / "network.safetensors"
    if cfg.label_dim and labels is None:
        raise ValueError("teacher.label_dim > 0 needs class labels")
    (run_dir / "teacher_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    net = build_teacher(cfg).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = EDMLoss(sigma_data=net.sigma_data)
    log = JsonlLogger(run_dir / "log.jsonl")
    state_path = run_dir / "training-state.pt"
    it, seconds = 0, 0.0
    torch.manual_seed(cfg.seed + 1)
    if state_path.is_file():
        st = load_training_state(state_path)
        if st.get("config") != asdict(cfg):
            raise ValueError(f"{state_path} was written with a different teacher config; "
                             f"delete {run_dir} to start over")
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        it, seconds = int(st["iteration"]), float(st["seconds"])
        restore_rng(st["rng"])
    log.truncate_after(it)

    def checkpoint():
        save_training_state(state_path, {"config": asdict(cfg), "net": net.state_dict(), "ema": ema.state_dict(),
                                         "opt": opt.state_dict(), "iteration": it, "seconds": seconds,
                                         "rng": capture_rng()})

    onehot = None
    if cfg.label_dim:
        onehot = torch.eye(num_classes)[labels]
    n = len(images)
    t_start = time.perf_counter()
    t_last = t_start
    while it < cfg.iterations:
        idx = torch.randint(n, (cfg.batch,))
        y = images[idx]
        c = onehot[idx] if onehot is not None else None
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, it)
        loss = loss_fn(net, y, c).sum() / cfg.batch  # EDM: sum over pixels, mean over the batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        opt.step()
        update_ema(ema, net, ema_beta(cfg.batch, it * cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup))
        it += 1
        now = time.perf_counter()
        seconds += now - t_last
        t_last = now
        if it % cfg.log_every == 0 or it == cfg.iterations:
            rec = {"iteration": it, "kimg": it * cfg.batch / 1000, "loss": float(loss.item()), "lr": _lr(cfg, it - 1),
                   "seconds": round(seconds, 3)}
            log.log(rec)
            if progress is not None:
                progress(rec)
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            checkpoint()
            if max_seconds is not None and now - t_start > max_seconds and it < cfg.iterations:
                return state_path
    params = sum(p.numel() for p in ema.parameters())
    save_network(run_dir / "network", ema, meta={"iterations": it, "kimg": it * cfg.batch / 1000, "seconds": seconds,
                                                  "parameters": params, "config": asdict(cfg),
                                                  "provenance": "sidlib.teacher_training (EDM loss)"})
    return run_dir / "network.safetensors"
