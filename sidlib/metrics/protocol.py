"""The paper's FID protocol (EDM's ``fid.py``, SiD's ``sid_metrics.py``), computed through torch-fidelity.

``trials`` (default 10) of N = 50,000 images, trial ``t`` on seeds ``seed_start + t*N`` ... ``+ N - 1``; any other N
is a proxy and every key says so (``fid10k_proxy``). Summary: mean +- std (ddof 1), best, EDM's min-of-3. Seed ``s``
draws its latent, label (uniform unless ``label_probs``) and sampler noise as EDM's ``generate.py``
(:func:`sidlib.rng.inputs_for_seeds`), for any batch size or process count; under ``torchrun`` rank ``r`` takes seeds
``r, r+W, ...`` and features are gathered back into seed order. Images are quantised as :data:`QUANTISATION`;
torch-fidelity's ``inception-v3-compat`` 2048-d features give mean and unbiased covariance against EDM's ``.npz``, IS
(10 splits), and precision/recall (k = 3) against OpenAI's ImageNet-64 batch.

``generator_fn(z, labels) -> images in [-1, 1]`` (z float32 ``[n, C, H, W]``, labels one-hot or None); one with a
``generators`` parameter also receives the seeds' generators for its own noise.
"""

from __future__ import annotations

import platform
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch_fidelity

from .. import distributed as dist_utils
from ..generate import gather_rows, generate_images, load_for_sampling, make_generator, select_snapshot
from ..io.jsonio import to_jsonable
from ..sampling import heun_generator, onestep_generator
from . import fidelity as M
from .references import FEATURE_DIM, fetch_reference, load_reference_images, load_reference_stats

__all__ = ["PAPER_NUM_IMAGES", "PAPER_TRIALS", "FORMAT", "ProtocolError", "metric_names", "trial_seeds",
           "rank_seeds", "select_snapshot", "onestep_generator", "heun_generator", "generate_features",
           "evaluate_generator", "evaluate_network", "summarise_trials", "proxy_fid"]

PAPER_NUM_IMAGES = 50_000
PAPER_TRIALS = 10
FORMAT = "sidlib-fid-protocol/1"
QUANTISATION = "uint8(clip(x * 127.5 + 128, 0, 255))"


class ProtocolError(ValueError):
    """Invalid protocol arguments or inputs (raised before any image is generated)."""


def metric_names(num_images: int, proxy: bool | None = None) -> dict:
    """Keys for ``num_images`` images: SiD's ``fid50k``, ``is50k``, ``pr50k3`` at 50,000, else ``_proxy`` ones
    (``fid10k_proxy``; ``pr24_k3_proxy``); ``proxy=True`` marks a 50k run a proxy, ``proxy=False`` refuses others."""
    if num_images < 2:
        raise ProtocolError(f"num_images must be >= 2, got {num_images}")
    if proxy is False and num_images != PAPER_NUM_IMAGES:
        raise ProtocolError(f"{num_images} images is not the paper protocol ({PAPER_NUM_IMAGES}); it must be "
                            f"labelled a proxy")
    is_proxy = num_images != PAPER_NUM_IMAGES if proxy is None else bool(proxy)
    suffix = "_proxy" if is_proxy else ""
    c = f"{num_images // 1000}k" if num_images % 1000 == 0 else str(num_images)
    pr = f"pr{c}3" if c.endswith("k") else f"pr{c}_k3"  # "pr24_k3", not "pr243"
    return {"fid": f"fid{c}{suffix}", "is": f"is{c}{suffix}", "pr": f"{pr}{suffix}", "proxy": is_proxy}


def trial_seeds(trial: int, num_images: int, seed_start: int = 0) -> range:
    """Seeds of trial ``trial``: ``seed_start + trial*num_images`` ... ``+ num_images - 1``."""
    return range(seed_start + trial * num_images, seed_start + (trial + 1) * num_images)


def rank_seeds(seeds: Sequence[int], rank: int, world_size: int) -> Sequence[int]:
    """The seeds process ``rank`` of ``world_size`` generates: every ``world_size``-th, starting at ``rank``."""
    if not 0 <= rank < world_size:
        raise ProtocolError(f"rank {rank} outside world size {world_size}")
    return seeds[rank::world_size]


def _world(flag: bool | None) -> tuple[int, int]:
    world = dist_utils.world_size() if flag is not False else 1
    return (dist_utils.rank(), world) if world > 1 else (0, 1)


def generate_features(generator_fn: Callable, seeds: Sequence[int], extractor: M.FeatureExtractor, *,
                      img_shape: Sequence[int], label_dim: int = 0, label_probs=None, batch_size: int = 64,
                      device=None, distributed: bool | None = None, progress: bool = False) -> dict:
    """Features ``{metric: float32 [len(seeds), D]}`` of the images of ``seeds``, in seed order; split over the
    ranks of an initialised process group unless ``distributed`` is False."""
    seeds = list(seeds)
    rank, world = _world(distributed)
    mine = rank_seeds(seeds, rank, world)
    batches = generate_images(generator_fn, mine, img_shape, label_dim, label_probs=label_probs, batch=batch_size,
                              device=extractor.device if device is None else device)
    if progress and rank == 0:
        from tqdm import tqdm
        batches = tqdm(batches, total=len(range(0, len(mine), batch_size)), unit="batch",
                       desc=f"generating {len(seeds)} images")
    parts: dict[str, list] = {m: [] for m in extractor.metrics}
    for _, x, _ in batches:
        if tuple(x.shape[1:]) != tuple(img_shape):
            raise ProtocolError(f"generator returned images of shape {tuple(x.shape[1:])}, expected {tuple(img_shape)}")
        for m, f in extractor(x).items():
            parts[m].append(f)
    return {m: torch.cat(v) if world == 1 else gather_rows(v, len(seeds)) for m, v in parts.items()}


def summarise_trials(trials: Sequence[Mapping], names: Mapping) -> dict:
    """Mean, std (ddof 1), best (min for FID, max otherwise) of each metric, and min-of-3 (first three) for FID."""
    out: dict = {"trials": len(trials)}
    for key in (names["fid"], names["is"], f"{names['pr']}_precision", f"{names['pr']}_recall"):
        vals = [t[key] for t in trials if key in t]
        if vals:
            best = np.min if key == names["fid"] else np.max
            out.update({f"{key}_mean": float(np.mean(vals)), f"{key}_std": float(np.std(vals, ddof=1)) if
                        len(vals) > 1 else None, f"{key}_best": float(best(vals))})
            if key == names["fid"] and len(vals) >= 3:
                out[f"{key}_min_of_3"] = float(np.min(vals[:3]))
    return out


def _stats_arg(reference_stats, feature_extractor: str, dim: int | None = None):
    if reference_stats is None:
        return None, None
    if isinstance(reference_stats, Mapping):
        reference_stats = (reference_stats["mu"], reference_stats["sigma"])
    if isinstance(reference_stats, tuple):
        return tuple(np.asarray(a, np.float64) for a in reference_stats), "<in-memory>"
    dim = dim or (FEATURE_DIM if feature_extractor == M.INCEPTION else None)
    return load_reference_stats(fetch_reference(reference_stats), dim=dim), str(reference_stats)


def evaluate_generator(generator_fn: Callable, *, img_shape: Sequence[int], label_dim: int = 0,
                       num_images: int = PAPER_NUM_IMAGES, trials: int = PAPER_TRIALS, seed_start: int = 0,
                       seeds: Sequence[int] | None = None, reference_stats=None, pr_reference=None,
                       isc: bool = False, feature_extractor: str = M.INCEPTION, proxy: bool | None = None,
                       label_probs: Sequence[float] | None = None, batch_size: int = 64, device=None,
                       distributed: bool | None = None, progress: bool = False, feature_dim: int | None = None,
                       extractor_kwargs: Mapping | None = None, info: Mapping | None = None) -> dict:
    """The protocol's result dict (the same on every rank), arguments checked before any image is generated.
    reference_stats: ``.npz`` path, URL or name, ``(mu, sigma)`` or a dict; pr_reference: ``.npz`` (``arr_0`` NHWC
    uint8) or a uint8 NCHW tensor; seeds: one explicit trial; feature_dim: reference width (2048 for Inception)."""
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
    if label_probs is not None and len(label_probs) != label_dim:
        raise ProtocolError(f"{len(label_probs)} class frequencies for a network with {label_dim} classes")
    ref, ref_name = _stats_arg(reference_stats, feature_extractor, feature_dim)
    pr_images, pr_name = None, None
    if torch.is_tensor(pr_reference) or isinstance(pr_reference, np.ndarray):
        pr_images, pr_name = M.as_uint8_images(pr_reference, what="pr_reference"), "<in-memory>"
    elif pr_reference is not None:
        pr_images, pr_name = load_reference_images(fetch_reference(pr_reference)), str(pr_reference)
    wanted = ["fid"] * (ref is not None) + ["isc"] * bool(isc) + ["prc"] * (pr_images is not None)
    device = torch.device("cpu" if device is None else device)
    use_cuda = device.type == "cuda"
    extractor = M.FeatureExtractor(feature_extractor, wanted, cuda=use_cuda, **dict(extractor_kwargs or {}))
    if ref is not None:  # one blank image: a reference of the wrong width fails now, not after a trial
        width = extractor(torch.zeros([1, *img_shape], dtype=torch.uint8))["fid"].shape[1]
        if width != ref[0].shape[0]:
            raise ProtocolError(f"feature width {width} of {feature_extractor!r} does not match the reference "
                                f"({ref[0].shape[0]}, {ref_name})")
    pr_feats = None
    if pr_images is not None:
        rank, world = _world(distributed)
        mine = rank_seeds(pr_images, rank, world).contiguous()
        batches = [extractor(mine[i:i + batch_size])["prc"] for i in range(0, len(mine), batch_size)]
        pr_feats = torch.cat(batches) if world == 1 else gather_rows(batches, len(pr_images))
    results = []
    for t in range(trials):
        tseeds = seeds if seeds is not None else list(trial_seeds(t, num_images, seed_start))
        t0 = time.perf_counter()
        feats = generate_features(generator_fn, tseeds, extractor, img_shape=img_shape, label_dim=label_dim,
                                  label_probs=label_probs, batch_size=batch_size, device=device,
                                  distributed=distributed, progress=progress)
        row = {"trial": t, "seed_first": tseeds[0], "seed_last": tseeds[-1], "num_images": len(tseeds),
               "seconds": time.perf_counter() - t0}
        if ref is not None:
            row[names["fid"]] = M.fid_from_statistics(*M.feature_statistics(feats["fid"]), *ref)
        if isc:  # 10 splits as in the paper; fewer only for tiny proxies
            s = M.inception_score(feats["isc"], splits=min(10, len(tseeds)))
            row[names["is"]], row[f"{names['is']}_std_over_splits"] = s["isc_mean"], s["isc_std"]
        if pr_feats is not None:
            pr = M.precision_recall(feats["prc"], pr_feats, device=device if use_cuda else None)
            row[f"{names['pr']}_precision"], row[f"{names['pr']}_recall"] = pr["precision"], pr["recall"]
        results.append(row)
    gen_desc = dict(getattr(generator_fn, "description", {}) or {})
    env = {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
           "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return {
        "format": FORMAT, **dict(info or {}), "generator": gen_desc,
        "nfe": getattr(generator_fn, "nfe", gen_desc.get("nfe")),
        "protocol": {
            "name": names["fid"], "proxy": names["proxy"], "num_images": num_images, "trials": trials,
            "seed_ranges": [[r["seed_first"], r["seed_last"]] for r in results],
            "noise": "EDM's per-seed generators (sidlib.rng.inputs_for_seeds) on " + device.type,
            "feature_extractor": feature_extractor, "fid_reference": ref_name, "pr_reference": pr_name,
            "pr_reference_images": None if pr_images is None else int(pr_images.shape[0]),
            "isc": bool(isc), "quantisation": QUANTISATION,
            "labels": None if not label_dim else ("uniform" if label_probs is None else "given class frequencies"),
            "label_probs": None if label_probs is None else [float(p) for p in label_probs],
            "covariance": "unbiased (1/(N-1))", "world_size": _world(distributed)[1], "batch_size": batch_size,
        },
        "trials": results, "summary": summarise_trials(results, names), "environment": env,
    }


def _net_shape(net) -> tuple[list[int], int]:
    try:
        return [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)], int(net.label_dim)
    except AttributeError as e:
        raise ProtocolError(f"network lacks {e}; pass img_shape/label_dim explicitly") from None


def evaluate_network(source, *, sampler: str = "onestep", init_sigma: float | None = None, steps: int = 18,
                     sampler_kwargs: Mapping | None = None, snapshot="latest", device=None,
                     info: Mapping | None = None, **kwargs) -> dict:
    """:func:`evaluate_generator` of a network (:func:`sidlib.generate.load_for_sampling`) sampled ``'onestep'``
    (init_sigma: else the checkpoint's, else 2.5) or ``'heun'`` (``steps``, ``sampler_kwargs`` S_churn/S_min/...)."""
    if sampler not in ("onestep", "heun"):
        raise ProtocolError(f"sampler must be 'onestep' or 'heun', got {sampler!r}")
    net, meta, selection, device = load_for_sampling(source, snapshot, device)
    img_shape, label_dim = _net_shape(net)
    fn = make_generator(net, meta, sampler, init_sigma, steps, sampler_kwargs)
    base = {"network": str(source), "method": "SiD" if sampler == "onestep" else "EDM teacher",
            "alpha": meta.get("alpha"), "kimg": meta.get("kimg"), "snapshot": selection,
            "network_meta": to_jsonable(meta), **dict(info or {})}
    return evaluate_generator(fn, img_shape=img_shape, label_dim=label_dim, device=device, info=base, **kwargs)


def proxy_fid(reference_stats, *, num_images: int = 10_000, batch_size: int = 64, init_sigma: float = 2.5,
              feature_extractor: str = M.INCEPTION, device=None, isc: bool = False, seed_start: int = 0,
              label_probs: Sequence[float] | None = None, extractor_kwargs: Mapping | None = None) -> Callable:
    """``eval_fn(G_ema, kimg) -> {'fid10k_proxy': ...}`` for :func:`sidlib.distill.distill` snapshots: one trial of
    one-step samples in the calling process. Config: ``eval_fn: sidlib.metrics.protocol:proxy_fid`` with
    ``eval_kwargs: {reference_stats: ...}``."""
    names = metric_names(num_images, proxy=True)
    ref, _ = _stats_arg(reference_stats, feature_extractor)

    def eval_fn(G_ema, kimg):
        img_shape, label_dim = _net_shape(G_ema)
        res = evaluate_generator(
            onestep_generator(G_ema, init_sigma), img_shape=img_shape, label_dim=label_dim, num_images=num_images,
            trials=1, seed_start=seed_start, reference_stats=ref, isc=isc, feature_extractor=feature_extractor,
            proxy=True, label_probs=label_probs, batch_size=batch_size, distributed=False,
            device=device if device is not None else next(G_ema.parameters()).device,
            extractor_kwargs=extractor_kwargs)
        return {k: v for k, v in res["trials"][0].items() if k.startswith((names["fid"], names["is"]))}
    return eval_fn
