"""Pipeline helpers: params validation, smoke isolation, reports, and resumable teacher training."""
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from sidlib import pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repository_params_are_valid(params):
    assert pipeline.validate_params(copy.deepcopy(params)) == params
    for b in params["run"]["benchmarks"]:
        assert b in pipeline.EMBEDDED_BENCHMARKS


@pytest.mark.parametrize("mutate, key", [
    (lambda p: p["digits"]["teacher"].__setitem__("iterations", "many"), "digits.teacher.iterations"),
    (lambda p: p["digits"]["distill"].__setitem__("lr", -1.0), "digits.distill.lr"),
    (lambda p: p["toy2d"]["distill"].__setitem__("alphas", []), "toy2d.distill.alphas"),
    (lambda p: p["toy2d"]["data"].__setitem__("modes", 8), "toy2d.data.modes"),
    (lambda p: p["digits"]["eval"].__setitem__("nfe", [1, 4]), "digits.eval.nfe"),
    (lambda p: p["digits"]["teacher"].__setitem__("variants", ["uncond", "colour"]), "digits.teacher.variants[1]"),
    (lambda p: p["digits"]["distill"].pop("glr"), "digits.distill.glr"),
    (lambda p: p["run"].__setitem__("benchmarks", ["toy2d", "mnist"]), "mnist"),
    (lambda p: p["digits"].__setitem__("teacher", [1, 2]), "digits.teacher"),
    (lambda p: p["digits"]["distill"].__setitem__("batch", True), "digits.distill.batch"),
])
def test_malformed_entries_name_the_key(params, mutate, key):
    bad = copy.deepcopy(params)
    mutate(bad)
    with pytest.raises(pipeline.ParamsError) as e:
        pipeline.validate_params(bad)
    assert key in str(e.value)


def test_other_sections_pass_through(params):
    p = copy.deepcopy(params)
    p["paper"] = {"anything": {"goes": [1, 2]}}
    assert pipeline.validate_params(p)["paper"] == {"anything": {"goes": [1, 2]}}


def test_unknown_benchmark_and_missing_file(params, tmp_path):
    with pytest.raises(pipeline.ParamsError, match="unknown benchmark 'cifar99'"):
        pipeline.benchmark_params(params, "cifar99")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        pipeline.load_params(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("run: [unclosed\n")
    with pytest.raises(pipeline.ParamsError, match="broken.yaml"):
        pipeline.load_params(tmp_path / "broken.yaml")


def test_smoke_mode_never_writes_into_reports(params, tmp_path, monkeypatch):
    monkeypatch.setenv("SIDLIB_SMOKE", "1")
    monkeypatch.setenv("SIDLIB_SMOKE_DIR", str(tmp_path / "smoke"))
    paths = pipeline.get_paths(params, root=tmp_path / "repo")
    assert paths.smoke and tmp_path / "smoke" in paths.reports.parents
    assert not (tmp_path / "repo" / "reports").exists()
    small = pipeline.benchmark_params(params, "digits")
    assert small["teacher"]["iterations"] < params["digits"]["teacher"]["iterations"]
    monkeypatch.setenv("SIDLIB_SMOKE", "0")
    assert not pipeline.is_smoke()
    assert pipeline.get_paths(params, root=tmp_path / "repo").reports == tmp_path / "repo" / "reports"


def test_tables_and_json(tmp_path):
    rows = [{"model": "teacher", "nfe": 35, "fid": 12.3456789}, {"model": "student", "nfe": 1, "fid": float("nan")}]
    csv_path, md_path = pipeline.write_table(tmp_path / "t", rows, title="T")
    assert csv_path.read_text().splitlines()[0] == "model,nfe,fid"
    md = md_path.read_text()
    assert "| teacher | 35 | 12.35 |" in md and "| student | 1 |  |" in md
    j = pipeline.write_json(tmp_path / "m.json", {"fid": float("inf"), "x": torch.tensor(2.5)})
    assert json.loads(j.read_text()) == {"fid": None, "x": 2.5}
    s = pipeline.summarise_metric([3.0, None, 1.0, 2.0, float("nan")])
    assert s == {"min": 1.0, "median": 2.0, "mean": 2.0, "max": 3.0, "count": 3}


def _double(x):
    return 2 * x


def test_run_parallel_keeps_order():
    assert pipeline.run_parallel(_double, [{"x": i} for i in range(3)], workers=1) == [0, 2, 4]


@pytest.mark.slow
def test_run_parallel_in_processes():
    assert pipeline.run_parallel(_double, [{"x": i} for i in range(3)], workers=2) == [0, 2, 4]


def test_teacher_training_resumes_to_the_same_weights(tmp_path):
    from sidlib.teacher_training import TeacherConfig, train_teacher
    from sidlib.checkpoints import load_checkpoint

    torch.set_num_threads(1)
    x = torch.rand(40, 1, 8, 8) * 2 - 1
    y = torch.randint(10, (40,))
    cfg = TeacherConfig(label_dim=10, model_channels=16, num_blocks=1, iterations=4, batch=4, checkpoint_every=2,
                        log_every=1, warmup_iterations=2)
    whole = train_teacher(cfg, tmp_path / "whole", x, y)
    # Interrupted after the first checkpoint (max_seconds=0 stops there), then resumed.
    part = train_teacher(cfg, tmp_path / "part", x, y, max_seconds=0)
    assert part.name == "training-state.pt"
    assert [r["iteration"] for r in map(json.loads, (tmp_path / "part" / "log.jsonl").read_text().splitlines())] == [1, 2]
    done = train_teacher(cfg, tmp_path / "part", x, y)
    a, _ = load_checkpoint(whole)
    b, meta = load_checkpoint(done)
    assert meta["iterations"] == 4
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), k
    logs = [r["iteration"] for r in map(json.loads, (tmp_path / "part" / "log.jsonl").read_text().splitlines())]
    assert logs == [1, 2, 3, 4]
    # A finished run is reused, and a changed config is refused rather than silently mixed.
    assert train_teacher(cfg, tmp_path / "part", x, y) == done
    (tmp_path / "part" / "network.json").unlink()
    with pytest.raises(ValueError, match="different teacher config"):
        train_teacher(TeacherConfig(**{**cfg.__dict__, "lr": 1e-4}), tmp_path / "part", x, y)
