"""digits: scikit-learn's bundled 8x8 handwritten digits as a tiny image benchmark (no download).

1,797 grey-scale images with integer intensities 0..16 and 10 classes. Images are mapped to EDM's range [-1, 1]
by ``x / 16 * 2 - 1`` and stored as ``[N, 1, 8, 8]`` float32. The split is fixed: a NumPy permutation with seed 0;
the first 1,400 indices are the training set (teacher and classifier), the remaining 397 the held-out test set
(FID/KID/precision/recall reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["DigitsSplit", "load_digits_split", "split_indices", "to_uint8", "from_uint8", "NUM_CLASSES",
           "IMG_RESOLUTION", "IMG_CHANNELS"]

NUM_CLASSES = 10
IMG_RESOLUTION = 8
IMG_CHANNELS = 1
NUM_IMAGES = 1797
NUM_TRAIN = 1400


@dataclass(frozen=True)
class DigitsSplit:
    """Train/test tensors. images: ``[N, 1, 8, 8]`` float32 in [-1, 1]; labels: ``[N]`` int64 in 0..9."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_index: np.ndarray
    test_index: np.ndarray


def split_indices(n: int = NUM_IMAGES, num_train: int = NUM_TRAIN, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint (train, test) index arrays: ``np.random.default_rng(seed).permutation(n)``."""
    if not 0 < num_train < n:
        raise ValueError(f"digits.num_train must be in (0, {n}), got {num_train}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:num_train]), np.sort(perm[num_train:])


@lru_cache(maxsize=4)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def load_digits_split(seed: int = 0, num_train: int = NUM_TRAIN) -> DigitsSplit:
    """The benchmark's data: images scaled to [-1, 1] as ``[N, 1, 8, 8]`` float32, fixed split (see module doc)."""
    images, labels = _load_raw()
    x = torch.from_numpy(images / 16.0 * 2.0 - 1.0).float().unsqueeze(1)
    y = torch.from_numpy(labels)
    tr, te = split_indices(len(x), num_train, seed)
    return DigitsSplit(x[tr], y[tr], x[te], y[te], tr, te)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 ``[N, C, H, W]`` the way EDM/SiD export samples: ``clip(x*127.5 + 128)``."""
    return (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 in [-1, 1] (inverse of :func:`to_uint8` up to rounding)."""
    return images.float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------------------
# Pipeline pieces: classifier, teachers, SiD runs and evaluation for the digits benchmark.
# Every function here is module-level so that sidlib.pipeline.run_parallel can run it in a spawned process.

VARIANT_LABEL_DIM = {"uncond": 0, "cond": NUM_CLASSES}


def check_variant(variant: str) -> str:
    if variant not in VARIANT_LABEL_DIM:
        raise ValueError(f"unknown digits variant {variant!r}; expected one of {sorted(VARIANT_LABEL_DIM)}")
    return variant


def classifier_path(ckpt_dir) -> "Path":
    """``<ckpt_dir>/teacher/classifier/classifier.safetensors`` (made by the teacher stage with the teachers)."""
    from pathlib import Path

    return Path(ckpt_dir) / "teacher" / "classifier" / "classifier.safetensors"


def teacher_path(ckpt_dir, variant: str) -> "Path":
    """``<ckpt_dir>/teacher/<variant>/network.safetensors``."""
    from pathlib import Path

    return Path(ckpt_dir) / "teacher" / check_variant(variant) / "network.safetensors"


def _split(cfg: dict) -> "DigitsSplit":
    d = cfg.get("data", {})
    return load_digits_split(int(d.get("split_seed", 0)), int(d.get("num_train", NUM_TRAIN)))


def _split_kwargs(cfg: dict) -> dict:
    d = cfg.get("data", {})
    return dict(split_seed=int(d.get("split_seed", 0)), num_train=int(d.get("num_train", NUM_TRAIN)))


def student_dir(ckpt_dir, variant: str) -> "Path":
    from pathlib import Path

    return Path(ckpt_dir) / "sid" / check_variant(variant)


def require_file(path, what: str, stage: str):
    """Raise FileNotFoundError naming ``path`` and the stage that makes it, if it does not exist."""
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path} (produced by the {stage!r} stage; run it first)")
    return Path(path)


def train_and_save_classifier(cfg: dict, ckpt_dir) -> dict:
    """Train the feature classifier on the training split (or reuse a finished one); returns its info dict
    with ``test_accuracy``. The checkpoint lands in ``<ckpt_dir>/classifier/``."""
    from .classifier import accuracy, load_classifier, save_classifier, train_classifier

    path = classifier_path(ckpt_dir)
    c = cfg["teacher"].get("classifier", {})
    settings = dict(epochs=int(c.get("epochs", 40)), batch=int(c.get("batch", 64)), lr=float(c.get("lr", 1e-3)),
                    seed=int(c.get("seed", 0)))
    sp = _split(cfg)
    if path.is_file():
        model, meta = load_classifier(path)
        if meta.get("settings") == settings:
            return meta
    model, info = train_classifier(sp.train_images, sp.train_labels, **settings)
    meta = {"settings": settings, "train_seconds": info["seconds"],
            "train_accuracy": accuracy(model, sp.train_images, sp.train_labels),
            "test_accuracy": accuracy(model, sp.test_images, sp.test_labels),
            "num_train": len(sp.train_images), "num_test": len(sp.test_images)}
    save_classifier(path, model, meta)
    return meta


def teacher_config(cfg: dict, variant: str):
    """:class:`sidlib.teacher_training.TeacherConfig` of a digits variant from the ``digits.teacher`` params."""
    from .teacher_training import TeacherConfig

    t = {k: v for k, v in cfg.get("teacher", {}).items() if k not in ("variants", "classifier")}
    t["label_dim"] = VARIANT_LABEL_DIM[check_variant(variant)]
    return TeacherConfig.from_dict(t, where="digits.teacher")


def train_teacher_variant(cfg: dict, variant: str, ckpt_dir, max_seconds: float | None = None) -> dict:
    """Train (or resume / reuse) the EDM teacher of ``variant``; returns {variant, path, iterations, seconds}."""
    import json

    from .teacher_training import train_teacher

    tcfg = teacher_config(cfg, variant)
    sp = _split(cfg)
    path = teacher_path(ckpt_dir, variant)
    out = train_teacher(tcfg, path.parent, sp.train_images, sp.train_labels, num_classes=NUM_CLASSES,
                        max_seconds=max_seconds)
    done = out.suffix == ".safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())["meta"] if done else {}
    return {"variant": variant, "path": _shown_path(out), "complete": done, "iterations": meta.get("iterations"),
            "seconds": meta.get("seconds"), "parameters": meta.get("parameters")}


def _shown_path(path) -> str:
    """``path`` relative to the working directory when it lies inside it: committed records stay machine-independent."""
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def eval_seeds(num: int, offset: int = 0) -> list[int]:
    """Fixed latent seeds for evaluation: the same images are drawn at every snapshot (less evaluation noise)."""
    return list(range(offset, offset + int(num)))


def metric_summary(raw: dict) -> dict:
    """Map the metric dict of :func:`sidlib.metrics.compute_metrics` to short names (fid, kid, precision, recall)."""
    names = {"fid": ("fid", "frechet_inception_distance"), "kid": ("kid", "kid_mean", "kernel_inception_distance_mean"),
             "kid_std": ("kid_std",), "precision": ("precision",),
             "recall": ("recall",)}
    out = {}
    for short, keys in names.items():
        for k in keys:
            if k in raw:
                out[short] = float(raw[k])
                break
    return out


class ImageMetrics:
    """FID / KID / precision / recall of generated digits against the held-out test split, in the feature space
    of the pipeline's digit classifier; class accuracy for conditional samples.

    classifier: path of the classifier checkpoint. Images are ``[N, 1, 8, 8]`` in [-1, 1] (converted to uint8 the
    way EDM exports samples, so generated and reference images are quantised identically).
    """

    def __init__(self, classifier, *, split_seed: int = 0, num_train: int = NUM_TRAIN):
        from .classifier import load_classifier, register_digits_extractor

        self.classifier = load_classifier(classifier)[0] if not isinstance(classifier, torch.nn.Module) else classifier
        self.extractor = register_digits_extractor(self.classifier)
        sp = load_digits_split(split_seed, num_train)
        self.reference = to_uint8(sp.test_images)
        self.reference_labels = sp.test_labels

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, kid: bool = True,
                 prc: bool = True) -> dict:
        from . import metrics
        from .classifier import predict

        gen = to_uint8(images)
        raw = metrics.compute_metrics(gen, self.reference, feature_extractor=self.extractor, fid=True, kid=kid,
                                      prc=prc, batch_size=1000)
        out = metric_summary(raw)
        if labels is not None:
            target = labels.argmax(1) if labels.ndim == 2 else labels
            out["class_accuracy"] = float((predict(self.classifier, gen) == target.cpu()).double().mean())
        return out


def student_samples(G, seeds, init_sigma: float, label_dim: int, batch: int = 1000):
    """One-step samples ``[N, 1, 8, 8]`` and one-hot labels (or None) for ``seeds``."""
    from .sampling import generate_onestep, labels_for_seeds, latents_for_seeds

    xs, ls = [], []
    with torch.no_grad():
        for i in range(0, len(seeds), batch):
            s = seeds[i:i + batch]
            z = latents_for_seeds(s, [IMG_CHANNELS, IMG_RESOLUTION, IMG_RESOLUTION])
            lab = labels_for_seeds(s, label_dim)
            xs.append(generate_onestep(G, z.float(), init_sigma, lab).float())
            if lab is not None:
                ls.append(lab)
    return torch.cat(xs), (torch.cat(ls) if ls else None)


def teacher_samples(net, seeds, nfe: int, label_dim: int, batch: int = 1000):
    """Deterministic Heun samples of the teacher at ``nfe`` network evaluations (EDM's 18-step grid for 35).

    Returns (images ``[N, 1, 8, 8]``, labels or None, nfe actually used). Latents are ``latents_for_seeds`` in
    float64, integrated in float64 as EDM does.
    """
    from .sampling import edm_sigmas, heun_sampler, labels_for_seeds, latents_for_seeds

    if nfe < 1 or nfe % 2 == 0:
        raise ValueError(f"Heun NFE must be odd (2*steps - 1), got {nfe}")
    steps = (nfe + 1) // 2
    sigmas = edm_sigmas(steps)
    xs, ls, used = [], [], 0
    with torch.no_grad():
        for i in range(0, len(seeds), batch):
            s = seeds[i:i + batch]
            z = latents_for_seeds(s, [IMG_CHANNELS, IMG_RESOLUTION, IMG_RESOLUTION])
            lab = labels_for_seeds(s, label_dim)
            x, used = heun_sampler(net, z * sigmas[0], sigmas, class_labels=lab)
            xs.append(x.float())
            if lab is not None:
                ls.append(lab)
    return torch.cat(xs), (torch.cat(ls) if ls else None), used


class StudentEval:
    """SiD eval callback for digits: fixed-seed one-step samples of G_ema scored by :class:`ImageMetrics`."""

    def __init__(self, classifier, init_sigma: float, label_dim: int, num_samples: int, *, split_seed: int = 0,
                 num_train: int = NUM_TRAIN):
        self.metrics = ImageMetrics(classifier, split_seed=split_seed, num_train=num_train)
        self.seeds = eval_seeds(num_samples)
        self.init_sigma, self.label_dim = float(init_sigma), int(label_dim)

    def __call__(self, G, kimg: float) -> dict:
        import time

        t0 = time.perf_counter()
        x, lab = student_samples(G, self.seeds, self.init_sigma, self.label_dim)
        # FID only during training: KID's 100 subsets cost several times the FID itself on a CPU.
        out = self.metrics(x, lab, kid=False, prc=False)
        out["eval_seconds"] = time.perf_counter() - t0
        return out


def distill_config(cfg: dict, variant: str, teacher: str, run_dir) -> dict:
    """A :class:`sidlib.distill.DistillConfig` mapping for one digits variant from the ``digits`` params."""
    d = cfg["distill"]
    every = float(d.get("eval_every_kimg", 4.0))
    conf = dict(
        teacher=str(teacher), alpha=float(d.get("alpha", 1.2)), tmax=float(d.get("tmax", 800)),
        init_sigma=float(d.get("init_sigma", 2.5)), batch=int(d.get("batch", 64)), lr=float(d["lr"]),
        glr=float(d["glr"]), g_beta1=float(d.get("g_beta1", 0.0)), lsg=float(d.get("lsg", 100.0)),
        ls=float(d.get("ls", 1.0)), ema_halflife_kimg=float(d.get("ema_halflife_kimg", 2.0)),
        ema_rampup=float(d.get("ema_rampup", 0.05)), duration_kimg=float(d["kimg"]), tick_kimg=every, snap_ticks=1,
        state_ticks=max(1, int(round(float(d.get("checkpoint_every_kimg", every)) / every))),
        seed=int(d.get("seed", 0)), device="cpu", grid_size=64, progress=False, run_dir=str(run_dir))
    if "dropout" in d:
        conf["dropout"] = float(d["dropout"])
    return conf


def run_distill_variant(cfg: dict, variant: str, ckpt_dir) -> dict:
    """SiD-distil the ``variant`` teacher (resumable); logs eval metrics of G_ema at every tick.

    Returns {variant, run_dir, seconds}. Raises FileNotFoundError naming a missing teacher or classifier file.
    """
    import time

    from .distill import distill

    tpath = require_file(teacher_path(ckpt_dir, variant), f"digits {variant} teacher checkpoint", "teacher@digits")
    cpath = require_file(classifier_path(ckpt_dir), "digits feature classifier", "teacher@digits")
    d = cfg["distill"]
    run_dir = student_dir(ckpt_dir, variant)
    callback = StudentEval(cpath, d.get("init_sigma", 2.5), VARIANT_LABEL_DIM[variant],
                           int(d.get("eval_samples", 4000)), **_split_kwargs(cfg))
    t0 = time.perf_counter()
    distill(distill_config(cfg, variant, tpath, run_dir), eval_fn=callback)
    return {"variant": variant, "run_dir": str(run_dir), "seconds": time.perf_counter() - t0}


def _latest_snapshot(run_dir):
    from pathlib import Path

    snaps = sorted(Path(run_dir).glob("network-snapshot-*.safetensors"))
    if not snaps:
        raise FileNotFoundError(f"no SiD generator snapshot in {run_dir} (produced by the 'distill@digits' stage)")
    return snaps[-1]


def training_curve(run_dir) -> list[dict]:
    """The eval records of a SiD run: [{kimg, images_seen, iteration, fid, ...}] in order (from log.jsonl)."""
    from pathlib import Path

    from .logging_utils import read_jsonl

    out = []
    for r in read_jsonl(Path(run_dir) / "log.jsonl"):
        m = r.get("metrics")
        if m:
            out.append({"kimg": r["kimg"], "images_seen": r["images_seen"], "iteration": r["iteration"], **m})
    return out


def _timed(fn):
    import time

    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def evaluate_teacher_variant(cfg: dict, variant: str, ckpt_dir, grid: int = 64) -> dict:
    """The teacher of ``variant`` sampled with Heun at every ``eval.nfe`` on ``eval.teacher_samples`` fixed seeds.

    Returns {variant, rows: [{nfe, fid, kid, precision, recall, [class_accuracy], sec_per_1k}], grid: images of the
    largest NFE ``[grid, 1, 8, 8]``}. Generation is timed on its own (one thread in a pipeline worker).
    """
    from .checkpoints import load_network

    tpath = require_file(teacher_path(ckpt_dir, variant), f"digits {variant} teacher checkpoint", "teacher@digits")
    net = load_network(tpath)
    metrics = ImageMetrics(require_file(classifier_path(ckpt_dir), "digits feature classifier", "teacher@digits"),
                           **_split_kwargs(cfg))
    seeds = eval_seeds(int(cfg["eval"]["teacher_samples"]), offset=1_000_000)
    rows, grid_images = [], None
    for nfe in sorted(int(n) for n in cfg["eval"]["nfe"]):
        (x, lab, used), secs = _timed(lambda: teacher_samples(net, seeds, nfe, net.label_dim))
        row = {"model": "teacher (Heun)", "variant": variant, "nfe": used, **metrics(x, lab),
               "sec_per_1k": secs / len(seeds) * 1000, "num_samples": len(seeds)}
        rows.append(row)
        grid_images = x[:grid]
    return {"variant": variant, "rows": rows, "grid": grid_images}


def evaluate_student_variant(cfg: dict, variant: str, ckpt_dir, grid: int = 64) -> dict:
    """The last G_ema snapshot of the SiD run of ``variant`` on ``eval.num_samples`` fixed seeds, plus the min and
    median FID over the run's last ``eval.last_evals`` in-training evaluations."""
    from .checkpoints import load_checkpoint
    from .pipeline import summarise_metric

    run_dir = student_dir(ckpt_dir, variant)
    G, meta = load_checkpoint(_latest_snapshot(run_dir))
    metrics = ImageMetrics(require_file(classifier_path(ckpt_dir), "digits feature classifier", "teacher@digits"),
                           **_split_kwargs(cfg))
    seeds = eval_seeds(int(cfg["eval"]["num_samples"]), offset=2_000_000)
    (x, lab), secs = _timed(lambda: student_samples(G, seeds, float(meta["init_sigma"]), G.label_dim))
    curve = training_curve(run_dir)
    last = curve[-int(cfg["eval"].get("last_evals", 5)):]
    row = {"model": "SiD student (one step)", "variant": variant, "nfe": 1, **metrics(x, lab),
           "sec_per_1k": secs / len(seeds) * 1000, "num_samples": len(seeds), "kimg": meta.get("kimg")}
    return {"variant": variant, "row": row, "grid": x[:grid], "curve": curve,
            "last_evals_fid": summarise_metric([r.get("fid") for r in last]),
            "all_evals_fid": summarise_metric([r.get("fid") for r in curve]), "alpha": meta.get("alpha")}


def fid_floor(cfg: dict, ckpt_dir) -> dict:
    """Reference points in the classifier's feature space: the training images themselves (all 1,400, and a
    397-image subset the size of the test split) scored against the test split."""
    metrics = ImageMetrics(require_file(classifier_path(ckpt_dir), "digits feature classifier", "teacher@digits"),
                           **_split_kwargs(cfg))
    sp = _split(cfg)
    onehot = torch.nn.functional.one_hot(sp.train_labels, NUM_CLASSES).float()
    full = metrics(sp.train_images, onehot)
    sub = metrics(sp.train_images[: len(sp.test_images)], onehot[: len(sp.test_images)])
    return {"train_vs_test": full, "train_subset_vs_test": sub}


def evaluate_job(kind: str, cfg: dict, variant: str, ckpt_dir) -> dict:
    """``kind`` 'teacher' or 'student': :func:`evaluate_teacher_variant` / :func:`evaluate_student_variant`
    (one entry point so both kinds share one pool of worker processes)."""
    if kind == "teacher":
        return {"kind": kind, **evaluate_teacher_variant(cfg, variant, ckpt_dir)}
    if kind == "student":
        return {"kind": kind, **evaluate_student_variant(cfg, variant, ckpt_dir)}
    raise ValueError(f"unknown evaluation kind {kind!r}")


def log_linear_fit(images_seen, values, *, phase_fraction: float = 0.25) -> dict:
    """Least-squares fit of ``log(value)`` against images seen over the first ``phase_fraction`` of the run.

    Returns {slope_per_kimg (natural log per 1,000 images), r2, points}. A straight line (r2 near 1, negative
    slope) is what "falls exponentially fast" means.
    """
    import math

    pairs = [(float(n), float(v)) for n, v in zip(images_seen, values) if v is not None and v > 0]
    if not pairs:
        return {"slope_per_kimg": None, "r2": None, "points": 0}
    end = max(n for n, _ in pairs) * phase_fraction
    pts = [(n / 1000, math.log(v)) for n, v in pairs if n <= end]
    if len(pts) < 3:
        pts = [(n / 1000, math.log(v)) for n, v in pairs[:3]]
    k = len(pts)
    mx, my = sum(p[0] for p in pts) / k, sum(p[1] for p in pts) / k
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    syy = sum((p[1] - my) ** 2 for p in pts)
    slope = sxy / sxx if sxx > 0 else 0.0
    r2 = (sxy * sxy / (sxx * syy)) if sxx > 0 and syy > 0 else None
    return {"slope_per_kimg": slope, "r2": r2, "points": k}


def tile(images_u8) -> np.ndarray:
    """``[N, 8, 8]`` (or ``[N, 1, 8, 8]``) uint8 images -> one square ``[8k, 8k]`` mosaic of the first k*k images."""
    a = np.asarray(images_u8).reshape(-1, IMG_RESOLUTION, IMG_RESOLUTION)
    k = int(np.sqrt(len(a)))
    r = IMG_RESOLUTION
    return a[: k * k].reshape(k, k, r, r).transpose(0, 2, 1, 3).reshape(k * r, k * r)
