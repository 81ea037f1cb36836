"""The pipeline around the benchmarks: params loading and validation (every bad input named by its full key before
anything is written), smoke isolation, the run grid, the DVC -> papermill hand-over, DVC's view of both pipelines,
reports, parallel workers and resumable teacher training."""
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from experiments.common import params as P
from experiments.common.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
REPO_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
REPO_SMOKE = yaml.safe_load((ROOT / "params-smoke.yaml").read_text())


def env_without_smoke(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("SIDLIB_SMOKE", "SIDLIB_SMOKE_DIR")}
    env["PATH"] = str(ROOT / ".venv" / "bin") + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def write_params(folder: Path, mutate=None, smoke_mutate=None) -> Path:
    """A modified copy of the repository's params.yaml (and params-smoke.yaml beside it) in ``folder``."""
    p, s = copy.deepcopy(REPO_PARAMS), copy.deepcopy(REPO_SMOKE)
    if mutate:
        mutate(p)
    if smoke_mutate:
        smoke_mutate(s)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params-smoke.yaml").write_text(yaml.safe_dump(s, sort_keys=False))
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def setter(*keys, value=None, delete=False):
    """``p[k0][k1]...[kn] = value`` (or delete it); integer keys index lists."""
    def mutate(p):
        d = p
        for k in keys[:-1]:
            d = d[k]
        if delete:
            del d[keys[-1]]
        else:
            d[keys[-1]] = copy.deepcopy(value)
    return mutate


# ---- the repository's params -----------------------------------------------------------------------------------------

def test_repository_params_are_valid_in_both_modes():
    full = load_params(ROOT / "params.yaml", smoke=False)
    assert full == REPO_PARAMS  # validation adds and changes nothing
    smoke = load_params(ROOT / "params.yaml", smoke=True)
    from experiments.common.benchmark import BENCHMARKS
    assert set(full["run"]["benchmarks"]) <= set(BENCHMARKS)
    assert smoke["digits"]["teacher"]["iterations"] < full["digits"]["teacher"]["iterations"]


def test_missing_broken_and_non_mapping_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("run: [unclosed\n")
    with pytest.raises(ParamsError, match="broken.yaml"):
        load_params(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="list.yaml"):
        load_params(tmp_path / "list.yaml")
    # Smoke mode needs the overlay beside the file.
    (tmp_path / "alone").mkdir()
    shutil.copy(ROOT / "params.yaml", tmp_path / "alone" / "params.yaml")
    with pytest.raises(FileNotFoundError, match="params-smoke.yaml"):
        load_params(tmp_path / "alone" / "params.yaml", smoke=True)


# ---- every bad input is refused, naming its full key ---------------------------------------------------------------

TWICE = [{"alpha": [1.2, 1.5], "seed": [0]}, {"alpha": [1.2], "seed": [0]}]

BAD = [
    (setter("digits", "distill", "alpha", value=100), "digits.distill.alpha"),
    (setter("digits", "distill", "ema_rampup", value=0), "digits.distill.ema_rampup"),
    (setter("digits", "distill", "init_sigma", value=5000), "digits.distill.init_sigma"),
    (setter("digits", "data", "num_train", value=1797), "digits.data.num_train"),
    (setter("digits", "teacher", "channel_mult", value=[1, 2, 2, 2, 2]), "digits.teacher.channel_mult"),
    (setter("digits", "teacher", "attn_resolutions", value=[3]), "digits.teacher.attn_resolutions"),
    (setter("digits", "runs", 0, "variant", value=["uncond", "cond", "uncond"]), "digits.runs"),
    (setter("digits", "runs", 1, "variant", value=["colour"]), "digits.runs"),
    (setter("run", "benchmarks", value=["toy2d", "digits", "toy2d"]), "run.benchmarks"),
    (setter("run", "benchmarks", value=["toy2d", "mnist"]), "mnist"),
    (setter("run", "workers", value=0), "run.workers"),
    (setter("digits", "distill", "batch", value=0), "digits.distill.batch"),
    (setter("digits", "distill", "batch", value=-64), "digits.distill.batch"),
    (setter("digits", "distill", "batch", value=True), "digits.distill.batch"),
    (setter("digits", "distill", "lr", value=-1.0), "digits.distill.lr"),
    (setter("digits", "teacher", "iterations", value="many"), "digits.teacher.iterations"),
    (setter("digits", "teacher", value=[1, 2]), "digits.teacher"),
    (setter("digits", "eval", delete=True), "digits.eval"),
    (setter("digits", "eval", "nfe", value=[1, 4]), "digits.eval.nfe"),
    (setter("toy2d", "eval", "nfe", value=[4]), "toy2d.eval.nfe"),
    (setter("toy2d", "data", "std", value=-0.1), "toy2d.data.std"),
    # unknown keys, level by level
    (setter("run", "worker", value=2), "run.worker"),
    (setter("toy2d", "distil", value={}), "toy2d.distil"),
    (setter("toy2d", "data", "modes", value=8), "toy2d.data.modes"),
    (setter("toy2d", "teacher", "sampler", value="heun"), "toy2d.teacher.sampler"),
    (setter("toy2d", "eval", "nfes", value=[1]), "toy2d.eval.nfes"),
    (setter("toy2d", "distill", "g_init", "pair", value=10), ("toy2d.distill.g_init", "pair")),
    (setter("digits", "teacher", "iters", value=10), "digits.teacher.iters"),
    (setter("digits", "teacher", "classifier", "epoch", value=1), "digits.teacher.classifier.epoch"),
    (setter("digits", "distill", "alhpa", value=1.0), "digits.distill.alhpa"),
    # the run grids
    (setter("digits", "runs", 0, "alhpa", value=[1.0]), "digits.runs[0].alhpa"),
    (setter("toy2d", "runs", 0, "alhpa", value=[1.0]), "toy2d.runs[0].alhpa"),
    (setter("digits", "runs", 1, "alpha", value=[100]), "digits.runs"),
    (setter("digits", "runs", 0, "seed", value=3), "digits.runs"),
    (setter("toy2d", "runs", 1, "start", value=["sideways"]), "toy2d.runs.start"),
    (setter("toy2d", "runs", value=TWICE), "toy2d.runs"),
    (setter("toy2d", "runs", value=[TWICE[1], TWICE[1]]), "toy2d.runs"),
]


@pytest.mark.parametrize("mutate, key", BAD, ids=[str(k) + f"#{i}" for i, (_, k) in enumerate(BAD)])
def test_a_bad_entry_is_refused_naming_its_full_key(tmp_path, mutate, key):
    path = write_params(tmp_path, mutate)
    with pytest.raises(ParamsError) as err:
        load_params(path, smoke=False)
    for part in (key if isinstance(key, tuple) else (key,)):
        assert part in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params-smoke.yaml", "params.yaml"]  # nothing written


def test_an_unknown_top_level_key_is_refused(tmp_path):
    path = write_params(tmp_path, setter("digitz", value={"distill": {"alpha": 1.0}}))
    with pytest.raises(ParamsError, match="digitz"):
        load_params(path, smoke=False)


def test_an_unknown_student_key_is_refused_before_anything_is_written(tmp_path):
    path = write_params(tmp_path, setter("toy2d", "distill", "student", "num_layerz", value=2))
    with pytest.raises(ParamsError, match=r"toy2d\.distill\.student"):
        load_params(path, smoke=False)


def test_a_student_that_is_not_a_mapping_is_refused_naming_the_key(tmp_path):
    path = write_params(tmp_path, setter("toy2d", "distill", "student", value=3))
    with pytest.raises(ParamsError, match=r"toy2d\.distill\.student"):
        load_params(path, smoke=False)


def test_two_grids_giving_the_same_config_are_refused(tmp_path):
    same = [{"alpha": [1.2], "seed": [0]}, {"alpha": [1.2], "seed": [0], "start": ["teacher-sampler"]}]
    path = write_params(tmp_path, setter("toy2d", "runs", value=same))
    with pytest.raises(ParamsError, match=r"toy2d\.runs"):
        load_params(path, smoke=False)


def test_the_smoke_overlay_is_validated_too(tmp_path):
    path = write_params(tmp_path, smoke_mutate=setter("digits", "distill", "alpha", value=100))
    assert load_params(path, smoke=False)["digits"]["distill"]["alpha"] == REPO_PARAMS["digits"]["distill"]["alpha"]
    with pytest.raises(ParamsError, match=r"digits\.distill\.alpha"):
        load_params(path, smoke=True)


def test_a_bad_section_handed_to_a_stage_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from experiments.common.stage import stage_context

    monkeypatch.setenv("SIDLIB_SMOKE", "1")
    monkeypatch.setenv("SIDLIB_SMOKE_DIR", str(tmp_path / "smoke"))
    section = copy.deepcopy(REPO_PARAMS["digits"])
    section["distill"]["alpha"] = 100
    with pytest.raises(ParamsError, match=r"digits\.distill\.alpha"):
        stage_context("distill", "digits", section, REPO_PARAMS["run"])
    teacher_only = {k: copy.deepcopy(REPO_PARAMS["digits"][k]) for k in ("data", "teacher")}  # runs missing
    with pytest.raises(ParamsError, match=r"digits\.runs"):
        stage_context("teacher", "digits", teacher_only, REPO_PARAMS["run"])
    assert not (tmp_path / "smoke").exists()


# ---- smoke mode ------------------------------------------------------------------------------------------------------

def test_smoke_overlay_is_deep_merged(tmp_path, monkeypatch):
    path = write_params(tmp_path)
    monkeypatch.setenv("SIDLIB_SMOKE", "1")
    p = load_params(path)
    g = p["toy2d"]["distill"]["g_init"]
    assert g["pairs"] == REPO_SMOKE["toy2d"]["distill"]["g_init"]["pairs"]  # from the overlay
    assert g["lr"] == REPO_PARAMS["toy2d"]["distill"]["g_init"]["lr"]  # kept: not in the overlay
    assert p["toy2d"]["runs"] == REPO_SMOKE["toy2d"]["runs"]  # lists are replaced, not merged
    assert p["digits"]["teacher"]["classifier"] == {**REPO_PARAMS["digits"]["teacher"]["classifier"], "epochs": 1}
    assert p["digits"]["data"] == REPO_PARAMS["digits"]["data"]
    for off in ("0", "false", "no", ""):
        monkeypatch.setenv("SIDLIB_SMOKE", off)
        assert not P.is_smoke() and load_params(path) == REPO_PARAMS


def test_smoke_outputs_never_go_into_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDLIB_SMOKE", "1")
    monkeypatch.setenv("SIDLIB_SMOKE_DIR", str(tmp_path / "smoke"))
    paths = P.get_paths(root=tmp_path / "repo")
    assert paths.smoke and paths.reports == tmp_path / "smoke" / "reports"
    assert paths.checkpoints == tmp_path / "smoke" / "checkpoints" and paths.metrics.parent == paths.reports
    monkeypatch.setenv("SIDLIB_SMOKE", "0")
    paths = P.get_paths(root=tmp_path / "repo")
    assert not paths.smoke and paths.reports == tmp_path / "repo" / "reports"
    assert paths.checkpoints == tmp_path / "repo" / "checkpoints"
    assert not (tmp_path / "repo").exists() and not (tmp_path / "smoke").exists()  # get_paths creates nothing


# ---- the run grid ----------------------------------------------------------------------------------------------------

def _digits_runs(**distill):
    from experiments.common.runs import expand_runs

    section = copy.deepcopy(REPO_PARAMS["digits"])
    section["distill"].update(distill)
    return expand_runs(section, "digits", extra_keys=("variant",))


def test_run_folders_change_with_the_trajectory_and_not_with_resumable_keys(tmp_path):
    base = {r.name: r.dir(tmp_path) for r in _digits_runs()}
    assert len(set(base.values())) == len(base) == 6
    for key, value in (("alpha", 1.0), ("init_sigma", 2.0), ("tmax", 500), ("g_beta1", 0.5)):
        moved = {r.name: r.dir(tmp_path) for r in _digits_runs(**{key: value})}
        assert all(moved[n] != base[n] for n in base), key
    for key, value in (("duration_kimg", 400), ("tick_kimg", 8), ("snap_ticks", 5), ("progress", True),
                       ("state_ticks", 3)):
        same = {r.name: r.dir(tmp_path) for r in _digits_runs(**{key: value})}
        assert same == base, key
    # The seed is a grid key: every seed has its own folder.
    u0, u1 = ("duration_kimg40-ema_halflife_kimg8-lr0.0003-seed0-uncond",
              "duration_kimg40-ema_halflife_kimg8-lr0.0003-seed1-uncond")
    assert base[u0] != base[u1]


def test_run_names_hold_the_grid_values_and_a_list_of_grids_concatenates():
    from experiments.common.runs import expand_runs

    section = copy.deepcopy(REPO_PARAMS["toy2d"])
    runs = expand_runs(section, "toy2d", extra_keys=("start",))
    grids = section["runs"]
    assert len(runs) == 5 * 3 + 1 * 3
    first = [r for r in runs[:15]]
    assert [(r.point["alpha"], r.point["seed"]) for r in first] == [(a, s) for a in grids[0]["alpha"]
                                                                    for s in grids[0]["seed"]]
    assert all(r.point["start"] == "random" for r in runs[15:])
    for r in runs:
        assert f"seed{r.point['seed']}" in r.name and f"alpha{r.point['alpha']:g}" in r.name
        assert r.config["alpha"] == r.point["alpha"] and r.config["seed"] == r.point["seed"]
        assert ("random" in r.name) == (r.point.get("start") == "random")
    assert len({r.name for r in runs}) == len(runs)
    # A single mapping is one grid.
    section["runs"] = {"alpha": [0.5, 1.0], "seed": [7]}
    assert [r.name for r in expand_runs(section, "toy2d", extra_keys=("start",))] == ["alpha0.5-seed7", "alpha1-seed7"]


# ---- the DVC -> papermill hand-over ----------------------------------------------------------------------------------

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
BENCH_STAGES = ("teacher", "distill", "evaluate", "figures")


@pytest.mark.parametrize("stage", BENCH_STAGES)
def test_each_stage_declares_exactly_the_params_it_hands_over(stage):
    from experiments.common.stage import STAGE_BLOCKS

    do = DVC["stages"][stage]["do"]
    assert DVC["stages"][stage]["foreach"] == "${run.benchmarks}"
    declared = do["params"]
    assert len(declared) == len(set(declared))
    assert set(declared) == {"run"} | {f"${{item}}.{b}" for b in STAGE_BLOCKS[stage]}
    # The command asks the hand-over for this very stage, and runs the notebook the stage depends on.
    cmd = " ".join(do["cmd"].split())
    assert f"python -m experiments.common.stage {stage} ${{item}}" in cmd
    notebook = next(d for d in do["deps"] if d.startswith("notebooks/"))
    assert f"papermill -k python3 {notebook} " in cmd and (ROOT / notebook).is_file()


def test_a_worker_progress_line_reaches_the_terminal_once(tmp_path):
    # The stages' papermill command on a notebook whose cell reports progress from two spawned workers: the
    # kernel echoes its processes' stderr to the terminal, so papermill must not log the cell output again.
    nbformat = pytest.importorskip("nbformat")
    cmd = " ".join(DVC["stages"]["distill"]["do"]["cmd"].split())
    papermill = re.search(r"papermill (.*?) notebooks/", cmd).group(1).split()
    cell = ("from experiments.common.parallel import progress, run_parallel\n"
            "run_parallel(progress, [dict(message='worker-line-a'), dict(message='worker-line-b')], workers=2)\n"
            "import time; time.sleep(2)  # the kernel forwards its processes' output to the notebook meanwhile")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)]), tmp_path / "in.ipynb")
    env = env_without_smoke()
    env.pop("PYTEST_CURRENT_TEST", None)  # ipykernel captures its processes' stderr only outside pytest
    out = subprocess.run([sys.executable, "-m", "papermill", *papermill, str(tmp_path / "in.ipynb"),
                          str(tmp_path / "out.ipynb")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    terminal = out.stdout + out.stderr
    assert terminal.count("worker-line-a") == 1 and terminal.count("worker-line-b") == 1, terminal[-2000:]


def test_the_stage_cli_prints_yaml_that_parses_to_the_stage_params():
    from experiments.common.stage import stage_params

    out = subprocess.run([sys.executable, "-m", "experiments.common.stage", "distill", "digits"], cwd=ROOT,
                         env=env_without_smoke(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) == 1
    got = yaml.safe_load(out.stdout)
    assert got == stage_params("distill", "digits", load_params(ROOT / "params.yaml", smoke=False))
    assert set(got["params"]) == {"data", "teacher", "runs", "distill", "eval"} and got["run"] == REPO_PARAMS["run"]
    lr = got["params"]["runs"][1]["lr"]  # YAML floats such as 2.0e-4 arrive as floats, not strings
    assert [type(v) for v in lr] == [float] and lr == REPO_PARAMS["digits"]["runs"][1]["lr"]
    assert type(got["params"]["teacher"]["lr"]) is float


def test_the_stage_cli_hands_over_the_smoke_params_in_smoke_mode(monkeypatch, capsys):
    from experiments.common import stage

    monkeypatch.setenv("SIDLIB_SMOKE", "1")
    assert stage.main(["teacher", "toy2d"]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    smoke = load_params(ROOT / "params.yaml", smoke=True)
    assert got == {"params": {k: smoke["toy2d"][k] for k in ("data", "teacher", "runs")}, "run": smoke["run"]}
    assert stage.main(["teacher"]) == 2
    with pytest.raises(ParamsError, match="cifar99"):
        stage.main(["teacher", "cifar99"])


def _imported_experiments_modules(groups: dict) -> dict:
    """In one fresh interpreter, for each group name: the ``experiments`` modules (name -> file) loaded by importing
    that group's modules into an interpreter without any ``experiments`` module (sidlib stays loaded)."""
    code = ("import importlib, json, sys\n"
            "out = {}\n"
            f"for group, modules in {groups!r}.items():\n"
            "    for k in [k for k in sys.modules if k == 'experiments' or k.startswith('experiments.')]:\n"
            "        del sys.modules[k]\n"
            "    for m in modules: importlib.import_module(m)\n"
            "    out[group] = {k: getattr(v, '__file__', None) for k, v in sys.modules.items()\n"
            "                  if k == 'experiments' or k.startswith('experiments.')}\n"
            "print(json.dumps(out))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_without_smoke(), capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def imported_modules():
    return _imported_experiments_modules({
        "toy2d": ["experiments.common.stage", "experiments.toy2d"],
        "digits": ["experiments.common.stage", "experiments.digits"],
        "method_tour": ["experiments.gaussian1d", "experiments.common.params", "experiments.common.reports"]})


def _under(path: str, deps) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _package_init_holds_no_code():
    tree = ast.parse((ROOT / "experiments" / "__init__.py").read_text())
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in tree.body)


@pytest.mark.parametrize("bench", ["toy2d", "digits"])
def test_benchmark_stages_depend_on_every_module_they_import(bench, imported_modules):
    for stage in BENCH_STAGES:
        deps = [d.replace("${item}", bench) for d in DVC["stages"][stage]["do"]["deps"]]
        assert {"sidlib", "experiments/common", f"experiments/{bench}"} <= set(deps), stage
    files = imported_modules[bench]
    assert f"experiments.{bench}.bench" in files
    for name, file in files.items():
        rel = Path(file).resolve().relative_to(ROOT).as_posix()
        if name == "experiments":  # the namespace's __init__ lies outside the deps: it must stay code-free
            assert _package_init_holds_no_code()
            continue
        assert _under(rel, ["experiments/common", f"experiments/{bench}"]), (name, rel)


def test_the_method_tour_depends_on_every_module_it_imports(imported_modules):
    deps = DVC["stages"]["method_tour"]["deps"]
    files = imported_modules["method_tour"]
    assert "experiments.gaussian1d" in files
    for name, file in files.items():
        if name != "experiments":
            assert _under(Path(file).resolve().relative_to(ROOT).as_posix(), deps), name


def _repository_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True)
    return [f for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


def test_no_file_refers_to_the_shared_folder_outside_the_repository():
    needles = (".." + "/shared", "shared" + "/spec")  # split so that this file does not match itself
    hits = []
    for f in _repository_files():
        try:
            text = (ROOT / f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f for n in needles if n in text]
    assert not hits, sorted(set(hits))


# ---- DVC's view of the two pipelines ---------------------------------------------------------------------------------

def _dry_run(cwd: Path, *extra) -> tuple[list, str]:
    out = subprocess.run(["dvc", "repro", "--dry", *extra, "paper/dvc.yaml"], cwd=cwd, capture_output=True,
                         text=True, timeout=180, env=env_without_smoke(DVC_NO_ANALYTICS="1"))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    return [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")], text


PAPER_PER_BENCHMARK = ("teacher", "refs", "distill", "eval", "released")


@pytest.mark.slow
def test_dvc_dry_run_of_the_paper_pipeline_selects_no_benchmark_and_no_embedded_stage():
    stages, text = _dry_run(ROOT)
    assert all(s.startswith("paper/dvc.yaml:") for s in stages), stages  # nothing of the embedded pipeline
    per_benchmark = [s for s in stages if s.split(":", 1)[1].split("@")[0] in PAPER_PER_BENCHMARK]
    assert not per_benchmark, per_benchmark


@pytest.mark.slow
def test_dvc_dry_run_of_the_paper_pipeline_schedules_nothing_when_nothing_is_selected():
    # benchmarks: [] and released: [] leave only `tables`, whose dependencies are committed files recorded in
    # paper/dvc.lock: nothing runs, and the committed reports/paper/tables are not rewritten.
    stages, text = _dry_run(ROOT)
    assert stages == [], text


@pytest.mark.slow
def test_dvc_dry_run_with_one_selected_preset_lists_only_its_paper_stages(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True, capture_output=True, timeout=120)
    for name in ("dvc.yaml", "params.yaml", "params-smoke.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("paper", "experiments", "sidlib"):
        shutil.rmtree(repo / folder, ignore_errors=True)
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pp = repo / "paper" / "params.yaml"
    text = pp.read_text()
    assert text.count("\nbenchmarks: []") == 1
    pp.write_text(text.replace("\nbenchmarks: []", "\nbenchmarks: [cifar10-uncond]"))
    # A dry run hashes every dependency, including the ones earlier stages would produce: stand-ins for those.
    for f in ("data/paper/teachers/cifar10-uncond.pkl", "data/paper/refs/cifar10-uncond/fid.npz",
              "runs/paper/cifar10-uncond/log.jsonl"):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text("stand-in\n")
    stages, _ = _dry_run(repo)
    assert all(s.startswith("paper/dvc.yaml:") for s in stages), stages
    selected = {s.split(":", 1)[1] for s in stages}
    assert {f"{s}@cifar10-uncond" for s in ("teacher", "refs", "distill", "eval")} <= selected
    assert not [s for s in selected if "@" in s and not s.endswith("@cifar10-uncond")]
    assert not [s for s in selected if s.startswith("released@")]


# ---- reports ---------------------------------------------------------------------------------------------------------

def test_tables_and_json(tmp_path):
    from experiments.common.reports import mean_std, summarise, write_json, write_table

    rows = [{"model": "teacher", "nfe": 35, "fid": 12.3456789}, {"model": "student", "nfe": 1, "fid": float("nan")}]
    md = write_table(tmp_path / "t", rows, title="T")
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "model,nfe,fid"
    assert (tmp_path / "t.md").read_text().startswith("# T\n") and md in (tmp_path / "t.md").read_text()
    assert "| teacher | 35 | 12.35 |" in md and "| student | 1 |  |" in md
    j = write_json(tmp_path / "m.json", {"fid": float("inf"), "x": torch.tensor(2.5)})
    assert json.loads(j.read_text()) == {"fid": None, "x": 2.5}
    assert summarise([3.0, None, 1.0, 2.0, float("nan")]) == {"min": 1.0, "median": 2.0, "mean": 2.0, "max": 3.0,
                                                              "count": 3}
    mean, sd = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and sd == pytest.approx((5 / 3) ** 0.5)  # sample standard deviation (ddof 1)
    assert mean_std([7.0]) == (7.0, None) and mean_std([]) == (None, None)


# ---- parallel workers ------------------------------------------------------------------------------------------------

def _double(x):
    return 2 * x


def _double_and_threads(x):
    return 2 * x, torch.get_num_threads()


def test_run_parallel_in_process_keeps_order_and_restores_threads():
    from experiments.common.parallel import run_parallel

    before = torch.get_num_threads()
    assert run_parallel(_double, [{"x": i} for i in range(3)], workers=1) == [0, 2, 4]
    assert run_parallel(_double_and_threads, [{"x": 5}], workers=2, threads_per_worker=1) == [(10, 1)]  # in-process
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_run_parallel_in_processes_keeps_order_and_sets_threads():
    from experiments.common.parallel import run_parallel

    got = run_parallel(_double_and_threads, [{"x": i} for i in range(3)], workers=2, threads_per_worker=1)
    assert got == [(0, 1), (2, 1), (4, 1)]


# ---- resumable teacher training --------------------------------------------------------------------------------------

def test_teacher_config_validation_names_the_key():
    from experiments.common.teacher_training import TeacherConfig

    TeacherConfig().validate()
    with pytest.raises(ParamsError, match=r"t\.channel_mult"):
        TeacherConfig(channel_mult=[1, 2, 2, 2, 2]).validate("t")
    with pytest.raises(ParamsError, match=r"t\.attn_resolutions"):
        TeacherConfig(attn_resolutions=[2]).validate("t")
    with pytest.raises(ParamsError, match=r"t\.lr"):
        TeacherConfig(lr=0.0).validate("t")
    with pytest.raises(ParamsError, match=r"digits\.teacher\.chanels"):
        TeacherConfig.from_dict({"chanels": 3}, where="digits.teacher")
    # Four levels fit 8x8 images (8, 4, 2, 1).
    TeacherConfig(channel_mult=[1, 1, 1, 1], attn_resolutions=[1]).validate()


def test_teacher_training_resumes_to_the_same_weights(tmp_path):
    from experiments.common.teacher_training import TeacherConfig, train_teacher
    from sidlib.io.checkpoints import load_checkpoint

    torch.set_num_threads(1)
    x = torch.rand(40, 1, 8, 8) * 2 - 1
    y = torch.randint(10, (40,))
    cfg = TeacherConfig(label_dim=10, model_channels=16, num_blocks=1, iterations=4, batch=4, checkpoint_every=2,
                        log_every=1, warmup_iterations=2)
    whole = train_teacher(cfg, tmp_path / "whole", x, y)
    # Interrupted after the first checkpoint (max_seconds=0 stops there), then resumed.
    part = train_teacher(cfg, tmp_path / "part", x, y, max_seconds=0)
    assert part.name == "training-state.pt"

    def logged(folder):
        return [json.loads(line)["iteration"] for line in (tmp_path / folder / "log.jsonl").read_text().splitlines()]

    assert logged("part") == [1, 2]
    done = train_teacher(cfg, tmp_path / "part", x, y)
    a, _ = load_checkpoint(whole)
    b, meta = load_checkpoint(done)
    assert meta["iterations"] == 4
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), k
    assert logged("part") == [1, 2, 3, 4]
    # A finished run is reused, and a changed config is refused rather than silently mixed.
    assert train_teacher(cfg, tmp_path / "part", x, y) == done
    (tmp_path / "part" / "network.json").unlink()
    with pytest.raises(ValueError, match="different teacher config"):
        train_teacher(TeacherConfig(**{**cfg.__dict__, "lr": 1e-4}), tmp_path / "part", x, y)


def test_run_names_and_order_do_not_depend_on_how_the_grid_was_written():
    # The stages receive their params as key-sorted YAML; a notebook or script reading params.yaml directly must
    # find the same run folders.
    section = load_params(smoke=False)["digits"]
    reordered = {**section, "runs": [dict(reversed(list(g.items()))) for g in section["runs"]]}
    from experiments.common.runs import expand_runs

    names = [r.name for r in expand_runs(section, "digits", extra_keys=("variant",))]
    assert names == [r.name for r in expand_runs(reordered, "digits", extra_keys=("variant",))]
    assert all(n.startswith("duration_kimg40-") or n.startswith("lr") for n in names)


def test_a_mapping_in_the_grid_gives_a_plain_folder_name():
    from experiments.common.runs import expand_runs

    section = copy.deepcopy(REPO_PARAMS["toy2d"])
    starts = [{"pairs": 100, "steps": 10}, {"steps": 10, "pairs": 200}]
    section["runs"] = {"g_init": starts, "seed": [0]}
    runs = expand_runs(section, "toy2d")
    names = [r.name for r in runs]
    assert all(re.fullmatch(r"g_init[0-9a-f]{6}-seed0", n) for n in names) and len(set(names)) == 2
    assert [r.config["g_init"] for r in runs] == starts
    section["runs"] = {"g_init": [{"steps": 10, "pairs": 100}], "seed": [0]}  # the same mapping written otherwise
    assert [r.name for r in expand_runs(section, "toy2d")] == names[:1]


def test_runs_share_their_data_free_start_unless_they_name_a_cache(tmp_path):
    from experiments.common.runs import with_shared_start

    start = {"pairs": 100, "steps": 10}
    a, b = ({"alpha": alpha, "g_init": dict(start)} for alpha in (1.0, 1.2))
    shared = [with_shared_start(c, tmp_path)["g_init"]["cache_dir"] for c in (a, b)]
    assert shared[0] == shared[1] and Path(shared[0]).parent == tmp_path and a["g_init"] == start  # input untouched
    own = {"g_init": {**start, "cache_dir": "elsewhere"}}
    assert with_shared_start(own, tmp_path) == own
    assert with_shared_start({"alpha": 1.0, "g_init": None}, tmp_path) == {"alpha": 1.0, "g_init": None}


def test_the_lock_hashes_code_folders_without_byte_code():
    # A folder dep's hash must cover the tracked sources only: __pycache__ differs per checkout (source mtimes), and
    # a hash over it would make `dvc status` of a fresh clone call every stage changed.
    assert {"__pycache__/", "*.pyc"} <= set((ROOT / ".dvcignore").read_text().split())
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    checked = 0
    for stage in lock["stages"].values():
        for dep in stage.get("deps", []):
            if dep["path"].startswith(("sidlib", "experiments")) and "nfiles" in dep:
                assert dep["nfiles"] == sum(f.startswith(dep["path"] + "/") for f in tracked), dep["path"]
                checked += 1
    assert checked >= 4


def test_dvc_status_finds_the_committed_code_and_params_unchanged():
    # On any clone of the committed tree (CI's included): only git-ignored checkpoints may be missing, never a
    # changed code folder, notebook or param, which would make `dvc repro` rerun everything.
    out = subprocess.run(["dvc", "status", "--json", "dvc.yaml"], cwd=ROOT, env=env_without_smoke(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stale = []
    for stage, changes in json.loads(out.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                stale.append((stage, change))  # e.g. "changed command"
                continue
            for kind, paths in change.items():
                for path, state in (paths.items() if isinstance(paths, dict) else []):
                    if not path.startswith("checkpoints/"):
                        stale.append((stage, kind, path, state))
    assert not stale, stale


def test_run_folders_follow_the_teachers_weights_not_the_checkout_folder(tmp_path):
    from experiments.digits.bench import BENCHMARK, runs, teacher_path
    from sidlib.io.checkpoints import save_network
    from sidlib.networks import EDMPrecond, edm_kwargs

    kwargs = edm_kwargs("ddpmpp", img_resolution=8, channel_mult=[1], model_channels=8, num_blocks=1,
                        attn_resolutions=[], dropout=0.0)
    section = copy.deepcopy(REPO_PARAMS["digits"])
    for variant in ("uncond", "cond"):
        torch.manual_seed(0)
        save_network(teacher_path(tmp_path / "a", section, variant).with_suffix(""), EDMPrecond(**kwargs))

    def dirs(ckpt):
        return {r.name: r.dir(Path("sid")) for r in runs(section, ckpt)}

    before = dirs(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    assert dirs(tmp_path / "elsewhere" / "b") == before  # the same weights in another folder: the same runs
    torch.manual_seed(1)
    save_network(teacher_path(tmp_path / "a", section, "uncond").with_suffix(""), EDMPrecond(**kwargs))  # retrained
    after = dirs(tmp_path / "a")
    assert all((after[n] != before[n]) == n.endswith("uncond") for n in before)
    with pytest.raises(FileNotFoundError, match="train the teacher first"):
        dirs(tmp_path / "missing")
    BENCHMARK.validate(section)  # params are checked before any teacher exists


def test_teacher_folders_follow_the_teachers_config_and_data():
    from experiments.digits.bench import teacher_path

    section = copy.deepcopy(REPO_PARAMS["digits"])
    base = {v: teacher_path("ckpt", section, v) for v in ("uncond", "cond")}
    assert base["uncond"].parent.parent == Path("ckpt/teacher") and base["uncond"].name == "network.safetensors"
    assert re.fullmatch(r"uncond-[0-9a-f]{8}", base["uncond"].parent.name) and base["uncond"] != base["cond"]
    for block, key, value in (("teacher", "iterations", 1600), ("teacher", "lr", 1e-3), ("data", "num_train", 1000),
                              ("data", "split_seed", 1)):
        changed = copy.deepcopy(section)
        changed[block][key] = value
        assert teacher_path("ckpt", changed, "uncond") != base["uncond"], key
    # What the teachers are not made of leaves them where they are.
    other = copy.deepcopy(section)
    other["teacher"]["classifier"]["epochs"] += 1
    other["distill"]["alpha"] = 1.0
    other["eval"]["num_samples"] = 100
    assert {v: teacher_path("ckpt", other, v) for v in base} == base


def test_a_changed_teacher_config_trains_beside_the_old_teacher(tmp_path):
    """Before teacher folders were named after their config, a changed ``digits.teacher`` stopped at the old
    folder's training state ("written with a different teacher config")."""
    from experiments.digits import bench as D

    section = copy.deepcopy(REPO_PARAMS["digits"])
    section["teacher"].update(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], iterations=2,
                              batch=8, checkpoint_every=1, log_every=1)
    torch.set_num_threads(1)
    first = D.train_teacher_variant(section, "uncond", str(tmp_path))
    section["teacher"]["iterations"] = 3
    second = D.train_teacher_variant(section, "uncond", str(tmp_path))
    assert (first["iterations"], second["iterations"]) == (2, 3)
    folders = sorted(p.name for p in (tmp_path / "teacher").iterdir())
    assert len(folders) == 2 and all(f.startswith("uncond-") for f in folders)
    assert all((tmp_path / "teacher" / f / "network.safetensors").is_file() for f in folders)
