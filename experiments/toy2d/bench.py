"""toy2d as a benchmark: the exact mixture denoiser as teacher, SiD runs over the grid of ``toy2d.runs``.

Params (``params.yaml``, section ``toy2d``): ``data`` (num_modes, radius, std), ``teacher`` (kind), ``runs`` (a grid,
or a list of grids, of DistillConfig values plus ``start``: ``teacher-sampler`` (the default: ``distill.g_init``)
or ``random`` (no data-free start: the contrast)), ``distill`` (DistillConfig keys), ``eval`` (train_samples,
num_samples, nfe, last_evals).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from sidlib.distill import DistillConfig, distill, register_teacher
from sidlib.io.checkpoints import load_checkpoint
from sidlib.io.logs import read_jsonl, training_curve
from sidlib.rng import inputs_for_seeds
from sidlib.sampling import edm_sigmas, generate_onestep, heun_sampler

from ..common import figures as F
from . import plots as P
from ..common.benchmark import Benchmark, Context, StageResult
from ..common.parallel import progress
from ..common.params import ParamsError, check_eval, check_keys, check_list, check_number
from ..common.reports import markdown_table, mean_std, summarise, write_json, write_table
from ..common.runs import Run, expand_runs, validate_distill, with_shared_start
from .metrics import evaluate_points, mean_pairwise_distance, mode_metrics, reference_points
from .mixture import MixtureDenoiser, MixtureSpec, images_to_points, sample_mixture

TEACHER_NAME = "toy2d-exact"
STARTS = ("teacher-sampler", "random")
HEADLINE_ALPHA = 1.2  # the paper's alpha: the targets and the metrics file's mode shares
#: Latent seeds: in-training evaluations, final evaluation of students, teacher samples (disjoint ranges).
TRAIN_EVAL_SEEDS, STUDENT_SEEDS, TEACHER_SEEDS = 0, 2_000_000, 1_000_000
METRICS = ("within_2sigma", "mode_share_min", "mode_share_max", "mean_log_density", "energy_distance",
           "sliced_wasserstein", "modes_covered")


def mixture_spec(section: dict) -> MixtureSpec:
    d = section["data"]
    return MixtureSpec(int(d["num_modes"]), float(d["radius"]), float(d["std"]))


def _fill(section):
    spec = mixture_spec(section)

    def fill(point, config):
        student = {"img_resolution": 1, "img_channels": 2, "label_dim": 0, **config.get("student", {})}
        config = {**config, "teacher": TEACHER_NAME, "teacher_kwargs": spec.to_dict(), "student": student,
                  "device": "cpu", "grid_size": 0, "progress": False}
        if point.get("start", STARTS[0]) == "random":
            config["g_init"] = None
        return config
    return fill


def _check_student(distill_block: dict) -> None:
    """The student kwargs must build an EDMPrecond (tried on the meta device: nothing is allocated)."""
    from sidlib.networks import build_network

    if not isinstance(distill_block, dict):
        raise ParamsError("toy2d.distill must be a mapping of DistillConfig keys")
    for k in ("teacher", "teacher_kwargs"):
        if k in distill_block:
            raise ParamsError(f"toy2d.distill.{k}: set by the benchmark (the exact mixture denoiser), not in params")
    student = distill_block.get("student")
    if not isinstance(student, dict):
        raise ParamsError(f"toy2d.distill.student must be a mapping of EDMPrecond kwargs, got {student!r}")
    try:
        with torch.device("meta"):
            build_network("EDMPrecond", {"img_resolution": 1, "img_channels": 2, "label_dim": 0, **student})
    except (TypeError, ValueError, KeyError) as e:
        raise ParamsError(f"toy2d.distill.student: cannot build EDMPrecond: {e}") from None


def runs(section: dict) -> list:
    return expand_runs(section, "toy2d", extra_keys=("start",), fill=_fill(section))


class PointsEval:
    """In-training evaluation: fixed-seed points of G_ema, every metric, and the first 2,000 points kept on disk."""

    def __init__(self, spec: MixtureSpec, run_dir, init_sigma: float, num_samples: int, keep: int = 2000,
                 total_kimg: float | None = None):
        self.spec, self.run_dir, self.init_sigma, self.keep, self.total = spec, run_dir, float(init_sigma), keep, total_kimg
        self.z = inputs_for_seeds(range(TRAIN_EVAL_SEEDS, TRAIN_EVAL_SEEDS + num_samples), [2, 1, 1]).latents
        self.reference = reference_points(spec)
        self.yy = mean_pairwise_distance(self.reference.double(), self.reference.double())  # the same every time

    @torch.no_grad()
    def __call__(self, G, kimg: float) -> dict:
        pts = images_to_points(generate_onestep(G, self.z, self.init_sigma))
        torch.save(pts[: self.keep].clone(), self.run_dir / f"points-{int(round(kimg * 1000)):09d}.pt")
        m = evaluate_points(pts, self.spec, self.reference, reference_self_distance=self.yy)
        progress(f"toy2d {self.run_dir.name[:-9]}: {kimg:g}/{self.total:g} kimg, within-2σ {m['within_2sigma']:.3f}")
        return m


def run_one(section: dict, run: Run, root: str) -> dict:
    """One SiD run (resumable; a finished run is only reloaded). Returns {name, point, run_dir, seconds}."""
    spec = mixture_spec(section)
    register_teacher(TEACHER_NAME, lambda: MixtureDenoiser(**spec.to_dict()))
    run_dir = run.dir(root)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = with_shared_start(run.config, root)  # runs that differ only in alpha share their data-free start
    t0 = time.perf_counter()
    distill(config, run_dir=run_dir,
            eval_fn=PointsEval(spec, run_dir, run.config.get("init_sigma", 2.5), int(section["eval"]["train_samples"]),
                               total_kimg=DistillConfig.from_dict(config).total_iterations() * config["batch"] / 1000))
    return {"name": run.name, "point": run.point, "run_dir": str(run_dir), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate_run(section: dict, run: Run, root: str) -> dict:
    """The final G_ema snapshot on ``eval.num_samples`` fixed seeds, and the summary of the last in-training evals."""
    spec = mixture_spec(section)
    run_dir = run.dir(root)
    snaps = sorted(run_dir.glob("network-snapshot-*.safetensors"))
    if not snaps:
        raise FileNotFoundError(f"no SiD snapshot in {run_dir} (made by the distill@toy2d stage)")
    G, meta = load_checkpoint(snaps[-1])
    n = int(section["eval"]["num_samples"])
    z = inputs_for_seeds(range(STUDENT_SEEDS, STUDENT_SEEDS + n), [2, 1, 1]).latents
    t0 = time.perf_counter()
    pts = images_to_points(generate_onestep(G, z, float(meta["init_sigma"])))
    secs = time.perf_counter() - t0
    curve = training_curve(run_dir)
    init = next((r for r in read_jsonl(run_dir / "log.jsonl") if "g_init_seconds" in r), {})
    return {"name": run.name, **run.point, "start": run.point.get("start", STARTS[0]), "kimg": meta.get("kimg"),
            "sec_per_1k": secs / n * 1000, **evaluate_points(pts, spec), "points": pts[:2000].numpy(),
            "curve": curve, "g_init_seconds": init.get("g_init_seconds"),
            "last_evals_within_2sigma": summarise([r["within_2sigma"] for r in curve[-int(section["eval"]["last_evals"]):]])}


@torch.no_grad()
def evaluate_teacher(section: dict) -> list:
    """The exact denoiser through EDM's Heun sampler at every ``eval.nfe`` (float64), on fixed seeds."""
    spec = mixture_spec(section)
    den = MixtureDenoiser(**spec.to_dict())
    n = int(section["eval"]["num_samples"])
    z = inputs_for_seeds(range(TEACHER_SEEDS, TEACHER_SEEDS + n), [2, 1, 1]).latents.double()
    rows = []
    for nfe in sorted(int(k) for k in section["eval"]["nfe"]):
        sig = edm_sigmas((nfe + 1) // 2)
        t0 = time.perf_counter()
        x, used = heun_sampler(den, z * sig[0], sig)
        secs = time.perf_counter() - t0
        pts = images_to_points(x).float()
        rows.append({"model": "exact teacher (Heun)", "nfe": used, "sec_per_1k": secs / n * 1000,
                     **evaluate_points(pts, spec), "points": pts[:2000].numpy()})
    return rows


class Toy2D(Benchmark):
    name = "toy2d"
    about = {
        "teacher": "The teacher is the exact denoiser E[x0 | x_t] of an equal-weight Gaussian mixture (closed form: a "
                   "mixture stays a mixture under Gaussian noise), so every deviation of a student is SiD's doing. "
                   "It is checked here against a Monte Carlo estimate of E[x0 | x_t].",
        "distill": "One SiD run per point of the run grid: generator and fake score are residual MLPs with EDM "
                   "preconditioning on points stored as [N, 2, 1, 1] images. By default G first learns the teacher's "
                   "own sampler (a data-free start, `distill.g_init`); `start: random` runs are the contrast.",
        "evaluate": "Exact-distribution metrics on fixed seeds: the fraction of points within 2 standard deviations "
                    "of a mode, the least/most popular mode's share, mean log-density under the mixture, energy "
                    "distance. Students are summarised as mean ± std over distillation seeds.",
        "figures": "The α ablation, the points of each student against the modes, and the metric against NFE.",
    }

    def validate(self, section: dict) -> None:
        d = check_keys(section["data"], "toy2d.data", ("num_modes", "radius", "std"), ("num_modes", "radius", "std"))
        check_number(d["num_modes"], "toy2d.data.num_modes", integer=True, low=2, high=1000)
        check_number(d["radius"], "toy2d.data.radius", low=0, low_open=True, high=1e3)
        check_number(d["std"], "toy2d.data.std", low=0, low_open=True, high=1e3)
        t = check_keys(section["teacher"], "toy2d.teacher", ("kind",), ("kind",))
        if t["kind"] != "exact-mixture-denoiser":
            raise ParamsError(f"toy2d.teacher.kind must be exact-mixture-denoiser, got {t['kind']!r}")
        if "runs" in section:
            for g in (section["runs"] if isinstance(section["runs"], list) else [section["runs"]]):
                for v in check_list(g.get("start", [STARTS[0]]) if isinstance(g, dict) else [], "toy2d.runs.start"):
                    if v not in STARTS:
                        raise ParamsError(f"toy2d.runs.start must be one of {list(STARTS)}, got {v!r}")
        if "distill" in section:
            _check_student(section["distill"])
            validate_distill(section, "toy2d", extra_keys=("start",), fill=_fill(section))
        if "eval" in section:
            check_eval(section["eval"], "toy2d.eval")

    # ---- stages ------------------------------------------------------------------------------------------------
    def teacher(self, ctx: Context) -> StageResult:
        spec = mixture_spec(ctx.section)
        den = MixtureDenoiser(**spec.to_dict())
        x0 = sample_mixture(spec, 200_000, seed=7).double()
        q = torch.tensor([[0.3, -0.2], [0.9, 0.5], [-0.4, 0.6]], dtype=torch.float64)
        errs = []
        for sigma in (0.4, 1.0):  # importance-weighted E[x0 | x_t = q] from exact samples
            w = torch.softmax(-0.5 * torch.cdist(q, x0).pow(2) / sigma ** 2, dim=1)
            errs.append((den(q.float().reshape(-1, 2, 1, 1), sigma).reshape(-1, 2).double() - w @ x0).abs().max().item())
        record = {"monte_carlo_max_abs_error": max(errs), "sigma_data": spec.data_std, "num_modes": spec.num_modes,
                  "mode_separation_in_std": 2 * spec.radius * math.sin(math.pi / spec.num_modes) / spec.std}
        write_json(ctx.paths.eval / "teacher-toy2d.json", record)
        write_json(ctx.checkpoints / "teacher" / "teacher.json", {"kind": "exact-mixture-denoiser", **spec.to_dict()})
        fig = P.denoiser(spec, den)
        return StageResult(text=f"Exact denoiser vs Monte Carlo: max abs error {max(errs):.4f} (data units).",
                           tables={"teacher": markdown_table([record])},
                           figures=F.save_all({"toy2d-teacher/denoiser.png": fig}, ctx.paths.figures))

    def distill(self, ctx: Context) -> StageResult:
        all_runs = runs(ctx.section)
        root = str(ctx.checkpoints / "sid")
        done = ctx.parallel(run_one, [dict(section=ctx.section, run=r, root=root) for r in all_runs])
        curves = {r.name: (r, training_curve(r.dir(root))) for r in all_runs}
        groups = _groups(all_runs)
        F.write_curve_plots(ctx.paths.plots / "toy2d", groups, curves, ("within_2sigma", "energy_distance"), _key)
        seconds = [d["seconds"] for d in done]
        write_json(ctx.paths.eval / "distill-toy2d.json",
                   {"runs": len(done), "seconds_per_run": mean_std(seconds)[0], "seconds_total": sum(seconds)})
        spec = mixture_spec(ctx.section)
        exact = evaluate_points(sample_mixture(spec, int(ctx.section["eval"]["train_samples"]), seed=777), spec)
        figs = {"toy2d-distill/curves.png": F.curves_with_bands(
                    groups, curves, ("within_2sigma", "mean_log_density", "energy_distance"), P.LABELS, _label,
                    hlines={m: {"exact samples": exact[m]} for m in ("within_2sigma", "mean_log_density")}),
                "toy2d-distill/points_over_training.png": P.points_over_training(spec, groups, all_runs, root)}
        return StageResult(text=f"{len(done)} runs, {sum(seconds):.0f} CPU-seconds of distillation.",
                           figures=F.save_all(figs, ctx.paths.figures))

    def evaluate(self, ctx: Context) -> StageResult:
        section, spec = ctx.section, mixture_spec(ctx.section)
        all_runs = runs(section)
        root = str(ctx.checkpoints / "sid")
        res = ctx.parallel(evaluate_run, [dict(section=section, run=r, root=root) for r in all_runs])
        teacher_rows = evaluate_teacher(section)
        n = int(section["eval"]["num_samples"])
        exact = evaluate_points(sample_mixture(spec, n, seed=777), spec)
        big = max(r["nfe"] for r in teacher_rows)
        t_big = next(r for r in teacher_rows if r["nfe"] == big)
        student_rows, metrics = [], {"exact": {k: exact[k] for k in ("within_2sigma", "mean_log_density")},
                                     f"teacher_nfe{big}": {k: t_big[k] for k in METRICS[:4]}}
        for key, members in _groups(all_runs).items():
            got = [r for r in res if r["name"] in {m.name for m in members}]
            d = dict(key)
            row = {"model": _label(key), "nfe": 1, "seeds": len(got), "alpha": d.get("alpha", 1.2),
                   "start": d.get("start", STARTS[0])}
            for m in METRICS:
                row[m], row[m + "_std"] = mean_std([g[m] for g in got])
            student_rows.append(row)
            # The sweep's headline numbers; the mode shares (the targets' third test) of the default alpha only,
            # the rest stays in reports/eval/toy2d.json: `dvc metrics show` keeps to about 40 columns.
            shown = METRICS[:4] if _is_headline(row) else ("within_2sigma", "mean_log_density")
            metrics[_key(key)] = {m: row[m] for m in shown}
        targets = _targets(student_rows, t_big)
        rows = [{k: v for k, v in r.items() if k != "points"} for r in teacher_rows] + student_rows + \
            [{"model": "exact samples (floor)", **exact}]
        cols = ["model", "nfe", "seeds", *METRICS, "sec_per_1k"]
        md = write_table(ctx.paths.tables / "toy2d", rows, cols, title="toy2d: exact teacher (Heun) vs SiD students",
                         notes="Students: mean over distillation seeds (the *_std columns: std over seeds). "
                               "Distances in data units against 10k exact samples; log-density in nats.")
        write_json(ctx.paths.metrics / "toy2d.json", metrics)
        write_json(ctx.paths.eval / "toy2d.json",
                   {"rows": rows, "targets": targets, "exact": exact, "runs": [{k: v for k, v in r.items() if k != "points"}
                                                                               for r in res]})
        seed0 = {f"alpha_{r['alpha']:g}": r["points"] for r in res
                 if r.get("seed", 0) == min(x.get("seed", 0) for x in res) and r["start"] == STARTS[0]}
        contrast = {f"random_alpha_{r['alpha']:g}": r["points"] for r in res
                    if r["start"] == "random" and r.get("seed", 0) == min(x.get("seed", 0) for x in res)}
        np.savez_compressed(ctx.paths.eval / "toy2d-points.npz", teacher=t_big["points"], **seed0, **contrast)
        return StageResult(text=F.targets_text(targets), tables={"toy2d": md, "targets": markdown_table(targets)})

    def figures(self, ctx: Context) -> StageResult:
        import json
        ev = json.loads((ctx.paths.eval / "toy2d.json").read_text())
        pts = dict(np.load(ctx.paths.eval / "toy2d-points.npz"))
        spec = mixture_spec(ctx.section)
        figs = {"toy2d/alpha_ablation.png": P.alpha_ablation(ev),
                "toy2d/points.png": P.points(spec, pts, max(r["nfe"] for r in ev["rows"]
                                                            if r["model"].startswith("exact teacher"))),
                "toy2d/metric_vs_nfe.png": P.vs_nfe(ev)}
        return StageResult(figures=F.save_all(figs, ctx.paths.figures))


def _group_key(run: Run) -> tuple:
    """Runs that differ only in ``seed`` form one group (summarised as mean ± std)."""
    return tuple(sorted((k, v) for k, v in run.point.items() if k != "seed"))


def _groups(all_runs) -> dict:
    out: dict = {}
    for r in all_runs:
        out.setdefault(_group_key(r), []).append(r)
    return out


def _label(key: tuple) -> str:
    d = dict(key)
    start = " (random start)" if d.get("start") == "random" else ""
    return f"SiD student α={d.get('alpha', 1.2):g}{start}"


def _key(key: tuple) -> str:
    d = dict(key)
    return ("random_" if d.get("start") == "random" else "") + f"alpha_{d.get('alpha', 1.2):g}"


def _is_headline(row: dict) -> bool:
    """The student group the targets judge: the paper's alpha from the default (data-free) start."""
    return (row["alpha"], row["start"]) == (HEADLINE_ALPHA, STARTS[0])


def _targets(student_rows: list, teacher: dict) -> list:
    row = next((r for r in student_rows if _is_headline(r)), None)
    if row is None:
        return []
    lo, hi = row["mode_share_min"], row["mode_share_max"]
    gap = abs(row["mean_log_density"] - teacher["mean_log_density"])
    return [
        {"target": f"α={HEADLINE_ALPHA:g}: within-2σ mass ≥ 0.80", "measured": f"{row['within_2sigma']:.3f} ± {row['within_2sigma_std'] or 0:.3f}",
         "met": "yes" if row["within_2sigma"] >= 0.80 else "missed"},
        {"target": f"α={HEADLINE_ALPHA:g}: every mode holds 8-17 % of the on-mode points", "measured": f"{lo:.3f} - {hi:.3f}",
         "met": "yes" if lo >= 0.08 and hi <= 0.17 else "missed"},
        {"target": f"α={HEADLINE_ALPHA:g}: log-density within 0.15 nats of the teacher at {teacher['nfe']} NFE",
         "measured": f"{row['mean_log_density']:.3f} vs {teacher['mean_log_density']:.3f} (gap {gap:.3f})",
         "met": "yes" if gap <= 0.15 else "missed"},
    ]


BENCHMARK = Toy2D()
__all__ = ["BENCHMARK", "Toy2D", "runs", "run_one", "evaluate_run", "evaluate_teacher", "mixture_spec", "PointsEval",
           "mode_metrics"]
