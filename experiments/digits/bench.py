"""digits as a benchmark: EDM teachers trained here on scikit-learn's 8x8 digits, SiD runs over ``digits.runs``.

Params (``params.yaml``, section ``digits``): ``data`` (split_seed, num_train), ``teacher`` (classifier settings and
:class:`TeacherConfig` keys), ``runs`` (a grid of DistillConfig values plus ``variant``: ``uncond`` / ``cond``),
``distill`` (DistillConfig keys), ``eval`` (train_samples, num_samples, nfe, last_evals).

Teacher and students are scored on the same seeds: the same latents and, for the conditional variant, the same
labels (paired), so the student/teacher ratio is free of the seed-set noise that dominates single FIDs.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sidlib.distill import STATE_FILE, DistillConfig, distill
from sidlib.distill.config import G_INIT_DEFAULTS
from sidlib.io.checkpoints import load_checkpoint, load_network
from sidlib.io.logs import read_jsonl, training_curve
from sidlib.sampling import to_uint8

from ..common import figures as F
from ..common.benchmark import Benchmark, Context, StageResult
from ..common.parallel import progress
from ..common.params import ParamsError, check_eval, check_keys, check_list, check_number
from ..common.reports import markdown_table, mean_std, summarise, write_json, write_table
from ..common.runs import Run, code_digest, expand_runs, short_digest, validate_distill, with_shared_start
from ..common.teacher_training import TeacherConfig, train_teacher
from . import plots as P
from .classifier import accuracy, load_classifier, save_classifier, train_classifier
from .data import NUM_CLASSES, NUM_IMAGES, load_digits_split
from .metrics import ImageMetrics, student_samples, teacher_samples

VARIANT_LABEL_DIM = {"uncond": 0, "cond": NUM_CLASSES}
#: Latent seeds: in-training evaluations, and the final evaluation of teachers and students (paired).
TRAIN_EVAL_SEEDS, EVAL_SEEDS = 0, 1_000_000
CLASSIFIER_KEYS = ("epochs", "batch", "lr", "seed")


def _root(ctx_or_ckpt) -> Path:
    return Path(getattr(ctx_or_ckpt, "checkpoints", ctx_or_ckpt))


def classifier_path(ckpt: Path) -> Path:
    return Path(ckpt) / "teacher" / "classifier" / "classifier.safetensors"


def teacher_path(ckpt: Path, section: dict, variant: str) -> Path:
    """``<ckpt>/teacher/<variant>-<digest>/network.safetensors``. The digest (8 hex digits of sha256) covers what the
    teacher is made from: its :class:`TeacherConfig`, the data split and :func:`code_digest`. Changed
    ``digits.teacher`` or ``digits.data`` values, or changed code, train a new teacher beside the old one."""
    digest = short_digest([asdict(teacher_config(section, variant)), section["data"], code_digest()])
    return Path(ckpt) / "teacher" / f"{variant}-{digest}" / "network.safetensors"


def require(path: Path, what: str, stage: str) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path} (made by the {stage} stage; run it first)")
    return Path(path)


def _split(section):
    return load_digits_split(int(section["data"]["split_seed"]), int(section["data"]["num_train"]))


def image_metrics(section, ckpt) -> ImageMetrics:
    """The digits metrics (:class:`ImageMetrics`) with the classifier of ``teacher@digits`` and the params' split."""
    return ImageMetrics(require(classifier_path(ckpt), "digit classifier", "teacher@digits"),
                        split_seed=int(section["data"]["split_seed"]), num_train=int(section["data"]["num_train"]))


def teacher_config(section: dict, variant: str) -> TeacherConfig:
    t = {k: v for k, v in section["teacher"].items() if k != "classifier"}
    return TeacherConfig.from_dict({**t, "label_dim": VARIANT_LABEL_DIM[variant]}, where="digits.teacher")


def variants(section: dict) -> list:
    """The teacher variants the run grid uses, in order."""
    grids = section["runs"] if isinstance(section["runs"], list) else [section["runs"]]
    return list(dict.fromkeys(v for g in grids for v in g.get("variant", [])))


def _fill(ckpt, section):
    def fill(point, config):
        return {**config, "teacher": str(teacher_path(ckpt, section, point["variant"])), "device": "cpu",
                "progress": False}
    return fill


def runs(section: dict, ckpt) -> list:
    return expand_runs(section, "digits", extra_keys=("variant",), fill=_fill(ckpt, section))


# ---- work done in worker processes ----------------------------------------------------------------------------

def train_teacher_variant(section: dict, variant: str, ckpt: str) -> dict:
    sp = _split(section)
    cfg = teacher_config(section, variant)
    out = train_teacher(cfg, teacher_path(ckpt, section, variant).parent, sp.train_images, sp.train_labels,
                        num_classes=NUM_CLASSES,
                        progress=lambda r: progress(f"digits teacher {variant}: {r['iteration']}/{cfg.iterations} "
                                                    f"iterations, loss {r['loss']:.3g}"))
    meta = json.loads(out.with_suffix(".json").read_text())["meta"]
    return {"variant": variant, "iterations": meta["iterations"], "seconds": meta["seconds"],
            "parameters": meta["parameters"]}


class StudentEval:
    """In-training evaluation: FID of G_ema's one-step samples on fixed seeds (KID and precision/recall are left to
    the final evaluation: on a CPU they cost several times the FID)."""

    def __init__(self, section: dict, ckpt, init_sigma: float, label_dim: int, name: str = "", total_kimg=None):
        self.metrics, self.name, self.total = image_metrics(section, ckpt), name, total_kimg
        n = int(section["eval"]["train_samples"])
        self.seeds, self.init_sigma, self.label_dim = list(range(TRAIN_EVAL_SEEDS, TRAIN_EVAL_SEEDS + n)), init_sigma, label_dim

    def __call__(self, G, kimg: float) -> dict:
        t0 = time.perf_counter()
        x, lab = student_samples(G, self.seeds, self.init_sigma, self.label_dim)
        m = {**self.metrics(x, lab, kid=False, prc=False), "eval_seconds": time.perf_counter() - t0}
        progress(f"digits {self.name}: {kimg:g}/{self.total:g} kimg, FID {m['fid']:.2f}")
        return m


def run_one(section: dict, run: Run, ckpt: str) -> dict:
    require(Path(run.config["teacher"]), f"digits {run.point['variant']} teacher", "teacher@digits")
    run_dir = run.dir(Path(ckpt) / "sid")
    t0 = time.perf_counter()
    total = DistillConfig.from_dict(run.config).total_iterations() * run.config["batch"] / 1000
    evaluate = StudentEval(section, ckpt, float(run.config.get("init_sigma", 2.5)),
                           VARIANT_LABEL_DIM[run.point["variant"]], run.name, total)
    start = run.config.get("g_init")
    if start is not None and not (run_dir / STATE_FILE).exists():  # the first FID line comes after the start
        progress(f"digits {run.name}: data-free start ({start.get('pairs', G_INIT_DEFAULTS['pairs'])} teacher "
                 f"samples, {start.get('steps', G_INIT_DEFAULTS['steps'])} regression steps; reused if cached), then "
                 f"{total:g} kimg")
    distill(with_shared_start(run.config, Path(ckpt) / "sid"), run_dir=run_dir, eval_fn=evaluate)
    return {"name": run.name, "point": run.point, "seconds": time.perf_counter() - t0}


def evaluate_job(section: dict, ckpt: str, kind: str, variant: str, nfe: int = 1, run: Run | None = None) -> dict:
    """One row of the evaluation: the teacher of ``variant`` at ``nfe`` or the last snapshot of ``run``, on the
    paired seeds ``EVAL_SEEDS ...``."""
    seeds = list(range(EVAL_SEEDS, EVAL_SEEDS + int(section["eval"]["num_samples"])))
    metrics = image_metrics(section, ckpt)
    label_dim = VARIANT_LABEL_DIM[variant]
    t0 = time.perf_counter()
    if kind == "teacher":
        net = load_network(require(teacher_path(ckpt, section, variant), f"digits {variant} teacher",
                                   "teacher@digits"))
        x, lab, nfe = teacher_samples(net, seeds, nfe, label_dim)
        row = {"model": "teacher (Heun)", "variant": variant, "nfe": nfe}
    else:
        snaps = sorted(run.dir(Path(ckpt) / "sid").glob("network-snapshot-*.safetensors"))
        if not snaps:
            raise FileNotFoundError(f"no SiD snapshot in {run.dir(Path(ckpt) / 'sid')} (made by distill@digits)")
        G, meta = load_checkpoint(snaps[-1])
        x, lab = student_samples(G, seeds, float(meta["init_sigma"]), label_dim)
        curve = training_curve(run.dir(Path(ckpt) / "sid"))
        row = {"model": "SiD student (one step)", "variant": variant, "nfe": 1, "seed": run.point.get("seed", 0),
               "name": run.name, "kimg": meta.get("kimg"),
               "last_evals": summarise([r["fid"] for r in curve[-int(section["eval"]["last_evals"]):]])}
    secs = time.perf_counter() - t0
    row.update(metrics(x, lab), sec_per_1k=secs / len(seeds) * 1000, num_samples=len(seeds))
    row["images"] = to_uint8(P.grid_order(x, lab))[:100].numpy()
    return row


class Digits(Benchmark):
    name = "digits"
    about = {
        "teacher": "scikit-learn's 8×8 digits (1,797 images, no download), split once (seed 0) into 1,400 training "
                   "and 397 held-out test images. A small classifier gives the 128-d features in which FID, KID, "
                   "precision and recall are measured (Inception's features say little about 8×8 digits); a scaled-down "
                   "DDPM++ `EDMPrecond` is trained with EDM's loss for each variant (unconditional, class-conditional).",
        "distill": "G and the fake score start from the teacher's weights; a data-free start (`distill.g_init`) then "
                   "regresses G onto the teacher's own 35-NFE Heun samples and pre-fits the fake score, and SiD "
                   "distils on generated images only. One run per point of the run grid (variant × seed); the EMA "
                   "generator is scored every tick.",
        "evaluate": "Teacher (Heun at each NFE) and students (one step) on the same latents and labels: the paired "
                    "ratio student/teacher is what the targets use. Students: mean ± std over distillation seeds.",
        "figures": "FID against generated images with the seed band and the teacher's NFE lines; sample grids; "
                   "FID against NFE.",
    }

    def validate(self, section: dict) -> None:
        d = check_keys(section["data"], "digits.data", ("split_seed", "num_train"), ("split_seed", "num_train"))
        check_number(d["split_seed"], "digits.data.split_seed", integer=True, low=0)
        check_number(d["num_train"], "digits.data.num_train", integer=True, low=100, high=NUM_IMAGES - 100)
        t = section["teacher"]
        check_keys(t, "digits.teacher", set(TeacherConfig.__dataclass_fields__) - {"label_dim"} | {"classifier"},
                   ("classifier",))
        c = check_keys(t["classifier"], "digits.teacher.classifier", CLASSIFIER_KEYS, CLASSIFIER_KEYS)
        for k in CLASSIFIER_KEYS:
            check_number(c[k], f"digits.teacher.classifier.{k}", integer=k != "lr", low=0, low_open=k != "seed")
        teacher_config(section, "cond").validate("digits.teacher")
        for g in (section["runs"] if isinstance(section["runs"], list) else [section["runs"]]):
            if not isinstance(g, dict) or "variant" not in g:
                raise ParamsError("digits.runs: every run grid needs a `variant` list (uncond and/or cond)")
            for v in check_list(g["variant"], "digits.runs.variant"):
                if v not in VARIANT_LABEL_DIM:
                    raise ParamsError(f"digits.runs.variant lists {v!r}; expected {sorted(VARIANT_LABEL_DIM)}")
        if "distill" in section:
            for k in ("teacher", "teacher_kwargs", "student"):
                if k in section["distill"]:
                    raise ParamsError(f"digits.distill.{k}: set by the benchmark (its teacher of each variant)")
            validate_distill(section, "digits", extra_keys=("variant",), fill=_fill("checkpoints/digits", section))
        if "eval" in section:
            check_eval(section["eval"], "digits.eval")

    # ---- stages ------------------------------------------------------------------------------------------------
    def teacher(self, ctx: Context) -> StageResult:
        section, ckpt = ctx.section, ctx.checkpoints
        sp = _split(section)
        settings = dict(section["teacher"]["classifier"])
        path = classifier_path(ckpt)
        meta = load_classifier(path)[1] if path.is_file() else None
        if meta is None or meta.get("settings") != settings:
            model, info = train_classifier(sp.train_images, sp.train_labels, **settings)
            meta = {"settings": settings, "train_seconds": info["seconds"],
                    "test_accuracy": accuracy(model, sp.test_images, sp.test_labels)}
            save_classifier(path, model, meta)
        done = ctx.parallel(train_teacher_variant, [dict(section=section, variant=v, ckpt=str(ckpt))
                                                    for v in variants(section)])
        metrics = image_metrics(section, ckpt)
        onehot = torch.nn.functional.one_hot(sp.train_labels, NUM_CLASSES).float()
        floor = metrics(sp.train_images, onehot, kid=False)
        record = {"classifier_test_accuracy": meta["test_accuracy"], "fid_train_vs_test": floor["fid"],
                  **{f"teacher_seconds_{d['variant']}": d["seconds"] for d in done}}
        write_json(ctx.paths.eval / "teacher-digits.json", record)
        logs = {d["variant"]: read_jsonl(teacher_path(ckpt, section, d["variant"]).parent / "log.jsonl")
                for d in done}
        figs = {"digits-teacher/training_images.png": P.training_images(sp),
                "digits-teacher/teacher_loss.png": P.teacher_loss(logs)}
        rows = [{"variant": d["variant"], "parameters": d["parameters"], "iterations": d["iterations"],
                 "seconds": d["seconds"]} for d in done]
        return StageResult(text=f"Classifier test accuracy {meta['test_accuracy']:.4f}; the 1,400 training images "
                                f"score FID {floor['fid']:.2f} against the 397 test images.",
                           tables={"teachers": markdown_table(rows)}, figures=F.save_all(figs, ctx.paths.figures))

    def distill(self, ctx: Context) -> StageResult:
        ckpt = ctx.checkpoints
        all_runs = runs(ctx.section, ckpt)
        done = ctx.parallel(run_one, [dict(section=ctx.section, run=r, ckpt=str(ckpt)) for r in all_runs])
        curves = {r.name: (r, training_curve(r.dir(ckpt / "sid"))) for r in all_runs}
        groups = _groups(all_runs)
        F.write_curve_plots(ctx.paths.plots / "digits", groups, curves, ("fid",), lambda k: dict(k)["variant"])
        seconds = [d["seconds"] for d in done]
        write_json(ctx.paths.eval / "distill-digits.json",
                   {"runs": len(done), "seconds_per_run": mean_std(seconds)[0], "seconds_total": sum(seconds)})
        figs = {"digits-distill/fid_curves.png": F.curves_with_bands(
                    groups, curves, ("fid",), {"fid": ("FID in digit-classifier features", True)},
                    lambda k: dict(k)["variant"]),
                "digits-distill/samples_over_training.png": P.samples_over_training(groups, ckpt / "sid")}
        return StageResult(text=f"{len(done)} runs, {sum(seconds):.0f} CPU-seconds of distillation.",
                           figures=F.save_all(figs, ctx.paths.figures))

    def evaluate(self, ctx: Context) -> StageResult:
        section, ckpt = ctx.section, ctx.checkpoints
        all_runs = runs(section, ckpt)
        nfes = sorted(int(n) for n in section["eval"]["nfe"])
        jobs = [dict(section=section, ckpt=str(ckpt), kind="teacher", variant=v, nfe=n)
                for v in variants(section) for n in reversed(nfes)]
        jobs += [dict(section=section, ckpt=str(ckpt), kind="student", variant=r.point["variant"], run=r)
                 for r in all_runs]
        rows = ctx.parallel(evaluate_job, jobs)
        big = nfes[-1]
        summary, table, grids = {}, [], {}
        for v in variants(section):
            t = {r["nfe"]: r for r in rows if r["variant"] == v and r["model"].startswith("teacher")}
            s = sorted((r for r in rows if r["variant"] == v and r["model"].startswith("SiD")), key=lambda r: r["seed"])
            fid, fid_sd = mean_std([r["fid"] for r in s])
            ratio, ratio_sd = mean_std([r["fid"] / t[big]["fid"] for r in s])
            summary[v] = {"student_fid": fid, "student_fid_std": fid_sd, "student_fid_per_seed": [r["fid"] for r in s],
                          **{f"teacher_fid_nfe{n}": t[n]["fid"] for n in t}, "ratio_nfe35": ratio,
                          "ratio_nfe35_std": ratio_sd, "num_samples": s[0]["num_samples"] if s else None}
            table += [t[n] for n in sorted(t)]
            student = {"model": f"SiD student (mean ± std over {len(s)} seeds)", "variant": v, "nfe": 1}
            for m in ("fid", "kid", "precision", "recall", "class_accuracy", "sec_per_1k"):
                if s and m in s[0]:
                    student[m], student[m + "_std"] = mean_std([r[m] for r in s])
            table.append({**student, "num_samples": summary[v]["num_samples"]})
            grids[f"{v}_teacher"], grids[f"{v}_student"] = t[big]["images"], s[0]["images"] if s else t[big]["images"]
        targets = _targets(summary, big)
        for r in table:
            r.pop("images", None)
            if isinstance(r.get("kid"), float):
                r["kid"] *= 1000
        cols = ["variant", "model", "nfe", "fid", "fid_std", "kid", "precision", "recall", "class_accuracy",
                "sec_per_1k", "num_samples"]
        md = write_table(ctx.paths.tables / "digits", table, cols, title="digits: teacher (Heun) vs SiD students",
                         notes="FID/KID/precision/recall in the digit classifier's 128-d features against the 397 "
                               "held-out test images; teacher and students on the same latents and labels. KID x1000. "
                               "sec_per_1k: seconds per 1,000 samples on one CPU thread.")
        write_json(ctx.paths.metrics / "digits.json", summary)
        write_json(ctx.paths.eval / "digits.json", {"rows": [{k: v for k, v in r.items() if k != "images"} for r in rows],
                                                    "summary": summary, "targets": targets})
        np.savez_compressed(ctx.paths.eval / "digits-points.npz", **grids)
        return StageResult(text=F.targets_text(targets), tables={"digits": md, "targets": markdown_table(targets)})

    def figures(self, ctx: Context) -> StageResult:
        ev = json.loads((ctx.paths.eval / "digits.json").read_text())
        ckpt = ctx.checkpoints
        all_runs = runs(ctx.section, ckpt)
        curves = {r.name: (r, training_curve(r.dir(ckpt / "sid"))) for r in all_runs}
        grids = dict(np.load(ctx.paths.eval / "digits-points.npz"))
        figs = {"digits/fid_vs_images.png": P.fid_vs_images(_groups(all_runs), curves, ev),
                "digits/grids.png": P.grids(grids, max(r["nfe"] for r in ev["rows"])),
                "digits/fid_vs_nfe.png": P.fid_vs_nfe(ev)}
        return StageResult(figures=F.save_all(figs, ctx.paths.figures))


def _groups(all_runs) -> dict:
    out: dict = {}
    for r in all_runs:
        out.setdefault(tuple(sorted((k, v) for k, v in r.point.items() if k != "seed")), []).append(r)
    return out


def _targets(summary: dict, big: int) -> list:
    out = []
    for v, s in summary.items():
        if s["student_fid"] is None:
            continue
        r, sd = s["ratio_nfe35"], s["ratio_nfe35_std"] or 0.0
        out.append({"target": f"{v}: student FID ≤ teacher at {big} NFE (paired ratio, mean over seeds)",
                    "measured": f"{s['student_fid']:.2f} vs {s[f'teacher_fid_nfe{big}']:.2f}: ratio {r:.3f} ± {sd:.3f}",
                    "met": "yes" if r <= 1.0 else f"missed by {100 * (r - 1):.1f} %"})
    return out


BENCHMARK = Digits()
__all__ = ["BENCHMARK", "Digits", "runs", "variants", "teacher_path", "classifier_path", "image_metrics",
           "evaluate_job", "run_one", "StudentEval", "teacher_config"]
