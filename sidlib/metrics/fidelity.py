"""Image-quality metrics through torch-fidelity: FID, KID, precision/recall and Inception Score.

This module is a thin layer over `torch-fidelity <https://github.com/toshas/torch-fidelity>`_ (0.4.0). It adds what
torch-fidelity does not offer directly:

* :func:`register_feature_extractor`: an idempotent registration (torch-fidelity refuses a second registration of a
  name), which also accepts a plain ``nn.Module`` mapping images to features (:func:`module_extractor`).
* :func:`compute_metrics`: uint8 tensors ``[N, C, H, W]`` in, a flat dict of floats out; a reference given as
  precomputed statistics (``{'mu', 'sigma'}``, e.g. EDM's ``.npz``) is compared through torch-fidelity's
  ``fid_statistics_to_metric`` because ``calculate_metrics`` only takes image inputs.
* :class:`FeatureExtractor`: a feature extractor created once and applied batch by batch (used by the paper's FID
  protocol in :mod:`sidlib.metrics.protocol`, which never holds 50,000 images in memory).
* :func:`feature_statistics` / :func:`fid_from_statistics`: mean/covariance of features and the Frechet distance
  between two Gaussians, both delegated to torch-fidelity.
* A clear error when torch-fidelity's Inception weights are neither cached nor downloadable
  (:func:`ensure_inception_weights`).

Output keys (short names of torch-fidelity's keys, see :data:`METRIC_KEYS`): ``fid``, ``kid_mean``, ``kid_std``,
``precision``, ``recall``, ``f_score``, ``isc_mean``, ``isc_std``.
"""

from __future__ import annotations

import copy
import urllib.error
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

import torch_fidelity
from torch_fidelity import registry as tf_registry
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
from torch_fidelity.metric_prc import KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor, resolve_feature_layer_for_metric

__all__ = [
    "INCEPTION", "INCEPTION_WEIGHTS_URL", "INCEPTION_WEIGHTS_FILE", "METRIC_KEYS", "InceptionWeightsMissing",
    "inception_weights_path", "ensure_inception_weights", "register_feature_extractor", "is_registered",
    "module_extractor", "UInt8ImageDataset", "as_uint8_images", "compute_metrics", "FeatureExtractor",
    "feature_statistics", "fid_from_statistics", "inception_score", "precision_recall",
]

#: torch-fidelity's port of the TF Inception-v3 ("inception-2015-12-05") used by EDM/SiD's FID.
INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth

#: torch-fidelity's result keys -> the short keys returned by :func:`compute_metrics`.
METRIC_KEYS = {
    KEY_METRIC_FID: "fid",
    KEY_METRIC_KID_MEAN: "kid_mean",
    KEY_METRIC_KID_STD: "kid_std",
    KEY_METRIC_PRECISION: "precision",
    KEY_METRIC_RECALL: "recall",
    KEY_METRIC_F_SCORE: "f_score",
    KEY_METRIC_ISC_MEAN: "isc_mean",
    KEY_METRIC_ISC_STD: "isc_std",
}

# Names torch-fidelity registers itself: never replaced, so "inception-v3-compat" always means the real thing.
_BUILTIN_EXTRACTORS = frozenset(tf_registry.FEATURE_EXTRACTORS_REGISTRY)


# ---------------------------------------------------------------------------------------------------------------------
# Inception weights.

class InceptionWeightsMissing(FileNotFoundError):
    """torch-fidelity's Inception weights are not cached and could not be downloaded."""


def inception_weights_path() -> Path:
    """Where torch-fidelity looks for the Inception weights: ``<torch hub dir>/checkpoints/<file>``.

    torch-fidelity loads them with ``torch.hub.load_state_dict_from_url``, whose cache is
    ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``).
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _missing_weights_message(path: Path, reason: str) -> str:
    return (
        f"torch-fidelity's Inception-v3 weights are missing and could not be downloaded ({reason}).\n"
        f"Place the file {INCEPTION_WEIGHTS_FILE} at\n    {path}\n"
        f"(download it on a machine with network access from {INCEPTION_WEIGHTS_URL}; the directory is "
        f"torch.hub.get_dir()/checkpoints, i.e. $TORCH_HOME/hub/checkpoints), or pass "
        f"feature_extractor_weights_path=<path to the file>."
    )


def ensure_inception_weights(download: bool = True, progress: bool = False) -> Path:
    """Return the path of the cached Inception weights, downloading them once if needed.

    Raises :class:`InceptionWeightsMissing` naming the file, the directory it must be placed in and the URL, when the
    file is absent and cannot be fetched (no network) or ``download`` is False.
    """
    path = inception_weights_path()
    if path.is_file():
        return path
    if not download:
        raise InceptionWeightsMissing(_missing_weights_message(path, "downloading disabled"))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(path), progress=progress)
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as e:
        raise InceptionWeightsMissing(_missing_weights_message(path, f"{type(e).__name__}: {e}")) from e
    return path


def _check_weights_available(feature_extractor: str, kwargs: Mapping) -> None:
    # Fail before any image is generated, with a message that says which file goes where.
    if feature_extractor != INCEPTION:
        return
    explicit = kwargs.get("feature_extractor_weights_path")
    if explicit is not None:
        if not Path(explicit).is_file():
            raise InceptionWeightsMissing(f"feature_extractor_weights_path={explicit} does not exist; it should be "
                                          f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_URL}).")
        return
    ensure_inception_weights(progress=bool(kwargs.get("verbose", False)))


# ---------------------------------------------------------------------------------------------------------------------
# Registration of custom feature extractors.

def module_extractor(module: nn.Module) -> type:
    """A ``torch_fidelity.FeatureExtractorBase`` subclass around ``module``: uint8 ``[N, C, H, W]`` -> ``[N, D]``.

    It provides one feature, ``"features"``, used for every metric. Each instance torch-fidelity creates works on a
    deep copy, so torch-fidelity's ``eval()``/``requires_grad_(False)``/``cuda()`` never touch the caller's module.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"a feature extractor must be an nn.Module, got {type(module).__name__}")

    class _ModuleExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = copy.deepcopy(module)

        @staticmethod
        def get_provided_features_list():
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            raise NotImplementedError

        def forward(self, x):
            return (self.net(x).reshape(x.shape[0], -1).to(torch.float32),)

    _ModuleExtractor.__name__ = _ModuleExtractor.__qualname__ = f"ModuleExtractor[{type(module).__name__}]"
    return _ModuleExtractor


def is_registered(name: str) -> bool:
    """True if ``name`` is in torch-fidelity's feature-extractor registry."""
    return name in tf_registry.FEATURE_EXTRACTORS_REGISTRY


def register_feature_extractor(name: str, cls_or_module, *, replace: bool = True) -> type:
    """Register a feature extractor with torch-fidelity under ``name``; safe to call repeatedly.

    Args:
        name: registry name, later passed as ``feature_extractor=name``.
        cls_or_module: a ``FeatureExtractorBase`` subclass, or an ``nn.Module`` mapping uint8 images to features
            (wrapped with :func:`module_extractor`).
        replace: when ``name`` already holds a different class, replace it (the usual case when a notebook cell or
            a retrained classifier re-registers). With ``replace=False`` that raises ``ValueError``.

    Registering the same class again is a no-op. torch-fidelity's own names (``inception-v3-compat``, ``vgg16``,
    ``clip-*``, ``dinov2-*``) are never replaced. Returns the registered class.
    """
    is_class = isinstance(cls_or_module, type) and issubclass(cls_or_module, FeatureExtractorBase)
    cls = cls_or_module if is_class else module_extractor(cls_or_module)
    current = tf_registry.FEATURE_EXTRACTORS_REGISTRY.get(name)
    if current is cls:
        return cls
    if current is not None:
        if name in _BUILTIN_EXTRACTORS:
            raise ValueError(f"{name!r} is one of torch-fidelity's own feature extractors and cannot be replaced")
        if not replace:
            raise ValueError(f"feature extractor {name!r} is already registered with {current.__name__}")
        # torch-fidelity's register function refuses existing names; the registry is a plain dict, so swap the entry.
        tf_registry.FEATURE_EXTRACTORS_REGISTRY[name] = cls
        return cls
    torch_fidelity.register_feature_extractor(name, cls)
    return cls


# ---------------------------------------------------------------------------------------------------------------------
# Inputs.

class UInt8ImageDataset(torch.utils.data.Dataset):
    """A uint8 ``[N, C, H, W]`` tensor as the Dataset torch-fidelity expects (one CHW uint8 image per item)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def as_uint8_images(x, *, what: str = "images") -> torch.Tensor:
    """Validate ``x`` (tensor or numpy array) as uint8 ``[N, C, H, W]`` with C in {1, 3}; returns a CPU tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise TypeError(f"{what}: expected a uint8 tensor [N, C, H, W], got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{what}: expected dtype uint8 (quantise with sidlib.sampling.to_uint8), got {x.dtype}")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{what}: expected shape [N, C, H, W] with C in (1, 3), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no images")
    return x.detach().cpu().contiguous()


def _tile_gray(x: torch.Tensor, feature_extractor: str) -> torch.Tensor:
    # Inception needs RGB; grayscale images are tiled to three channels, as SiD's metrics do.
    if feature_extractor == INCEPTION and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    return x


def _is_stats(x) -> bool:
    return isinstance(x, Mapping) and "mu" in x and "sigma" in x


def _short(metrics: Mapping) -> dict:
    return {METRIC_KEYS.get(k, k): float(v) for k, v in metrics.items()}


def compute_metrics(generated, reference=None, *, feature_extractor: str = INCEPTION, fid: bool = True,
                    kid: bool = False, prc: bool = False, isc: bool = False, cuda: bool = False, batch_size: int = 64,
                    kid_subset_size: int | None = None, verbose: bool = False, **kw) -> dict:
    """Metrics of ``generated`` images against ``reference`` through ``torch_fidelity.calculate_metrics``.

    Args:
        generated: uint8 ``[N, C, H, W]`` tensor/array, or any torch-fidelity input (Dataset, registered name,
            directory of PNGs, generative model).
        reference: same kinds as ``generated``; or a dict ``{'mu': [D], 'sigma': [D, D]}`` of precomputed feature
            statistics (then only FID can be computed). Not needed for ``isc`` alone.
        feature_extractor: registered torch-fidelity name (default: the TF-compatible Inception-v3).
        fid, kid, prc, isc: which metrics. ``isc`` uses only ``generated``.
        cuda: run the feature extractor on the GPU.
        batch_size: images per feature-extraction batch.
        kid_subset_size: KID subset size; default ``min(1000, N_generated, N_reference)`` so small sets work.
        **kw: passed to ``calculate_metrics`` (e.g. ``kid_subsets``, ``prc_neighborhood``, ``isc_splits``,
            ``feature_extractor_internal_dtype='float64'``, ``feature_extractor_weights_path``, ``rng_seed``).

    Returns a dict with the short keys of :data:`METRIC_KEYS`, floats. Grayscale images are tiled to RGB for
    Inception. torch-fidelity's on-disk feature cache is off unless ``cache=True`` is passed.
    """
    if not (fid or kid or prc or isc):
        raise ValueError("compute_metrics: select at least one of fid, kid, prc, isc")
    _check_weights_available(feature_extractor, {**kw, "verbose": verbose})
    if torch.is_tensor(generated) or isinstance(generated, np.ndarray):
        generated = UInt8ImageDataset(_tile_gray(as_uint8_images(generated, what="generated"), feature_extractor))

    if _is_stats(reference):
        if kid or prc:
            raise ValueError("KID and precision/recall need reference images or features; a {'mu', 'sigma'} "
                             "reference only supports FID")
        out = {}
        if isc:
            out.update(compute_metrics(generated, None, feature_extractor=feature_extractor, fid=False, isc=True,
                                       cuda=cuda, batch_size=batch_size, verbose=verbose, **kw))
        if fid:
            with FeatureExtractor(feature_extractor, ["fid"], cuda=cuda, verbose=verbose, **kw) as fe:
                feats = fe.extract_dataset(generated, batch_size=batch_size)["fid"]
            mu, sigma = feature_statistics(feats)
            out["fid"] = fid_from_statistics(mu, sigma, reference["mu"], reference["sigma"])
        return out

    if reference is None and (fid or kid or prc):
        raise ValueError("FID, KID and precision/recall need a reference")
    if torch.is_tensor(reference) or isinstance(reference, np.ndarray):
        reference = UInt8ImageDataset(_tile_gray(as_uint8_images(reference, what="reference"), feature_extractor))
    if kid and kid_subset_size is None:
        sizes = [len(d) for d in (generated, reference) if isinstance(d, torch.utils.data.Dataset)]
        kid_subset_size = min([1000] + sizes)
    args = dict(input1=generated, feature_extractor=feature_extractor, fid=fid, kid=kid, prc=prc, isc=isc,
                cuda=cuda, batch_size=batch_size, verbose=verbose, cache=False, save_cpu_ram=True)
    if reference is not None and (fid or kid or prc):
        args["input2"] = reference
    if kid:
        args["kid_subset_size"] = int(kid_subset_size)
    args.update(kw)
    return _short(torch_fidelity.calculate_metrics(**args))


# ---------------------------------------------------------------------------------------------------------------------
# Batch-wise feature extraction and statistics.

class FeatureExtractor:
    """A torch-fidelity feature extractor created once, applied to uint8 batches.

    Args:
        name: registered feature-extractor name.
        metrics: which metrics' default layers to extract ("fid", "isc", "prc", "kid"); the layer names come from
            the extractor (Inception: fid/kid/prc -> "2048", isc -> "logits_unbiased").
        cuda: run on the GPU.
        **kw: torch-fidelity kwargs for the extractor (``feature_extractor_weights_path``,
            ``feature_extractor_internal_dtype``, ...).

    ``extractor(images)`` returns ``{metric: float32 [N, D] on CPU}``.
    """

    def __init__(self, name: str = INCEPTION, metrics: Iterable[str] = ("fid",), *, cuda: bool = False,
                 verbose: bool = False, **kw):
        if not is_registered(name):
            raise ValueError(f"feature extractor {name!r} is not registered with torch-fidelity; registered: "
                             f"{sorted(tf_registry.FEATURE_EXTRACTORS_REGISTRY)}")
        _check_weights_available(name, {**kw, "verbose": verbose})
        self.name = name
        self.metrics = tuple(dict.fromkeys(metrics))
        self.layers = {m: resolve_feature_layer_for_metric(m, feature_extractor=name, **kw) for m in self.metrics}
        self.cuda = cuda
        self.device = torch.device("cuda" if cuda else "cpu")
        layer_list = list(dict.fromkeys(self.layers.values()))
        self.module = create_feature_extractor(name, layer_list, cuda=cuda, verbose=verbose, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.module = None
        return False

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict:
        images = _tile_gray(images, self.name)
        if images.dtype != torch.uint8:
            raise TypeError(f"feature extractor input must be uint8, got {images.dtype}")
        feats = self.module.convert_features_tuple_to_dict(self.module(images.to(self.device)))
        return {m: feats[layer].detach().to("cpu", torch.float32) for m, layer in self.layers.items()}

    def extract(self, images, batch_size: int = 64) -> dict:
        """Features of a whole uint8 ``[N, C, H, W]`` tensor, in batches; ``{metric: [N, D]}``."""
        return self.extract_dataset(UInt8ImageDataset(as_uint8_images(images)), batch_size=batch_size)

    def extract_dataset(self, dataset, batch_size: int = 64) -> dict:
        parts: dict[str, list] = {m: [] for m in self.metrics}
        for start in range(0, len(dataset), batch_size):
            batch = torch.stack([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for m, f in self(batch).items():
                parts[m].append(f)
        return {m: torch.cat(v) for m, v in parts.items()}


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (1/(N-1), as EDM's ``fid.py``) of features ``[N, D]``, float64.

    Delegates to ``torch_fidelity.metric_fid.fid_features_to_statistics``; features are promoted to float64 first so
    the mean is accumulated in double precision as in EDM/SiD.
    """
    f = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got {tuple(f.shape)}")
    stats = fid_features_to_statistics(f.detach().cpu().to(torch.float64))
    return np.asarray(stats["mu"], dtype=np.float64), np.atleast_2d(np.asarray(stats["sigma"], dtype=np.float64))


def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) via ``fid_statistics_to_metric``.

    ``mu*``: ``[D]``; ``sigma*``: ``[D, D]``; cast to float64 (torch-fidelity requires equal dtypes).
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu shapes must be equal and 1-D, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"sigma shapes must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    return float(fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                          verbose=False)[KEY_METRIC_FID])


def inception_score(logits, *, splits: int = 10, rng_seed: int = 2020) -> dict:
    """IS from unbiased logits ``[N, K]`` via ``isc_features_to_metric``; ``{'isc_mean', 'isc_std'}`` over splits."""
    return _short(isc_features_to_metric(torch.as_tensor(logits), splits=splits, shuffle=True, rng_seed=rng_seed))


def precision_recall(generated_features, reference_features, *, neighborhood: int = 3, batch_size: int = 10000,
                     device=None) -> dict:
    """Improved precision/recall (k-NN manifolds, Kynkaanniemi et al.) via ``prc_features_to_metric``.

    Features ``[N, D]`` / ``[M, D]``; computed batch-wise (torch-fidelity's ``save_cpu_ram`` path), optionally on
    ``device``. Returns ``{'precision', 'recall', 'f_score'}``.
    """
    g = torch.as_tensor(generated_features, dtype=torch.float32)
    r = torch.as_tensor(reference_features, dtype=torch.float32)
    if device is not None:
        g, r = g.to(device), r.to(device)
    return _short(prc_features_to_metric(g, r, prc_neighborhood=neighborhood, prc_batch_size=batch_size,
                                         save_cpu_ram=True, verbose=False))
