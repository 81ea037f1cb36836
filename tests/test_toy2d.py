"""toy2d: the closed-form mixture denoiser, the metrics against analytic and geometric facts, and the benchmark's
four stages end to end with the smoke settings (a temporary SIDLIB_SMOKE_DIR, one process, one torch thread)."""
import copy
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from experiments.toy2d.metrics import energy_distance, evaluate_points, mode_metrics, sliced_wasserstein
from experiments.toy2d.mixture import (MixtureDenoiser, MixtureSpec, grid_log_density, mixture_log_density,
                                       points_to_images, sample_mixture)

ROOT = Path(__file__).resolve().parents[1]
SPEC = MixtureSpec(num_modes=8, radius=1.0, std=0.05)
#: The mixture of params.yaml's toy2d.data (8 modes on the unit circle, std 0.1): the analytic numbers below use it.
BENCH = MixtureSpec(num_modes=8, radius=1.0, std=0.1)


def unit_circle_means(k):
    """Mode means computed here from the geometry (angle 2*pi*i/k on the unit circle), float64 [k, 2]."""
    a = np.arange(k) * 2 * np.pi / k
    return torch.from_numpy(np.stack([np.cos(a), np.sin(a)], 1))


# ---- the exact denoiser --------------------------------------------------------------------------------------------

def test_denoiser_matches_self_normalised_monte_carlo():
    # E[x0 | x] = sum_i x0_i N(x; x0_i, sigma^2) / sum_i N(x; x0_i, sigma^2) over exact mixture samples x0_i.
    den = MixtureDenoiser(8, 1.0, 0.05)
    x0 = sample_mixture(SPEC, 400_000, seed=1).double()
    queries = torch.tensor([[0.3, -0.2], [1.1, 0.4], [-0.6, 0.7]], dtype=torch.float64)
    for sigma in (0.4, 1.0):
        w = torch.softmax(-0.5 * torch.cdist(queries, x0).pow(2) / sigma ** 2, dim=1)  # [Q, M]
        mc = w @ x0
        assert (1.0 / w.pow(2).sum(1)).min() > 1000  # enough effective samples for a 1.5e-2 check
        exact = den(queries.float().reshape(-1, 2, 1, 1), sigma).reshape(-1, 2).double()
        assert torch.allclose(exact, mc, atol=1.5e-2), (sigma, exact, mc)


def test_denoiser_satisfies_tweedie_with_autograd_score():
    # Tweedie: E[x0|x] = x + sigma^2 * grad log p_sigma(x); the score comes from the log density by autograd.
    den = MixtureDenoiser(8, 1.0, 0.05)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in (0.01, 0.3, 5.0):
        xr = x.clone().requires_grad_(True)
        score = torch.autograd.grad(mixture_log_density(xr, SPEC, sigma).sum(), xr)[0]
        got = den(x.float().reshape(-1, 2, 1, 1), torch.full((64,), sigma)).reshape(-1, 2).double()
        assert torch.allclose(got, x + sigma ** 2 * score, atol=1e-5)


def test_denoiser_limits_and_edm_signature():
    den = MixtureDenoiser(8, 1.0, 0.05)
    x = points_to_images(sample_mixture(SPEC, 16))
    out = den(x, torch.full((16, 1, 1, 1), 1e-4), class_labels=None, augment_labels=None)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out, x, atol=1e-4)  # tiny noise: the observation is already clean
    assert den(x, 1e4).abs().max() < 1e-3  # huge noise: the mixture mean (the origin)
    assert den.img_channels == 2 and den.img_resolution == 1 and den.label_dim == 0
    # EDM's sigma_data: the per-coordinate std of the whole mixture, r^2/2 + s^2 for >= 3 modes on a circle.
    assert den.sigma_data == pytest.approx(math.sqrt(0.5 + 0.05 ** 2), rel=1e-12)


def test_denoiser_is_differentiable_in_its_input():
    den = MixtureDenoiser()
    x = torch.randn(5, 2, 1, 1, requires_grad=True)
    den(x, 0.5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_log_density_integrates_to_one():
    gx, _, ld = grid_log_density(SPEC, extent=1.5, steps=600)
    cell = (gx[0, 1] - gx[0, 0]) ** 2
    assert math.isclose(float(np.exp(ld).sum() * cell), 1.0, rel_tol=1e-3)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="num_modes"):
        MixtureSpec(0, 1.0, 0.05)
    with pytest.raises(ValueError, match="std"):
        MixtureSpec(8, 1.0, -1.0)


# ---- distances ------------------------------------------------------------------------------------------------------

def test_distances_vanish_for_identical_samples_and_grow_with_shift():
    a = sample_mixture(SPEC, 2000, seed=3)
    assert abs(energy_distance(a, a)) < 1e-9
    assert sliced_wasserstein(a, a) < 1e-12
    b = sample_mixture(SPEC, 2000, seed=4)
    shifted = a + torch.tensor([0.3, 0.0])
    assert energy_distance(a, shifted) > 10 * abs(energy_distance(a, b))
    assert sliced_wasserstein(a, shifted) > 5 * sliced_wasserstein(a, b)
    # A pure shift by d: every 1-D projection moves by |d cos(theta)|; the mean over directions is 2d/pi.
    assert math.isclose(sliced_wasserstein(a, shifted, num_projections=4096), 0.3 * 2 / math.pi, rel_tol=0.05)


def test_energy_distance_of_two_points_is_twice_their_distance():
    # Single points x, y: 2|x-y| - 0 - 0.
    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    assert energy_distance(x, y) == pytest.approx(10.0, rel=1e-12)


# ---- mode metrics against analytic and geometric facts --------------------------------------------------------------

def test_exact_samples_hold_the_gaussian_mass_within_two_std_and_equal_shares():
    # A 2-D isotropic Gaussian puts 1 - exp(-2) of its mass within 2 std (Rayleigh CDF); the modes are 7.7 std apart,
    # so no component reaches another mode's disc. Equal weights: every mode holds 1/8 of the on-mode points.
    n = 40_000
    m = mode_metrics(sample_mixture(BENCH, n, seed=11), BENCH)
    p = 1 - math.exp(-2)
    assert abs(m["within_2sigma"] - p) < 4 * math.sqrt(p * (1 - p) / n)
    se = math.sqrt((1 / 8) * (7 / 8) / (p * n))
    assert 1 / 8 - 4 * se < m["mode_share_min"] <= m["mode_share_max"] < 1 / 8 + 4 * se
    assert m["modes_covered"] == 8


def test_points_spread_uniformly_on_the_ring_hold_the_arc_fraction():
    # Points on the unit circle within 0.2 (2 std) of a mode: the chord 2 sin(dθ/2) <= 0.2, an arc of 2 * 2 asin(0.1)
    # per mode. 8 such arcs out of 2 pi: about 0.510, although the ring passes through every mode.
    n = 80_000
    theta = (torch.arange(n, dtype=torch.float64) + 0.5) * 2 * math.pi / n
    ring = torch.stack([theta.cos(), theta.sin()], 1)
    m = mode_metrics(ring, BENCH)
    expected = 8 * 2 * 2 * math.asin(0.1) / (2 * math.pi)
    assert expected == pytest.approx(0.510, abs=1e-3)
    assert m["within_2sigma"] == pytest.approx(expected, abs=2e-4)
    assert m["mode_share_min"] == pytest.approx(1 / 8, abs=1e-3)
    assert m["mode_share_max"] == pytest.approx(1 / 8, abs=1e-3)
    assert m["modes_covered"] == 8


def test_a_mixture_with_one_mode_emptied_covers_seven_modes():
    pts = sample_mixture(BENCH, 16_000, seed=5)
    nearest = torch.cdist(pts.double(), unit_circle_means(8)).argmin(1)
    m = mode_metrics(pts[nearest != 3], BENCH)
    assert m["modes_covered"] == 7 and m["mode_share_min"] == 0.0
    assert m["mode_share_max"] == pytest.approx(1 / 7, abs=0.02)
    # Points between modes are off-mode and cover nothing.
    between = torch.zeros(100, 2)
    assert mode_metrics(between, BENCH)["modes_covered"] == 0 and mode_metrics(between, BENCH)["within_2sigma"] == 0


def test_non_finite_points_count_as_off_mode_and_are_left_out_of_the_distances():
    good = sample_mixture(BENCH, 3000, seed=6)
    bad = torch.tensor([[float("nan"), 0.0], [float("inf"), 1.0], [0.0, -float("inf")]]).repeat(500, 1)  # 1500 rows
    ref = sample_mixture(BENCH, 2000, seed=60)
    clean = evaluate_points(good, BENCH, ref)
    mixed = evaluate_points(torch.cat([good, bad]), BENCH, ref)
    assert mixed["within_2sigma"] == pytest.approx(clean["within_2sigma"] * 3000 / 4500, abs=1e-12)
    for k in ("energy_distance", "sliced_wasserstein", "mean_log_density", "mode_share_min", "mode_share_max"):
        assert mixed[k] == pytest.approx(clean[k], rel=1e-12, abs=1e-12), k
    assert mixed["modes_covered"] == 8


def test_an_entirely_diverged_generator_is_scored_not_crashed():
    m = evaluate_points(torch.full((50, 2), float("nan")), BENCH, sample_mixture(BENCH, 500, seed=60))
    assert m["within_2sigma"] == 0.0 and m["modes_covered"] == 0


def test_true_samples_beat_a_collapsed_generator_and_match_the_entropy():
    ref = sample_mixture(SPEC, 3000, seed=60)
    true = evaluate_points(sample_mixture(SPEC, 5000, seed=6), SPEC, ref)
    collapsed = evaluate_points(sample_mixture(MixtureSpec(1, 1.0, 0.05), 5000, seed=6), SPEC, ref)
    assert true["modes_covered"] == 8 and collapsed["modes_covered"] == 1
    assert collapsed["energy_distance"] > 20 * true["energy_distance"]
    # Mean log-density of exact samples is minus the entropy: -log(8) - log(2 pi e s^2) for separated modes.
    entropy = math.log(8) + math.log(2 * math.pi * math.e * 0.05 ** 2)
    assert math.isclose(true["mean_log_density"], -entropy, abs_tol=0.05)


# ---- the benchmark's stages end to end (smoke settings) --------------------------------------------------------------

STAGES = ("teacher", "distill", "evaluate", "figures")


def _declared_outputs(stage: str, item: str = "toy2d") -> list:
    """The outs and metrics dvc.yaml declares for ``stage@item`` (papermill's executed notebooks left out)."""
    do = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["do"]
    out = []
    for entry in do.get("outs", []) + do.get("metrics", []):
        path = next(iter(entry)) if isinstance(entry, dict) else entry
        path = path.replace("${item}", item)
        if not path.startswith("reports/notebooks/"):
            out.append(path)
    return out


def _tree(base: Path) -> dict:
    return {str(p.relative_to(base)): p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (_sha(p), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.fixture(scope="module")
def toy2d_stages(tmp_path_factory):
    """Run teacher, distill, distill again, evaluate, figures, then delete one run and distill once more.

    Each stage gets exactly what DVC hands it (``stage_params``: its declared blocks and ``run``), in one process with
    one torch thread. Returns what the tests check: the files each call created or changed, timings, hashes.
    """
    from experiments.common.params import load_params
    from experiments.common.stage import stage_context, stage_params

    base = tmp_path_factory.mktemp("toy2d-smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("SIDLIB_SMOKE", "1")
    mp.setenv("SIDLIB_SMOKE_DIR", str(base))
    rec = {"base": base, "changed": {}, "seconds": {}, "results": {}}
    try:
        params = load_params(smoke=True)
        rec["section"] = params["toy2d"]

        def call(stage, tag):
            handed = stage_params(stage, "toy2d", copy.deepcopy(params))
            ctx, bench = stage_context(stage, "toy2d", handed["params"],
                                       {**handed["run"], "workers": 1, "threads_per_worker": 1})
            assert ctx.paths.smoke and ctx.paths.reports == base / "reports"
            before = _tree(base)
            t0 = time.perf_counter()
            rec["results"][tag] = getattr(bench, stage)(ctx)
            rec["seconds"][tag] = time.perf_counter() - t0
            after = _tree(base)
            rec["changed"][tag] = sorted(k for k, v in after.items() if before.get(k) != v)
            return ctx

        call("teacher", "teacher")
        ctx = call("distill", "distill")
        sid = ctx.checkpoints / "sid"
        rec["run_dirs"] = sorted(p.name for p in sid.iterdir())
        rec["snapshot_dirs"] = sorted({p.parent.name for p in sid.rglob("network-snapshot-*.safetensors")})
        rec["files_1"] = _hashes(sid)
        call("distill", "distill_again")
        rec["files_2"] = _hashes(sid)
        call("evaluate", "evaluate")
        call("figures", "figures")
        # Delete one run (the default data-free start with alpha 1.2, which exercises g_init) and every other folder
        # that is not a run of the grid (caches), then distil again: only that run is trained again, from scratch.
        victim = next(p for p in sid.iterdir() if p.name.startswith("alpha1.2-seed0-") and "random" not in p.name)
        rec["victim"] = victim.name
        snaps = sorted(victim.glob("network-snapshot-*.safetensors"))
        rec["victim_before"] = {s.name: _weights(s) for s in snaps}
        rec["victim_points_before"] = {p.name: _sha(p) for p in victim.glob("points-*.pt")}
        shutil.rmtree(victim)
        for p in sid.iterdir():
            if p.is_dir() and p.name not in rec["snapshot_dirs"]:
                shutil.rmtree(p)
        call("distill", "distill_fresh")
        rec["victim_after"] = {s.name: _weights(s) for s in sorted(victim.glob("network-snapshot-*.safetensors"))}
        rec["victim_points_after"] = {p.name: _sha(p) for p in victim.glob("points-*.pt")}
        yield rec
    finally:
        mp.undo()


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def test_every_stage_writes_its_declared_outputs_and_nothing_else(toy2d_stages):
    base = toy2d_stages["base"]
    for tag, stage in (("teacher", "teacher"), ("distill", "distill"), ("distill_again", "distill"),
                       ("evaluate", "evaluate"), ("figures", "figures"), ("distill_fresh", "distill")):
        declared = _declared_outputs(stage)
        stray = [p for p in toy2d_stages["changed"][tag] if not _under(p, declared)]
        assert not stray, f"{tag} wrote outside the outputs dvc.yaml declares for {stage}: {stray}"
        if tag == stage:
            missing = [d for d in declared if not (base / d).exists()]
            assert not missing, f"{stage} did not write {missing}"
            assert toy2d_stages["changed"][tag], stage


def test_metrics_files_hold_numbers_only(toy2d_stages):
    def leaves(x, where):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from leaves(v, f"{where}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                yield from leaves(v, f"{where}[{i}]")
        else:
            yield where, x

    files = sorted((toy2d_stages["base"] / "reports" / "metrics").glob("*.json"))
    assert {f.name for f in files} == {"toy2d.json"}
    for f in files:
        for where, v in leaves(json.loads(f.read_text()), f.name):
            assert isinstance(v, (int, float)) and not isinstance(v, bool), (where, v)
    # `dvc metrics show` stays readable: the mode shares of the headline student only, two numbers per other group.
    m = json.loads(files[0].read_text())
    assert set(m["alpha_1.2"]) == {"within_2sigma", "mode_share_min", "mode_share_max", "mean_log_density"}
    assert set(m["teacher_nfe3"]) == set(m["alpha_1.2"])
    for group in ("exact", "alpha_0", "random_alpha_1.2"):
        assert set(m[group]) == {"within_2sigma", "mean_log_density"}, group


def test_teacher_stage_checks_the_exact_denoiser(toy2d_stages):
    base = toy2d_stages["base"]
    m = json.loads((base / "reports/eval/teacher-toy2d.json").read_text())
    assert m["monte_carlo_max_abs_error"] < 0.02
    assert m["sigma_data"] == pytest.approx(math.sqrt(0.5 + 0.1 ** 2), rel=1e-9)  # r^2/2 + s^2 per coordinate
    means = unit_circle_means(8)
    assert m["mode_separation_in_std"] == pytest.approx(float((means[0] - means[1]).norm()) / 0.1, rel=1e-9)
    assert m["num_modes"] == 8
    assert (base / "reports/figures/toy2d-teacher/denoiser.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distill_stage_makes_one_run_folder_per_grid_point(toy2d_stages):
    dirs = toy2d_stages["snapshot_dirs"]
    # Smoke grid: alpha in {0, 1.2} (seed 0), and alpha 1.2 from a random start; every folder with a snapshot is one.
    assert len(dirs) == 3 and set(dirs) <= set(toy2d_stages["run_dirs"])
    assert sum(d.startswith("alpha0-seed0-") for d in dirs) == 1
    assert sum(d.startswith("alpha1.2-seed0-") and "random" not in d for d in dirs) == 1
    assert sum(d.startswith("alpha1.2-seed0-random-") for d in dirs) == 1
    # The dvc plots' CSVs name only columns that dvc.yaml's `plots` declares.
    declared = {}
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        if isinstance(entry, dict):
            for spec in entry.values():
                declared.update(spec.get("y", {}) if isinstance(spec.get("y"), dict) else {})
    for csv in ("within_2sigma.csv", "energy_distance.csv"):
        path = toy2d_stages["base"] / "reports/plots/toy2d" / csv
        header = path.read_text().splitlines()[0].split(",")
        assert header[0] == "images_seen"
        assert set(header[1:]) and set(header[1:]) <= set(declared[f"reports/plots/toy2d/{csv}"])


def test_rerunning_distill_only_reloads(toy2d_stages):
    first, again = toy2d_stages["files_1"], toy2d_stages["files_2"]
    assert set(first) == set(again)
    assert len([k for k in first if "network-snapshot-" in k and k.endswith(".safetensors")]) >= 3
    for k in first:
        if k.endswith("log.jsonl"):  # may be rewritten on resume (truncated after the last state), never extended
            assert again[k][0] == first[k][0], f"{k} changed"
        else:
            assert again[k] == first[k], f"{k} was rewritten"  # same bytes, same modification time


def test_a_deleted_run_is_reproduced_bit_for_bit(toy2d_stages):
    before, after = toy2d_stages["victim_before"], toy2d_stages["victim_after"]
    assert before and set(before) == set(after)
    for name in before:
        assert set(before[name]) == set(after[name])
        for k in before[name]:
            assert torch.equal(before[name][k], after[name][k]), (name, k)
    assert toy2d_stages["victim_points_before"] == toy2d_stages["victim_points_after"]
    # Only the deleted run was trained again: the other runs' files are untouched (their logs may be rewritten
    # unchanged on reload, see test_rerunning_distill_only_reloads).
    others = [d for d in toy2d_stages["snapshot_dirs"] if d != toy2d_stages["victim"]]
    assert not [p for p in toy2d_stages["changed"]["distill_fresh"]
                if any(f"/sid/{d}/" in p for d in others) and not p.endswith("log.jsonl")]


def test_evaluate_stage_records(toy2d_stages):
    base, section = toy2d_stages["base"], toy2d_stages["section"]
    ev = json.loads((base / "reports/eval/toy2d.json").read_text())
    nfes = sorted(section["eval"]["nfe"])
    teacher = [r for r in ev["rows"] if r["model"].startswith("exact teacher")]
    assert sorted(r["nfe"] for r in teacher) == nfes
    students = [r for r in ev["rows"] if r["model"].startswith("SiD")]
    assert len(students) == 3 and all(r["seeds"] == 1 for r in students)
    assert len(ev["runs"]) == 3 and {r["kimg"] for r in ev["runs"]} == {section["distill"]["duration_kimg"]}
    # The floor row: exact samples, whose within-2-std mass is 1 - exp(-2) up to sampling error.
    floor = next(r for r in ev["rows"] if r["model"].startswith("exact samples"))
    n = section["eval"]["num_samples"]
    p = 1 - math.exp(-2)
    assert abs(floor["within_2sigma"] - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert len(ev["targets"]) == 3 and all(t["met"] in ("yes", "missed") for t in ev["targets"])
    # Points of the teacher and of every student group's first seed, 2,000 at most.
    pts = np.load(base / "reports/eval/toy2d-points.npz")
    keys = {"teacher"}
    for grid in section["runs"]:
        for a in grid["alpha"]:
            keys.add(("random_" if grid.get("start") == ["random"] else "") + f"alpha_{a:g}")
    assert set(pts.files) == keys
    for k in pts.files:
        assert pts[k].shape == (min(2000, n), 2) and np.isfinite(pts[k]).all(), k
    table = (base / "reports/tables/toy2d.csv").read_text().splitlines()
    assert table[0].startswith("model,nfe,seeds,") and len(table) == 1 + len(nfes) + 3 + 1


def test_figures_stage_draws_pngs(toy2d_stages):
    res = toy2d_stages["results"]["figures"]
    assert set(res.figures) == {"toy2d/alpha_ablation.png", "toy2d/points.png", "toy2d/metric_vs_nfe.png"}
    for path in res.figures.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(path).stat().st_size > 5000
