"""The benchmark scripts: their own arithmetic, their argument checks and a tiny in-process run (the real
measurements need minutes and are not unit-tested)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_extrapolation_line_matches_least_squares():
    mod = _load("bench_preset_memory")
    xs, ys = [1, 2, 4], [3.1, 3.9, 6.2]
    intercept, slope = mod.fit_line(xs, ys)
    ref_slope, ref_intercept = np.polyfit(xs, ys, 1)
    assert slope == pytest.approx(ref_slope)
    assert intercept == pytest.approx(ref_intercept)


def test_memory_extrapolation_needs_two_batch_sizes():
    mod = _load("bench_preset_memory")
    with pytest.raises(ValueError, match="two different batch sizes"):
        mod.fit_line([2, 2], [1.0, 1.1])


def test_unknown_preset_is_refused_before_any_measurement(capsys, monkeypatch):
    mod = _load("bench_preset_memory")
    monkeypatch.setattr(mod, "_spawn", lambda *a, **k: pytest.fail("nothing may be measured"))
    with pytest.raises(SystemExit):
        mod.main(["--presets", "cifar10-uncond", "cifar100-uncond"])
    err = capsys.readouterr().err
    assert "'cifar100-uncond'" in err
    assert "cifar10-uncond" in err.replace("cifar100-uncond", "")  # the valid names are listed


def test_network_benchmark_builds_the_paper_architectures():
    from sidlib.networks import PAPER_NETWORKS

    mod = _load("bench_networks")
    expected = {"cifar10-ddpmpp": "cifar10-uncond", "imagenet64-adm": "imagenet64-cond"}
    for arch, paper_name in expected.items():
        with torch.device("meta"):
            net = mod.EDMPrecond(**mod.ARCHS[arch])
        assert sum(p.numel() for p in net.parameters()) == PAPER_NETWORKS[paper_name]["parameters"]


def test_sid_iteration_benchmark_runs_the_tiny_architecture_in_process():
    from sidlib.networks import EDMPrecond

    mod = _load("bench_sid_iteration")
    args = mod.argparse.Namespace(arch="tiny", batch=2, iters=1, device="cpu", precision="fp32",
                                  channels_last=False, attention=None, fused_adam=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: one thread avoids oversubscription on a shared CPU
    try:
        ref = mod.part_reference(args)
        sid = mod.part_sid(args)
    finally:
        torch.set_num_threads(previous)
    assert ref["sec_fwd_bwd"] > 0
    assert ref["params"] == sum(p.numel() for p in EDMPrecond(**mod._archs()["tiny"]).parameters())
    assert sid["sec_per_iter"] > 0 and sid["images_per_sec"] > 0 and sid["iterations_timed"] == 1


def test_digits_sweep_parses_yaml_values_and_refuses_a_bad_key_before_any_run(monkeypatch, tmp_path):
    mod = _load("digits_sweep")
    assert mod.parse_sets(["glr=2.0e-4", "g_init={pairs: 10, steps: 2}", "g_init=null"]) == {
        "glr": 2.0e-4, "g_init": None}
    assert mod.parse_sets(["g_init={pairs: 10, steps: 2}"]) == {"g_init": {"pairs": 10, "steps": 2}}
    with pytest.raises(SystemExit, match="key=value"):
        mod.parse_sets(["glr"])
    import experiments.common.parallel as parallel
    from experiments.common.params import ParamsError

    monkeypatch.setattr(parallel, "run_parallel", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(ParamsError, match="glrr"):
        mod.main(["--set", "glrr=1.0", "--checkpoints", str(tmp_path / "sweep")])
    with pytest.raises(ParamsError, match="digits.distill.glr"):
        mod.main(["--set", "glr=-1.0", "--checkpoints", str(tmp_path / "sweep")])
    assert not (tmp_path / "sweep").exists()  # nothing written


def test_digits_sweep_refuses_a_pipeline_grid_with_several_values(monkeypatch, tmp_path):
    mod = _load("digits_sweep")
    import experiments.common.params as params

    real = params.load_params

    def several_lrs(*a, **k):
        p = real(*a, **k)
        p["digits"]["runs"][0]["lr"] = [1e-4, 3e-4]
        return p

    monkeypatch.setattr(params, "load_params", several_lrs)
    with pytest.raises(SystemExit, match="several values of lr"):
        mod.main(["--variant", "uncond", "--checkpoints", str(tmp_path / "sweep")])
    assert not (tmp_path / "sweep").exists()


def test_noise_seed_sets_are_disjoint_and_miss_the_pipeline_seeds():
    from experiments.digits.bench import EVAL_SEEDS

    mod = _load("fid_noise_digits")
    sets = [set(mod.seed_set(k, 100_000)) for k in range(3)]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert all(min(s) > EVAL_SEEDS + 100_000 for s in sets) and mod.seed_set(1, 3) == [5_100_000, 5_100_001, 5_100_002]
