"""The paper's FID protocol (EDM's ``fid.py``, SiD's ``sid_metrics.py``), computed through torch-fidelity.

* 50,000 generated images; trial ``t`` uses seeds ``seed_start + t*N ... seed_start + (t+1)*N - 1`` (EDM's seed
  ranges). Latents and labels come from one generator per seed (:func:`sidlib.rng.latents_for_seeds`,
  :func:`sidlib.rng.labels_for_seeds`), so the images depend neither on the batch size nor on the number of
  processes. Conditional models get one-hot labels per seed, uniform unless class frequencies are given.
* Images are quantised as EDM and SiD save them: ``uint8(clip(x * 127.5 + 128, 0, 255))``.
* Features: torch-fidelity's TF-compatible Inception-v3 (``inception-v3-compat``), 2048-d pool features; mean and
  unbiased covariance are compared with EDM's reference ``.npz`` through ``fid_statistics_to_metric``.
* Inception Score (10 splits) for CIFAR-10 unconditional; improved precision/recall (k = 3) for ImageNet-64 against
  OpenAI's reference batch.
* Trials are summarised as mean +- std (ddof 1), best, and EDM's min-of-3 (the first three trials).
* Under ``torchrun`` rank ``r`` generates seeds ``r, r+W, ...`` of each range; features are all-gathered and put
  back in seed order, so the statistics equal a single-process run.
* Any image count other than 50,000 is a proxy, and every key it produces says so (``fid10k_proxy``, ...).

The generator is any ``generator_fn(z, labels) -> images in [-1, 1]`` (z: standard-normal latents ``[n, C, H, W]``
float64, labels one-hot ``[n, label_dim]`` or None); :func:`onestep_generator` (SiD students) and
:func:`heun_generator` (EDM teachers at a given NFE) build one from a network. A function that accepts a ``seeds``
keyword also receives the batch's seeds (the stochastic Heun sampler draws its churn noise from them).
Command line: ``python -m sidlib.metrics calc`` (see :mod:`sidlib.metrics.__main__`).
"""

from __future__ import annotations

import inspect
import math
import platform
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import distributed as dist_utils
from ..io.checkpoints import load_checkpoint
from ..io.jsonio import to_jsonable
from ..rng import churn_generators, labels_for_seeds, latents_for_seeds
from ..sampling import edm_sigmas, generate_onestep, heun_sampler, to_uint8
from . import fidelity as M
from .references import fetch_reference, load_reference_images, load_reference_stats

__all__ = [
    "PAPER_NUM_IMAGES", "FORMAT", "ProtocolError", "metric_names", "trial_seeds", "rank_seeds", "onestep_generator",
    "heun_generator", "generate_features", "evaluate_generator", "evaluate_network", "summarise_trials",
    "proxy_fid",
]

#: The paper's number of generated images per FID evaluation.
PAPER_NUM_IMAGES = 50_000
FORMAT = "sidlib-fid-protocol/1"
QUANTISATION = "uint8(clip(x * 127.5 + 128, 0, 255))"

class ProtocolError(ValueError):
    """Invalid protocol arguments or inputs (raised before any image is generated)."""


# ---------------------------------------------------------------------------------------------------------------------
# Names, seeds.

def _count(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def metric_names(num_images: int, proxy: bool | None = None) -> dict:
    """Key names for an evaluation on ``num_images`` images: ``{'fid', 'is', 'pr'}``.

    50,000 images give SiD's names ``fid50k``, ``is50k``, ``pr50k3`` (precision/recall, k=3); anything else is a
    proxy and every name ends in ``_proxy`` (``fid10k_proxy``, ``pr10k3_proxy``; ``fid24_proxy``, ``pr24_k3_proxy``). ``proxy=True`` marks even a 50k run as a proxy; ``proxy=False`` with another
    count is refused.
    """
    if num_images < 2:
        raise ProtocolError(f"num_images must be >= 2, got {num_images}")
    is_proxy = num_images != PAPER_NUM_IMAGES if proxy is None else bool(proxy)
    if proxy is False and num_images != PAPER_NUM_IMAGES:
        raise ProtocolError(f"{num_images} images is not the paper protocol ({PAPER_NUM_IMAGES}); it must be "
                            f"labelled a proxy")
    suffix = "_proxy" if is_proxy else ""
    c = _count(num_images)
    # SiD writes "pr50k3" (k = 3 neighbours); a bare count gets a separator so "pr24_k3" is not read as 243.
    pr = f"pr{c}3" if c.endswith("k") else f"pr{c}_k3"
    return {"fid": f"fid{c}{suffix}", "is": f"is{c}{suffix}", "pr": f"{pr}{suffix}", "proxy": is_proxy}


def trial_seeds(trial: int, num_images: int, seed_start: int = 0) -> range:
    """Seeds of trial ``trial``: ``seed_start + trial*num_images`` ... ``+ num_images - 1``."""
    first = seed_start + trial * num_images
    return range(first, first + num_images)


def rank_seeds(seeds: Sequence[int], rank: int, world_size: int) -> Sequence[int]:
    """The seeds process ``rank`` of ``world_size`` generates: every ``world_size``-th, starting at ``rank``."""
    if not 0 <= rank < world_size:
        raise ProtocolError(f"rank {rank} outside world size {world_size}")
    return seeds[rank::world_size]


# ---------------------------------------------------------------------------------------------------------------------
# Generators.

def onestep_generator(G: torch.nn.Module, init_sigma: float = 2.5) -> Callable:
    """SiD one-step sampling ``G(init_sigma * z, init_sigma, labels)`` as a ``generator_fn``."""
    def fn(z, labels):
        return generate_onestep(G, z.to(torch.float32), init_sigma, labels)
    fn.nfe = 1
    fn.description = {"kind": "onestep", "init_sigma": float(init_sigma), "nfe": 1}
    return fn


def heun_generator(net: torch.nn.Module, num_steps: int = 18, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                   S_noise: float = 1.0) -> Callable:
    """EDM's Heun sampler with ``num_steps`` steps (NFE = 2*num_steps - 1) as a ``generator_fn``.

    Integration runs in float64 from ``z * sigma_max`` as in EDM; the churn noise of the stochastic variant
    (S_churn > 0) is drawn from per-seed generators, so it is independent of the world size too.
    """
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)

    def fn(z, labels, seeds=None):
        gens = None
        if S_churn > 0:
            if seeds is None:
                raise ProtocolError("the stochastic Heun sampler needs the batch's seeds")
            gens = churn_generators(seeds)
        x, _ = heun_sampler(net, z.to(torch.float64) * float(sigmas[0]), sigmas.to(z.device), class_labels=labels,
                            S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, generator=gens)
        return x
    fn.nfe = 2 * num_steps - 1
    fn.description = {"kind": "heun", "steps": int(num_steps), "nfe": 2 * num_steps - 1, "S_churn": S_churn,
                      "S_min": S_min, "S_max": S_max if math.isfinite(S_max) else None, "S_noise": S_noise}
    return fn


def _accepts_seeds(fn) -> bool:
    try:
        return "seeds" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Distributed helpers.

def _distributed(flag: bool | None) -> bool:
    active = dist_utils.is_initialized() and dist.get_world_size() > 1
    return active if flag is None else bool(flag) and active


def _gather_rows(local: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """All-gather ``local`` rows ``[n_r, D]`` with their global positions ``index`` ``[n_r]``; returns ``[total, D]``
    in position order (identical on every rank)."""
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    world = dist.get_world_size()
    # A rank with no rows (fewer seeds than processes) learns the feature width from the others.
    dim_t = torch.tensor([local.shape[1] if local.numel() else 0], device=device)
    dist.all_reduce(dim_t, op=dist.ReduceOp.MAX)
    dim = int(dim_t.item())
    local = local.reshape(-1, dim) if local.numel() else torch.zeros([0, dim], dtype=torch.float32)
    n = torch.tensor([local.shape[0]], device=device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    width = max(int(max(c.item() for c in counts)), 1)
    pad = torch.zeros([width, dim], dtype=local.dtype, device=device)
    pad[:local.shape[0]] = local.to(device)
    ipad = torch.full([width], -1, dtype=torch.long, device=device)
    ipad[:local.shape[0]] = index.to(device)
    rows = [torch.empty_like(pad) for _ in range(world)]
    idx = [torch.empty_like(ipad) for _ in range(world)]
    dist.all_gather(rows, pad)
    dist.all_gather(idx, ipad)
    out = torch.empty([total, dim], dtype=local.dtype)
    seen = torch.zeros([total], dtype=torch.bool)
    for r, i, c in zip(rows, idx, counts):
        c = int(c.item())
        ii = i[:c].cpu()
        out[ii] = r[:c].cpu()
        seen[ii] = True
    if not bool(seen.all()):
        raise RuntimeError("feature gathering lost rows: ranks disagree on the seed split")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Feature extraction of generated images.

@torch.no_grad()
def generate_features(generator_fn: Callable, seeds: Sequence[int], extractor: M.FeatureExtractor, *,
                      img_shape: Sequence[int], label_dim: int = 0, batch_size: int = 64, device=None,
                      distributed: bool | None = None, progress: bool = False) -> dict:
    """Generate the images of ``seeds`` and return their features ``{metric: float32 [len(seeds), D]}`` in seed order.

    Under an initialised process group (and ``distributed`` not False) each rank generates
    :func:`rank_seeds` of ``seeds`` and the features are all-gathered; otherwise everything runs here.
    img_shape: ``[C, H, W]`` of the generator's output. Images go through :func:`sidlib.sampling.to_uint8`.
    """
    seeds = list(seeds)
    use_dist = _distributed(distributed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_dist else (0, 1)
    positions = list(range(len(seeds)))[rank::world]
    device = torch.device(device) if device is not None else extractor.device
    pass_seeds = _accepts_seeds(generator_fn)
    parts: dict[str, list] = {m: [] for m in extractor.metrics}
    it = range(0, len(positions), batch_size)
    if progress and rank == 0:
        from tqdm import tqdm
        it = tqdm(it, unit="batch", desc=f"generating {len(seeds)} images")
    for start in it:
        pos = positions[start:start + batch_size]
        batch_seeds = [seeds[p] for p in pos]
        z = latents_for_seeds(batch_seeds, img_shape, device=device)
        labels = labels_for_seeds(batch_seeds, label_dim, device=device)
        x = generator_fn(z, labels, seeds=batch_seeds) if pass_seeds else generator_fn(z, labels)
        if tuple(x.shape[1:]) != tuple(img_shape):
            raise ProtocolError(f"generator returned images of shape {tuple(x.shape[1:])}, expected {tuple(img_shape)}")
        for m, f in extractor(to_uint8(x)).items():
            parts[m].append(f)
    local = {m: torch.cat(v) if v else torch.zeros([0, 0]) for m, v in parts.items()}
    if not use_dist:
        return local
    index = torch.tensor(positions, dtype=torch.long)
    out = {}
    for m in extractor.metrics:
        out[m] = _gather_rows(local[m], index, len(seeds))
    return out


def _reference_features(images: torch.Tensor, extractor: M.FeatureExtractor, batch_size: int,
                        distributed: bool | None) -> torch.Tensor:
    use_dist = _distributed(distributed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_dist else (0, 1)
    positions = torch.arange(images.shape[0])[rank::world]
    feats = []
    for start in range(0, len(positions), batch_size):
        feats.append(extractor(images[positions[start:start + batch_size]])["prc"])
    local = torch.cat(feats)
    return _gather_rows(local, positions, images.shape[0]) if use_dist else local


# ---------------------------------------------------------------------------------------------------------------------
# Summaries and output.

def _std(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarise_trials(trials: Sequence[Mapping], names: Mapping) -> dict:
    """Mean, std (ddof=1), best, and min-of-3 (first three trials; EDM's protocol) of each metric over trials.

    "Best" is the minimum for FID and the maximum for IS, precision and recall.
    """
    out: dict = {"trials": len(trials)}
    fid = [t[names["fid"]] for t in trials if names["fid"] in t]
    if fid:
        out[f"{names['fid']}_mean"] = float(np.mean(fid))
        out[f"{names['fid']}_std"] = _std(fid)
        out[f"{names['fid']}_best"] = float(np.min(fid))
        if len(fid) >= 3:
            out[f"{names['fid']}_min_of_3"] = float(np.min(fid[:3]))
    for key in (names["is"], f"{names['pr']}_precision", f"{names['pr']}_recall"):
        vals = [t[key] for t in trials if key in t]
        if vals:
            out[f"{key}_mean"] = float(np.mean(vals))
            out[f"{key}_std"] = _std(vals)
            out[f"{key}_best"] = float(np.max(vals))
    return out


def _environment(device) -> dict:
    import torch_fidelity
    env = {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__, "python": platform.python_version(),
           "device": str(device)}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation.

def _stats_arg(reference_stats, dim: int | None):
    if reference_stats is None:
        return None, None
    if isinstance(reference_stats, Mapping):
        return (np.asarray(reference_stats["mu"], np.float64), np.asarray(reference_stats["sigma"], np.float64)), \
            "<in-memory>"
    if isinstance(reference_stats, tuple) and len(reference_stats) == 2:
        return (np.asarray(reference_stats[0], np.float64), np.asarray(reference_stats[1], np.float64)), \
            "<in-memory>"
    path = fetch_reference(reference_stats)
    return load_reference_stats(path, dim=dim), str(reference_stats)


def _pr_images(pr_reference):
    if pr_reference is None:
        return None, None
    if torch.is_tensor(pr_reference) or isinstance(pr_reference, np.ndarray):
        return M.as_uint8_images(pr_reference, what="pr_reference"), "<in-memory>"
    return load_reference_images(fetch_reference(pr_reference)), str(pr_reference)


def evaluate_generator(generator_fn: Callable, *, img_shape: Sequence[int], label_dim: int = 0,
                       num_images: int = PAPER_NUM_IMAGES, trials: int = 1, seed_start: int = 0,
                       seeds: Sequence[int] | None = None, reference_stats=None, pr_reference=None,
                       isc: bool = False, feature_extractor: str = M.INCEPTION, proxy: bool | None = None,
                       batch_size: int = 64, device=None, distributed: bool | None = None, progress: bool = False,
                       feature_dim: int | None = None, extractor_kwargs: Mapping | None = None,
                       info: Mapping | None = None) -> dict:
    """Run the protocol on ``generator_fn`` and return the result dict (same on every rank).

    Args:
        generator_fn: ``(z [n, C, H, W] float64, labels [n, label_dim] | None) -> images in [-1, 1]``.
        img_shape: ``[C, H, W]``; label_dim: number of classes (0 = unconditional).
        num_images: images per trial (50,000 = the paper; anything else is labelled a proxy).
        trials: number of seed ranges; trial t uses :func:`trial_seeds` ``(t, num_images, seed_start)``.
        seeds: explicit seeds for a single trial (overrides num_images/trials/seed_start).
        reference_stats: EDM-style ``.npz`` (path, URL, reference or benchmark name), ``(mu, sigma)`` or a dict.
        pr_reference: image batch for precision/recall (``.npz`` with ``arr_0`` NHWC uint8, or a uint8 NCHW tensor).
        isc: also compute the Inception Score (10 splits).
        feature_extractor: torch-fidelity extractor name (``inception-v3-compat`` for the paper).
        feature_dim: expected feature width of the reference (default 2048 for Inception, any for others).
        extractor_kwargs: torch-fidelity kwargs for the extractor (e.g. ``feature_extractor_weights_path``).
        info: extra fields copied into the result (benchmark, network, method, alpha, ...).

    Reference files, the Inception weights and the arguments are checked before any image is generated.
    """
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        num_images, trials = len(seeds), 1
    if trials < 1:
        raise ProtocolError(f"trials must be >= 1, got {trials}")
    names = metric_names(num_images, proxy)
    if len(img_shape) != 3:
        raise ProtocolError(f"img_shape must be [C, H, W], got {list(img_shape)}")
    if reference_stats is None and not isc:
        raise ProtocolError("nothing to compute: give reference_stats (FID) and/or isc=True")
    dim = feature_dim if feature_dim is not None else (2048 if feature_extractor == M.INCEPTION else None)
    ref, ref_name = _stats_arg(reference_stats, dim)
    pr_images, pr_name = _pr_images(pr_reference)
    wanted = (["fid"] if ref is not None else []) + (["isc"] if isc else []) + \
             (["prc"] if pr_images is not None else [])
    use_cuda = device is not None and torch.device(device).type == "cuda"
    extractor = M.FeatureExtractor(feature_extractor, wanted, cuda=use_cuda, **dict(extractor_kwargs or {}))
    device = torch.device(device) if device is not None else torch.device("cpu")
    world = dist.get_world_size() if _distributed(distributed) else 1
    if ref is not None:
        # One blank image through the extractor: a reference of the wrong width fails now, not after a trial.
        width = extractor(torch.zeros([1, *img_shape], dtype=torch.uint8))["fid"].shape[1]
        if width != ref[0].shape[0]:
            raise ProtocolError(f"feature width {width} of {feature_extractor!r} does not match the reference "
                                f"({ref[0].shape[0]}, {ref_name})")

    pr_feats = _reference_features(pr_images, extractor, batch_size, distributed) if pr_images is not None else None
    results = []
    for t in range(trials):
        trial_seed_list = seeds if seeds is not None else list(trial_seeds(t, num_images, seed_start))
        t0 = time.perf_counter()
        feats = generate_features(generator_fn, trial_seed_list, extractor, img_shape=img_shape, label_dim=label_dim,
                                  batch_size=batch_size, device=device, distributed=distributed, progress=progress)
        seconds = time.perf_counter() - t0
        row = {"trial": t, "seed_first": trial_seed_list[0], "seed_last": trial_seed_list[-1],
               "num_images": len(trial_seed_list), "seconds": seconds}
        if ref is not None:
            mu, sigma = M.feature_statistics(feats["fid"])
            row[names["fid"]] = M.fid_from_statistics(mu, sigma, *ref)
        if isc:
            # 10 splits as in the paper; fewer only when there are fewer than 10 images (tiny proxies).
            s = M.inception_score(feats["isc"], splits=min(10, len(trial_seed_list)))
            row[names["is"]] = s["isc_mean"]
            row[f"{names['is']}_std_over_splits"] = s["isc_std"]
        if pr_feats is not None:
            pr = M.precision_recall(feats["prc"], pr_feats, device=device if use_cuda else None)
            row[f"{names['pr']}_precision"] = pr["precision"]
            row[f"{names['pr']}_recall"] = pr["recall"]
        results.append(row)

    gen_desc = dict(getattr(generator_fn, "description", {}) or {})
    out = {
        "format": FORMAT,
        **dict(info or {}),
        "generator": gen_desc,
        "nfe": getattr(generator_fn, "nfe", gen_desc.get("nfe")),
        "protocol": {
            "name": names["fid"], "proxy": names["proxy"], "num_images": num_images, "trials": trials,
            "seed_ranges": [[r["seed_first"], r["seed_last"]] for r in results],
            "feature_extractor": feature_extractor, "fid_reference": ref_name, "pr_reference": pr_name,
            "pr_reference_images": None if pr_images is None else int(pr_images.shape[0]),
            "isc": bool(isc), "quantisation": QUANTISATION,
            "labels": "one-hot per seed (sidlib.rng.labels_for_seeds)" if label_dim else None,
            "covariance": "unbiased (1/(N-1))", "fid_formula": "torch_fidelity fid_statistics_to_metric",
            "world_size": world, "batch_size": batch_size,
        },
        "trials": results,
        "summary": summarise_trials(results, names),
        "environment": _environment(device),
    }
    return out


def _net_shape(net) -> tuple[list[int], int]:
    try:
        return [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)], int(net.label_dim)
    except AttributeError as e:
        raise ProtocolError(f"network lacks {e}; pass img_shape/label_dim explicitly") from None


def evaluate_network(source, *, sampler: str = "onestep", init_sigma: float | None = None, steps: int = 18,
                     sampler_kwargs: Mapping | None = None, device=None, info: Mapping | None = None,
                     **kwargs) -> dict:
    """Load a network with :func:`sidlib.io.checkpoints.load_network` and run :func:`evaluate_generator` on it.

    sampler: ``'onestep'`` (SiD generator; init_sigma from the checkpoint's meta, else 2.5) or ``'heun'`` (EDM
    teacher with ``steps`` Heun steps; ``sampler_kwargs`` S_churn/S_min/S_max/S_noise). Other kwargs go to
    :func:`evaluate_generator`.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    net, meta = load_checkpoint(source)
    net = net.to(device).eval().requires_grad_(False)
    img_shape, label_dim = _net_shape(net)
    meta = dict(meta or {})
    if sampler == "onestep":
        s = float(init_sigma if init_sigma is not None else meta.get("init_sigma", 2.5))
        fn = onestep_generator(net, s)
        method = "SiD"
    elif sampler == "heun":
        fn = heun_generator(net, steps, **dict(sampler_kwargs or {}))
        method = "EDM teacher"
    else:
        raise ProtocolError(f"sampler must be 'onestep' or 'heun', got {sampler!r}")
    base = {"network": str(source), "method": method, "alpha": meta.get("alpha"),
            "kimg": meta.get("kimg"), "network_meta": to_jsonable(meta)}
    base.update(info or {})
    return evaluate_generator(fn, img_shape=img_shape, label_dim=label_dim, device=device, info=base, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Proxy FID during training.

def proxy_fid(reference_stats, *, num_images: int = 10_000, batch_size: int = 64, init_sigma: float = 2.5,
                       feature_extractor: str = M.INCEPTION, device=None, isc: bool = False,
                       extractor_kwargs: Mapping | None = None) -> Callable:
    """``eval_fn(G_ema, kimg) -> {'fid10k_proxy': ...}`` for :func:`sidlib.distill.distill` snapshots.

    Runs in the calling process only (the loop calls it on rank 0), seeds 0..num_images-1, one-step sampling.
    As a config entry: ``eval_fn: sidlib.metrics.protocol:proxy_fid`` with ``eval_kwargs: {reference_stats: ...}``.
    """
    names = metric_names(num_images, proxy=True)
    ref, _ = _stats_arg(reference_stats, 2048 if feature_extractor == M.INCEPTION else None)

    def eval_fn(G_ema, kimg):
        dev = device if device is not None else next(G_ema.parameters()).device
        img_shape, label_dim = _net_shape(G_ema)
        res = evaluate_generator(onestep_generator(G_ema, init_sigma), img_shape=img_shape, label_dim=label_dim,
                                 num_images=num_images, reference_stats={"mu": ref[0], "sigma": ref[1]},
                                 isc=isc, feature_extractor=feature_extractor, proxy=True, batch_size=batch_size,
                                 device=dev, distributed=False, extractor_kwargs=extractor_kwargs)
        t = res["trials"][0]
        return {k: v for k, v in t.items() if k.startswith((names["fid"], names["is"]))}
    return eval_fn
