"""digits: fixed split, value range, and the feature classifier."""
from pathlib import Path

import numpy as np
import pytest
import torch

from sidlib import digits
from sidlib.classifier import DigitClassifier, accuracy, load_classifier, save_classifier, train_classifier


def test_split_is_deterministic_disjoint_and_complete():
    a_tr, a_te = digits.split_indices()
    b_tr, b_te = digits.split_indices()
    assert np.array_equal(a_tr, b_tr) and np.array_equal(a_te, b_te)
    assert len(a_tr) == 1400 and len(a_te) == 397
    assert not set(a_tr) & set(a_te)
    assert set(a_tr) | set(a_te) == set(range(1797))
    assert not np.array_equal(digits.split_indices(seed=1)[1], a_te)  # the seed matters


def test_loaded_split_matches_indices_and_range():
    sp = digits.load_digits_split()
    assert sp.train_images.shape == (1400, 1, 8, 8) and sp.test_images.shape == (397, 1, 8, 8)
    assert sp.train_images.dtype == torch.float32
    assert sp.train_images.min() == -1.0 and sp.train_images.max() == 1.0
    from sklearn.datasets import load_digits
    raw = load_digits()
    i = int(sp.test_index[5])
    assert torch.allclose(sp.test_images[5, 0], torch.from_numpy(raw.images[i] / 8.0 - 1.0).float())
    assert int(sp.test_labels[5]) == int(raw.target[i])
    assert set(sp.test_labels.tolist()) == set(range(10))  # every class is in the reference set


def test_uint8_round_trip():
    sp = digits.load_digits_split()
    u = digits.to_uint8(sp.test_images)
    assert u.dtype == torch.uint8 and u.min() == 0 and u.max() == 255
    assert (digits.from_uint8(u) - sp.test_images).abs().max() <= 1 / 127.5 + 1e-6


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="num_train"):
        digits.split_indices(num_train=1797)


def test_classifier_features_and_uint8_input():
    model = DigitClassifier().eval()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert model.features(x).shape == (4, 128) and model(x).shape == (4, 10)
    u = digits.to_uint8(x)
    assert torch.allclose(model.features(u), model.features(digits.from_uint8(u)))


def test_classifier_learns_and_round_trips(tmp_path):
    sp = digits.load_digits_split()
    model, info = train_classifier(sp.train_images, sp.train_labels, epochs=3, seed=0)
    acc = accuracy(model, sp.test_images, sp.test_labels)
    assert acc > 0.8  # three epochs already separate the classes far above chance (0.1)
    path = save_classifier(tmp_path / "clf", model, {"test_accuracy": acc})
    loaded, meta = load_classifier(path)
    assert meta["test_accuracy"] == acc
    assert torch.equal(loaded.features(sp.test_images[:8]), model.features(sp.test_images[:8]))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_classifier(tmp_path / "missing")


def test_recorded_paths_are_relative_inside_the_working_directory(tmp_path, monkeypatch):
    from sidlib.digits import _shown_path

    inside = tmp_path / "checkpoints" / "digits" / "network.safetensors"
    monkeypatch.chdir(tmp_path)
    assert _shown_path(inside) == str(Path("checkpoints") / "digits" / "network.safetensors")
    outside = tmp_path.parent / "elsewhere.safetensors"
    assert _shown_path(outside) == str(outside)
