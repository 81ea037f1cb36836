"""A data-free start for SiD (``DistillConfig.g_init``): fit G to the teacher's own sampler before distilling.

For a teacher without weights to copy (or a random start far from any mode), using the teacher alone: (1) run EDM's
Heun sampler (``heun_steps``) from ``pairs`` latents z (and labels) to samples x0(z); (2) regress ``G(init_sigma z)
-> x0(z)`` with Adam (``steps`` steps of ``batch`` pairs at ``lr``); (3) pre-fit the fake score (from the teacher's
weights, or from G for a teacher without weights) with ``fake_steps`` steps of its EDM loss at the config's ``lr``.
Draws come from ``derive_seed(seed, G_INIT_STREAM, part)``. With ``cache_dir`` the result is stored as
``g-init-<digest>.pt`` under a digest of everything it depends on, for runs that share it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..io.atomic import atomic_path
from ..rng import G_INIT_STREAM, derive_seed, randn, random_labels
from ..sampling import edm_sigmas, generate_onestep, heun_sampler

__all__ = ['run_g_init']


def _cache_file(cfg, settings: dict, nets) -> Path:
    # The teacher by its weights where they are known, so a moved checkout finds its starts again.
    teacher = {k: v for k, v in nets.provenance.items() if k != 'source' or 'sha256' not in nets.provenance}
    key = {'teacher': teacher, 'student': nets.G.init_kwargs, 'fake': nets.fake.init_kwargs,
           'settings': {k: v for k, v in settings.items() if k != 'cache_dir'},
           **{k: getattr(cfg, k) for k in ('seed', 'init_sigma', 'lr', 'batch', 'augment_p', 'precision')},
           'adam_eps': cfg.resolved_adam_eps()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(settings['cache_dir']) / f'g-init-{digest}.pt'


def run_g_init(cfg, settings: dict, nets, sid_loss, device) -> dict:
    """Steps 1-3 for ``nets.G`` and ``nets.fake`` in place, or their cached result; returns a summary for the log."""
    cache = _cache_file(cfg, settings, nets) if settings.get('cache_dir') else None
    if cache is not None and cache.is_file():
        state = torch.load(cache, map_location='cpu', weights_only=True)
        nets.G.load_state_dict(state['G'])
        nets.fake.load_state_dict(state['fake'])
        return {**state['record'], 'g_init_cached': True}
    t0 = time.perf_counter()
    G, fake, teacher = nets.G, nets.fake, nets.teacher
    shape = [int(G.img_channels), int(G.img_resolution), int(G.img_resolution)]
    label_dim = int(getattr(teacher, 'label_dim', 0) or 0)

    # (1) Heun samples x0 of the teacher from latents z.
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, G_INIT_STREAM, 0))
    n, chunk = int(settings['pairs']), 4096
    z = randn(n, shape, gen, dtype=torch.float64)
    labels = random_labels(n, label_dim, gen)
    sigmas = edm_sigmas(int(settings['heun_steps']))
    with torch.no_grad():
        x0 = torch.cat([heun_sampler(teacher, (z[i:i + chunk] * sigmas[0]).to(device), sigmas,
                                     class_labels=None if labels is None else labels[i:i + chunk].to(device))[0].float()
                        for i in range(0, n, chunk)])
    z, labels = z.float().to(device), (None if labels is None else labels.to(device))

    # (2) Adam on mean ||G(init_sigma z) - x0||^2 over random minibatches.
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, G_INIT_STREAM, 1))
    torch.manual_seed(derive_seed(cfg.seed, G_INIT_STREAM, 1))  # dropout
    opt = torch.optim.Adam(G.parameters(), lr=settings['lr'])
    G.train().requires_grad_(True)
    mse = torch.zeros(())
    for _ in range(int(settings['steps'])):
        idx = torch.randint(n, [int(settings['batch'])], generator=gen).to(device)
        out = generate_onestep(G, z[idx], cfg.init_sigma, None if labels is None else labels[idx])
        mse = (out - x0[idx]).square().flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        mse.backward()
        opt.step()
    G.eval()

    # (3) The fake score's EDM loss on samples of G, per kept sample.
    if nets.provenance.get('kind') == 'in-process':
        fake.load_state_dict(G.state_dict())  # no teacher weights to start from: the fake score starts as G
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, G_INIT_STREAM, 2))
    opt = torch.optim.Adam(fake.parameters(), lr=cfg.lr, betas=(0.0, 0.999), eps=cfg.resolved_adam_eps())
    fake.train().requires_grad_(True)
    fake_loss = torch.zeros(())
    for _ in range(int(settings['fake_steps'])):
        c = random_labels(cfg.batch, label_dim, gen, device=device)
        with torch.no_grad():
            x_g = generate_onestep(G, randn(cfg.batch, shape, gen, device=device), cfg.init_sigma, c)
        per_elem, keep = sid_loss.fake_score_loss(fake, x_g, c, generator=gen)
        fake_loss = per_elem.sum() / max(int(keep.sum()), 1)
        opt.zero_grad(set_to_none=True)
        fake_loss.backward()
        opt.step()
    fake.eval().requires_grad_(False)

    record = {'g_init_mse': float(mse.detach()), 'g_init_fake_loss': float(fake_loss.detach()),
              'g_init_seconds': time.perf_counter() - t0}
    if cache is not None:
        with atomic_path(cache) as tmp:
            torch.save({'G': G.state_dict(), 'fake': fake.state_dict(), 'record': record}, tmp)
    return record
