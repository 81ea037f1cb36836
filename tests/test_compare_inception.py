"""benchmarks/compare_inception.py: its arithmetic, its detector loading and its skip without the files (the GPU
comparison itself needs EDM's detector pickle and the network)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_inception.py"


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("compare_inception", _PATH)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_skips_with_a_message_without_the_detector(mod, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(mod.DETECTOR_ENV, raising=False)
    assert mod.main([]) == 0
    assert capsys.readouterr().out.startswith("skipped: EDM's detector pickle not found")
    assert mod.main(["--detector", str(tmp_path / "nope.pkl")]) == 0
    assert "skipped" in capsys.readouterr().out


def test_comparison_of_two_feature_sets(mod):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 8))
    b = a + 1e-3 * rng.standard_normal((300, 8))
    mu, sigma = np.zeros(8), np.eye(8)
    same = mod.compare(a, a, mu, sigma)
    assert same["max_abs_feature_diff"] == 0 and same["fid_torch_fidelity"] == same["fid_edm_detector"]
    assert abs(same["frechet_between_extractors"]) < 1e-6
    r = mod.compare(a, b, mu, sigma)
    assert r["max_abs_feature_diff"] == pytest.approx(np.abs(a - b).max())
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert r["frechet_between_extractors"] == pytest.approx(want, abs=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # EDM's detector is TorchScript
def test_a_torchscript_detector_is_loaded_and_called_as_edm_does(mod, tmp_path):
    class Detector(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.float().mean(dim=(2, 3))

    torch.jit.save(torch.jit.script(Detector()), str(tmp_path / "det.pt"))
    det = mod.load_detector(str(tmp_path / "det.pt"))
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(det(x, return_features=True), x.float().mean(dim=(2, 3)))
