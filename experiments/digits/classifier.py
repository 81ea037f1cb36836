"""A small digit classifier whose penultimate features replace Inception for the 8x8 digits benchmark.

Inception features of 8x8 images upsampled to 299x299 say little about digits; a classifier trained on the same
data does. FID/KID/precision/recall for digits are therefore computed in the 128-d penultimate layer of
:class:`DigitClassifier` (conv32 -> conv64 -> maxpool -> fc128 -> fc10), registered with torch-fidelity as a
feature extractor (see :func:`register_digits_extractor`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sidlib.io.atomic import atomic_path, atomic_write_text
from sidlib.metrics import register_feature_extractor

__all__ = ["DigitClassifier", "train_classifier", "accuracy", "save_classifier", "load_classifier",
           "register_digits_extractor", "EXTRACTOR_NAME", "FEATURE_DIM"]

FEATURE_DIM = 128
EXTRACTOR_NAME = "digits-classifier"


class DigitClassifier(nn.Module):
    """``[N, 1, 8, 8]`` images -> logits ``[N, 10]``.

    Accepts float images in [-1, 1] or uint8 images in 0..255 (what torch-fidelity hands to feature extractors).
    ``features(x)`` returns the ``[N, 128]`` penultimate activations used for FID.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.init_kwargs = dict(channels=[int(c1), int(c2)], feature_dim=int(feature_dim), num_classes=int(num_classes))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.25)

    @staticmethod
    def _prepare(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        return x.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(self._prepare(x)))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> float:
    """Fraction of ``images`` ``[N, 1, 8, 8]`` whose arg-max class equals ``labels`` ``[N]``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    model.train(was_training)
    return correct / max(len(images), 1)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Predicted classes ``[N]`` of float or uint8 images ``[N, 1, 8, 8]``."""
    model.eval()
    return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, *, epochs: int = 40, batch: int = 64,
                     lr: float = 1e-3, seed: int = 0, shift_augment: bool = True) -> tuple[DigitClassifier, dict]:
    """Train :class:`DigitClassifier` with Adam on ``[N, 1, 8, 8]`` images in [-1, 1]; deterministic given ``seed``.

    shift_augment: random one-pixel translations, so the features do not depend on exact pixel registration.
    Returns (model in eval mode, info dict with seconds and final training loss).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(train_images)
    t0 = time.perf_counter()
    loss = torch.tensor(0.0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            x = train_images[idx]
            if shift_augment:
                dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
                # Pad with the background value (-1) before shifting, so no digit stroke wraps around.
                x = F.pad(x, (1, 1, 1, 1), value=-1.0)[:, :, 1 + dy:9 + dy, 1 + dx:9 + dx]
            loss = F.cross_entropy(model(x), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model, {"seconds": time.perf_counter() - t0, "final_loss": float(loss.item()), "epochs": epochs}


def save_classifier(path: str | Path, model: DigitClassifier, meta: dict | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` (init kwargs + meta); returns the ``.safetensors`` path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix("")
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {"format": "sidlib-classifier/1", "init_kwargs": model.init_kwargs, "meta": meta or {}}, indent=2))
    return path.with_suffix(".safetensors")


def load_classifier(path: str | Path) -> tuple[DigitClassifier, dict]:
    """Inverse of :func:`save_classifier`: (model in eval mode, meta). Raises FileNotFoundError naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix("")
    weights, sidecar = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for f in (weights, sidecar):
        if not f.is_file():
            raise FileNotFoundError(f"digit classifier checkpoint not found: {f} (run the classifier/teacher stage first)")
    info = json.loads(sidecar.read_text())
    model = DigitClassifier(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["init_kwargs"].items()})
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), info.get("meta", {})


class _Features(nn.Module):
    """Exposes only the penultimate features of a classifier (what the FID extractor should see)."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, x):
        return self.classifier.features(x)


def register_digits_extractor(classifier_or_path, name: str = EXTRACTOR_NAME) -> str:
    """Register the classifier's 128-d features with torch-fidelity under ``name`` (idempotent); returns the name.

    classifier_or_path: a :class:`DigitClassifier` or a checkpoint path written by :func:`save_classifier`.
    torch-fidelity hands the extractor uint8 ``[N, 1, 8, 8]`` batches, which the classifier accepts directly.
    """
    model = classifier_or_path if isinstance(classifier_or_path, nn.Module) else load_classifier(classifier_or_path)[0]
    register_feature_extractor(name, _Features(model))
    return name
