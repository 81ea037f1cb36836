"""sidlib.metrics: torch-fidelity wrapper, checked against independent numpy/scipy computations. CPU, no network."""

import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from torch import nn
from torch_fidelity import registry as tf_registry

sys.path.insert(0, str(Path(__file__).parent))
import eval_fixtures as ef  # noqa: E402  (registers the tiny extractor)

from sidlib import metrics as M  # noqa: E402
from sidlib.metrics import fidelity as MF  # noqa: E402


def frechet_scipy(mu1, s1, mu2, s2):
    """Independent Frechet distance: ||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_spd(d, rng):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def tiny_features(images):
    """Features of the tiny extractor computed by calling its module directly (not through sidlib)."""
    fe = ef.TinyInception(ef.TINY, ["pool"])
    with torch.no_grad():
        return fe(images)[0].double().numpy()


def test_fid_from_statistics_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (1, 5, 16):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(d, rng), random_spd(d, rng)
        got = M.fid_from_statistics(mu1, s1, mu2, s2)
        assert got == pytest.approx(frechet_scipy(mu1, s1, mu2, s2), rel=1e-7, abs=1e-9)
        assert M.fid_from_statistics(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-7)
        assert M.fid_from_statistics(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)


def test_fid_from_statistics_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma shapes"):
        M.fid_from_statistics(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu shapes"):
        M.fid_from_statistics(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))


def test_feature_statistics_is_mean_and_unbiased_covariance():
    f = np.random.default_rng(1).standard_normal((50, 7)).astype(np.float32)
    mu, sigma = M.feature_statistics(torch.from_numpy(f))
    f64 = f.astype(np.float64)
    np.testing.assert_allclose(mu, f64.mean(0), rtol=1e-12, atol=1e-12)
    centred = f64 - f64.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(f) - 1), rtol=1e-10, atol=1e-12)
    assert mu.dtype == np.float64 and sigma.shape == (7, 7)


def test_compute_metrics_fid_equals_independent_frechet_of_features():
    gen, ref = ef.random_images(40, seed=0), ef.random_images(60, seed=1, shift=40)
    out = M.compute_metrics(gen, ref, feature_extractor=ef.TINY)
    fg, fr = tiny_features(gen), tiny_features(ref)
    expected = frechet_scipy(fg.mean(0), np.cov(fg, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))
    assert out["fid"] == pytest.approx(expected, rel=1e-4)
    assert set(out) == {"fid"}


def test_stats_reference_gives_the_same_fid_as_image_reference():
    gen, ref = ef.random_images(30, seed=2), ef.random_images(45, seed=3, shift=20)
    via_images = M.compute_metrics(gen, ref, feature_extractor=ef.TINY)["fid"]
    with M.FeatureExtractor(ef.TINY, ["fid"]) as fe:
        mu, sigma = M.feature_statistics(fe.extract(ref)["fid"])
    via_stats = M.compute_metrics(gen, {"mu": mu, "sigma": sigma}, feature_extractor=ef.TINY)["fid"]
    assert via_stats == pytest.approx(via_images, rel=1e-5)
    with pytest.raises(ValueError, match="only supports FID"):
        M.compute_metrics(gen, {"mu": mu, "sigma": sigma}, feature_extractor=ef.TINY, kid=True)


def test_identical_sets_give_zero_fid_and_full_precision_recall():
    x = ef.random_images(30, seed=4)
    out = M.compute_metrics(x, x.clone(), feature_extractor=ef.TINY, kid=True, prc=True, isc=True)
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    shifted = M.compute_metrics(x, ef.random_images(30, seed=5, shift=60), feature_extractor=ef.TINY, kid=True)
    assert abs(out["kid_mean"]) < 0.1 * shifted["kid_mean"]
    assert {"isc_mean", "isc_std", "kid_std", "f_score"} <= set(out)


def test_inception_score_matches_definition_with_one_split():
    logits = torch.from_numpy(np.random.default_rng(2).standard_normal((20, 5)))
    got = M.inception_score(logits, splits=1)["isc_mean"]
    p = torch.softmax(logits, 1).numpy()
    q = p.mean(0)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    assert got == pytest.approx(expected, rel=1e-9)


def test_inputs_must_be_uint8_nchw():
    with pytest.raises(TypeError, match="uint8"):
        M.compute_metrics(torch.rand(4, 3, 8, 8), ef.random_images(4), feature_extractor=ef.TINY)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        M.compute_metrics(ef.random_images(4)[:, 0], ef.random_images(4), feature_extractor=ef.TINY)


def test_grayscale_is_tiled_to_rgb_only_for_inception():
    g = ef.random_images(2, channels=1)
    tiled = MF._tile_gray(g, M.INCEPTION)
    assert tiled.shape[1] == 3 and torch.equal(tiled[:, 0], tiled[:, 2])
    assert MF._tile_gray(g, ef.TINY).shape[1] == 1


# --- registration ------------------------------------------------------------------------------------------------------

def test_torch_fidelity_itself_refuses_a_second_registration():
    with pytest.raises(ValueError, match="already registered"):
        torch_fidelity.register_feature_extractor(ef.TINY, ef.TinyInception)


def test_register_is_idempotent_and_replaces_only_when_allowed():
    name = "test-idempotent-extractor"
    a = M.register_feature_extractor(name, ef.TinyInception)
    assert M.register_feature_extractor(name, ef.TinyInception) is a
    assert tf_registry.FEATURE_EXTRACTORS_REGISTRY[name] is ef.TinyInception

    class Other(ef.TinyInception):
        pass

    with pytest.raises(ValueError, match="already registered"):
        M.register_feature_extractor(name, Other, replace=False)
    M.register_feature_extractor(name, Other)
    assert tf_registry.FEATURE_EXTRACTORS_REGISTRY[name] is Other
    with pytest.raises(ValueError, match="cannot be replaced"):
        M.register_feature_extractor(M.INCEPTION, Other)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.ReLU())
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.body(x.float() / 127.5 - 1))


def test_module_extractor_wraps_a_plain_module_without_touching_it():
    net = SmallNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    name = "test-module-extractor"
    cls = M.register_feature_extractor(name, net)
    assert tf_registry.FEATURE_EXTRACTORS_REGISTRY[name] is cls
    # One feature, "features", for every metric.
    assert cls.get_provided_features_list() == ("features",)
    assert {cls.get_default_feature_layer_for_metric(m) for m in ("fid", "kid", "prc", "isc")} == {"features"}
    x = ef.random_images(12, seed=7)
    with M.FeatureExtractor(name, ["fid", "isc"]) as fe:
        feats = fe(x)
    with torch.no_grad():
        expected = net(x)
    # The features are the module's output, whatever the metric.
    torch.testing.assert_close(feats["fid"], expected)
    torch.testing.assert_close(feats["isc"], expected)
    # torch-fidelity's eval()/requires_grad_(False) went to a copy: the caller's module is as it was.
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    out = M.compute_metrics(x, ef.random_images(20, seed=8), feature_extractor=name, kid=True, prc=True)
    assert np.isfinite(out["fid"]) and 0 <= out["precision"] <= 1


def test_a_non_module_extractor_is_refused():
    for bad in (lambda *a, **k: SmallNet(), 3, "SmallNet", SmallNet):  # factories and classes are not modules
        with pytest.raises(TypeError, match="nn.Module"):
            M.register_feature_extractor("test-bad-extractor", bad)
        with pytest.raises(TypeError, match="nn.Module"):
            M.module_extractor(bad)
    assert not M.is_registered("test-bad-extractor")


def test_unregistered_extractor_is_named_in_the_error():
    with pytest.raises(ValueError, match="not registered"):
        M.FeatureExtractor("no-such-extractor", ["fid"])


# --- Inception weights -------------------------------------------------------------------------------------------------

def test_missing_inception_weights_error_names_file_and_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected_path = tmp_path / "torch-home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert M.inception_weights_path() == expected_path
    with pytest.raises(M.InceptionWeightsMissing) as err:
        M.compute_metrics(ef.random_images(4), ef.random_images(4))
    msg = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert str(expected_path.parent) in msg and M.INCEPTION_WEIGHTS_URL in msg
    assert not expected_path.exists()


def test_present_inception_weights_are_found_without_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    path = M.inception_weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"placeholder")
    assert M.ensure_inception_weights() == path
