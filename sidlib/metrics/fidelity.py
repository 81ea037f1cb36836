"""FID, KID, precision/recall and Inception Score through torch-fidelity (0.4.0), with short keys
(:data:`METRIC_KEYS`), plus what it lacks: idempotent registration of extractors (also plain modules), a reusable
:class:`FeatureExtractor`, FID against ``{'mu', 'sigma'}`` statistics (EDM's ``.npz``), and a clear error when the
Inception weights are missing."""

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

__all__ = ["INCEPTION", "INCEPTION_WEIGHTS_URL", "INCEPTION_WEIGHTS_FILE", "METRIC_KEYS", "InceptionWeightsMissing",
           "inception_weights_path", "ensure_inception_weights", "register_feature_extractor", "is_registered",
           "module_extractor", "UInt8ImageDataset", "as_uint8_images", "compute_metrics", "FeatureExtractor",
           "feature_statistics", "fid_from_statistics", "inception_score", "precision_recall"]

#: torch-fidelity's port of the TF Inception-v3 ("inception-2015-12-05") used by EDM/SiD's FID.
INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth

#: torch-fidelity's result keys -> the short keys returned by :func:`compute_metrics`.
METRIC_KEYS = {KEY_METRIC_FID: "fid", KEY_METRIC_KID_MEAN: "kid_mean", KEY_METRIC_KID_STD: "kid_std",
               KEY_METRIC_PRECISION: "precision", KEY_METRIC_RECALL: "recall", KEY_METRIC_F_SCORE: "f_score",
               KEY_METRIC_ISC_MEAN: "isc_mean", KEY_METRIC_ISC_STD: "isc_std"}

# Names torch-fidelity registers itself: never replaced, so "inception-v3-compat" always means the real thing.
_BUILTIN_EXTRACTORS = frozenset(tf_registry.FEATURE_EXTRACTORS_REGISTRY)


class InceptionWeightsMissing(FileNotFoundError):
    """torch-fidelity's Inception weights are not cached and could not be downloaded."""


def inception_weights_path() -> Path:
    """Where torch-fidelity looks for the Inception weights (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def ensure_inception_weights(progress: bool = False) -> Path:
    """Path of the Inception weights, downloaded once if needed; else :class:`InceptionWeightsMissing`."""
    path = inception_weights_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(path), progress=progress)
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as e:
        raise InceptionWeightsMissing(
            f"torch-fidelity's Inception-v3 weights are missing and could not be downloaded ({type(e).__name__}: "
            f"{e}). Place the file {INCEPTION_WEIGHTS_FILE} at {path} (download it where there is network access "
            f"from {INCEPTION_WEIGHTS_URL}; the directory is torch.hub.get_dir()/checkpoints, i.e. "
            f"$TORCH_HOME/hub/checkpoints), or pass feature_extractor_weights_path=<path to the file>.") from e
    return path


def _check_weights_available(feature_extractor: str, kw: Mapping, verbose: bool) -> None:
    # Fail before any image is generated, with a message that says which file goes where.
    explicit = kw.get("feature_extractor_weights_path")
    if feature_extractor == INCEPTION and explicit is None:
        ensure_inception_weights(progress=bool(verbose))
    elif feature_extractor == INCEPTION and not Path(explicit).is_file():
        raise InceptionWeightsMissing(f"feature_extractor_weights_path={explicit} does not exist; it should be "
                                      f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_URL}).")


def module_extractor(module: nn.Module) -> type:
    """A ``FeatureExtractorBase`` subclass around ``module`` (uint8 ``[N, C, H, W]`` -> ``[N, D]``), with one feature,
    ``"features"``, for every metric; each instance works on a deep copy, so the caller's module is never touched."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"a feature extractor must be an nn.Module, got {type(module).__name__}")

    class _ModuleExtractor(FeatureExtractorBase):
        get_provided_features_list = staticmethod(lambda: ("features",))
        get_default_feature_layer_for_metric = staticmethod(lambda metric: "features")
        can_be_compiled = staticmethod(lambda: False)
        get_dummy_input_for_compile = None

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = copy.deepcopy(module)

        def forward(self, x):
            return (self.net(x).reshape(x.shape[0], -1).to(torch.float32),)

    _ModuleExtractor.__name__ = _ModuleExtractor.__qualname__ = f"ModuleExtractor[{type(module).__name__}]"
    return _ModuleExtractor


def is_registered(name: str) -> bool:
    """True if ``name`` is in torch-fidelity's feature-extractor registry."""
    return name in tf_registry.FEATURE_EXTRACTORS_REGISTRY


def register_feature_extractor(name: str, cls_or_module, *, replace: bool = True) -> type:
    """Register ``cls_or_module`` (a ``FeatureExtractorBase`` subclass, or an ``nn.Module`` wrapped by
    :func:`module_extractor`) under ``name``; returns the class. The same class again is a no-op; a different one
    replaces the entry (``replace=False``: ValueError); torch-fidelity's own names are never replaced."""
    is_class = isinstance(cls_or_module, type) and issubclass(cls_or_module, FeatureExtractorBase)
    cls = cls_or_module if is_class else module_extractor(cls_or_module)
    current = tf_registry.FEATURE_EXTRACTORS_REGISTRY.get(name)
    if current is None:
        torch_fidelity.register_feature_extractor(name, cls)
    elif current is not cls:
        if name in _BUILTIN_EXTRACTORS:
            raise ValueError(f"{name!r} is one of torch-fidelity's own feature extractors and cannot be replaced")
        if not replace:
            raise ValueError(f"feature extractor {name!r} is already registered with {current.__name__}")
        # torch-fidelity's register function refuses existing names; the registry is a plain dict, so swap the entry.
        tf_registry.FEATURE_EXTRACTORS_REGISTRY[name] = cls
    return cls


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


def _short(metrics: Mapping) -> dict:
    return {METRIC_KEYS.get(k, k): float(v) for k, v in metrics.items()}


def compute_metrics(generated, reference=None, *, feature_extractor: str = INCEPTION, fid: bool = True,
                    kid: bool = False, prc: bool = False, isc: bool = False, cuda: bool = False, batch_size: int = 64,
                    kid_subset_size: int | None = None, verbose: bool = False, **kw) -> dict:
    """Metrics (short keys) of uint8 ``[N, C, H, W]`` tensors/arrays or any torch-fidelity input through
    ``torch_fidelity.calculate_metrics`` (``**kw``; its cache is off unless ``cache=True``). ``reference``: may be
    ``{'mu', 'sigma'}`` (FID only); not needed for ``isc`` alone. KID subsets: ``min(1000, N_gen, N_ref)``."""
    if not (fid or kid or prc or isc):
        raise ValueError("compute_metrics: select at least one of fid, kid, prc, isc")
    _check_weights_available(feature_extractor, kw, verbose)
    if torch.is_tensor(generated) or isinstance(generated, np.ndarray):
        generated = UInt8ImageDataset(_tile_gray(as_uint8_images(generated, what="generated"), feature_extractor))

    if isinstance(reference, Mapping) and "mu" in reference and "sigma" in reference:
        if kid or prc:
            raise ValueError("KID and precision/recall need reference images or features; a {'mu', 'sigma'} "
                             "reference only supports FID")
        out = {}
        if isc:
            out.update(compute_metrics(generated, None, feature_extractor=feature_extractor, fid=False, isc=True,
                                       cuda=cuda, batch_size=batch_size, verbose=verbose, **kw))
        if fid:
            fe = FeatureExtractor(feature_extractor, ["fid"], cuda=cuda, verbose=verbose, **kw)
            mu, sigma = feature_statistics(fe.extract(generated, batch_size=batch_size)["fid"])
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
                cuda=cuda, batch_size=batch_size, verbose=verbose, cache=False, save_cpu_ram=True,
                **({"input2": reference} if reference is not None and (fid or kid or prc) else {}),
                **({"kid_subset_size": int(kid_subset_size)} if kid else {}))
    return _short(torch_fidelity.calculate_metrics(**{**args, **kw}))


class FeatureExtractor:
    """A torch-fidelity feature extractor created once; ``extractor(uint8 images)`` returns ``{metric: float32
    [N, D] on CPU}`` for the default layer of each of ``metrics`` ("fid", "isc", "prc", "kid"; Inception: "2048" and
    "logits_unbiased"). ``**kw``: torch-fidelity kwargs (``feature_extractor_weights_path``, ...)."""

    def __init__(self, name: str = INCEPTION, metrics: Iterable[str] = ("fid",), *, cuda: bool = False,
                 verbose: bool = False, **kw):
        if not is_registered(name):
            raise ValueError(f"feature extractor {name!r} is not registered with torch-fidelity; registered: "
                             f"{sorted(tf_registry.FEATURE_EXTRACTORS_REGISTRY)}")
        _check_weights_available(name, kw, verbose)
        self.name, self.metrics, self.cuda = name, tuple(dict.fromkeys(metrics)), cuda
        self.layers = {m: resolve_feature_layer_for_metric(m, feature_extractor=name, **kw) for m in self.metrics}
        self.device = torch.device("cuda" if cuda else "cpu")
        self.module = create_feature_extractor(name, list(dict.fromkeys(self.layers.values())), cuda=cuda,
                                               verbose=verbose, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.module = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict:
        images = _tile_gray(images, self.name)
        if images.dtype != torch.uint8:
            raise TypeError(f"feature extractor input must be uint8, got {images.dtype}")
        feats = self.module.convert_features_tuple_to_dict(self.module(images.to(self.device)))
        return {m: feats[layer].detach().to("cpu", torch.float32) for m, layer in self.layers.items()}

    def extract(self, images, batch_size: int = 64) -> dict:
        """``{metric: [N, D]}`` of uint8 images ``[N, C, H, W]`` (tensor or array) or a Dataset of them, in batches."""
        if not isinstance(images, torch.utils.data.Dataset):
            images = UInt8ImageDataset(as_uint8_images(images))
        parts = [self(torch.stack([images[i] for i in range(s, min(s + batch_size, len(images)))]))
                 for s in range(0, len(images), batch_size)]
        return {m: torch.cat([p[m] for p in parts]) for m in self.metrics}


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (1/(N-1), as EDM's ``fid.py``) of features ``[N, D]``, in
    float64 (``fid_features_to_statistics`` on float64 features, as EDM accumulates)."""
    f = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got {tuple(f.shape)}")
    stats = fid_features_to_statistics(f.detach().cpu().to(torch.float64))
    return np.asarray(stats["mu"], dtype=np.float64), np.atleast_2d(np.asarray(stats["sigma"], dtype=np.float64))


def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (``fid_statistics_to_metric``, float64)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
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
    """Improved precision/recall (Kynkaanniemi et al. 2019) of features ``[N, D]`` vs ``[M, D]`` via
    ``prc_features_to_metric`` (batch-wise); ``{'precision', 'recall', 'f_score'}``."""
    g, r = (torch.as_tensor(f, dtype=torch.float32).to(device or "cpu") for f in (generated_features, reference_features))
    return _short(prc_features_to_metric(g, r, prc_neighborhood=neighborhood, prc_batch_size=batch_size,
                                         save_cpu_ram=True, verbose=False))
