"""The benchmark scripts' own arithmetic (the measurements themselves need minutes and are not unit-tested)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_preset_memory.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_preset_memory", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_extrapolation_line_matches_least_squares():
    mod = _load()
    xs, ys = [1, 2, 4], [3.1, 3.9, 6.2]
    intercept, slope = mod.fit_line(xs, ys)
    ref_slope, ref_intercept = np.polyfit(xs, ys, 1)
    assert slope == pytest.approx(ref_slope)
    assert intercept == pytest.approx(ref_intercept)


def test_memory_extrapolation_needs_two_batch_sizes():
    mod = _load()
    with pytest.raises(ValueError, match="two different batch sizes"):
        mod.fit_line([2, 2], [1.0, 1.1])


def test_unknown_preset_is_refused_before_any_measurement(capsys):
    mod = _load()
    with pytest.raises(SystemExit):
        mod.main(["--presets", "cifar100-uncond"])
    err = capsys.readouterr().err
    assert "unknown benchmark 'cifar100-uncond'" in err
    assert "valid benchmarks: cifar10-uncond" in err
