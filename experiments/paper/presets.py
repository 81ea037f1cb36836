"""The paper's five SiD runs as presets, read from ``paper/params.yaml``.

A preset is :class:`sidlib.distill.DistillConfig` values (its ``distill`` block: the official ``run_sid.sh``
settings in DistillConfig's own keys) plus its teacher and reference files:

* ``teacher``: a registered checkpoint name (:mod:`sidlib.io.registry`); ``network``: the key of
  :data:`sidlib.networks.PAPER_NETWORKS` the teacher's architecture must match (checked before any compute);
* ``fid_ref`` / ``pr_ref``: reference files (:mod:`sidlib.metrics.references`); ``isc``: also the Inception Score;
* ``teacher_sampler``: EDM's sampler settings for the teacher's own FID; ``released``: the released generators;
* ``resources``: the paper's GPUs and estimated GPU-hours (estimates, see the README);
* ``label_probs`` (optional, conditional presets): the training set's class frequencies (a list, a file, or a
  labelled dataset folder/zip, see :func:`sidlib.metrics.references.label_frequencies`). Null keeps the data-free
  default, uniform labels; given, they become the ``label_probs`` of the distillation (normalised; SiD's loop
  draws dataset labels) and of the evaluation protocol.

:func:`disk_estimate` gives a preset's disk use from its snapshot cadence and the parameter counts of
:data:`sidlib.networks.PAPER_NETWORKS`.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from sidlib.distill import ConfigError, DistillConfig
from sidlib.io.registry import SID_GENERATORS, registered_names
from sidlib.metrics.references import FID_REFERENCES, PR_REFERENCES, label_frequencies
from sidlib.networks import PAPER_NETWORKS, paper_network

from ..common.params import ParamsError, check_keys, check_list, check_number, deep_merge, repo_root

__all__ = ["PRESET_KEYS", "params_file", "load_paper_params", "get_preset", "expected_teacher_kwargs",
           "distill_config", "check_teacher", "preset_label_probs", "disk_estimate"]

PRESET_KEYS = ("teacher", "network", "fid_ref", "pr_ref", "isc", "teacher_sampler", "released", "resources", "distill",
               "label_probs")
_REQUIRED = PRESET_KEYS[:-1]
_SAMPLER_KEYS = ("steps", "S_churn", "S_min", "S_max", "S_noise")
#: Keys of the stored architecture that do not change the teacher's function at evaluation (the students set the
#: first three; sigma_min/sigma_max are informational for EDMPrecond).
_NOT_CHECKED = ("augment_dim", "dropout", "use_fp16", "sigma_min", "sigma_max")


def params_file() -> Path:
    return repo_root() / "paper" / "params.yaml"


def _validate_preset(name: str, p: dict) -> None:
    where = f"presets.{name}"
    check_keys(p, where, PRESET_KEYS, _REQUIRED)
    if p.get("label_probs") is not None and not paper_network(p["network"]).get("label_dim"):
        raise ParamsError(f"{where}.label_probs: the {p['network']} network is unconditional")
    if p["teacher"] not in registered_names():
        raise ParamsError(f"{where}.teacher: {p['teacher']!r} is not a registered checkpoint name")
    if p["network"] not in PAPER_NETWORKS:
        raise ParamsError(f"{where}.network: {p['network']!r}; expected one of {sorted(PAPER_NETWORKS)}")
    if p["fid_ref"] not in FID_REFERENCES:
        raise ParamsError(f"{where}.fid_ref: {p['fid_ref']!r}; known: {sorted(FID_REFERENCES)}")
    if p["pr_ref"] is not None and p["pr_ref"] not in PR_REFERENCES:
        raise ParamsError(f"{where}.pr_ref: {p['pr_ref']!r}; known: {sorted(PR_REFERENCES)} or null")
    if not isinstance(p["isc"], bool):
        raise ParamsError(f"{where}.isc must be true or false")
    ts = check_keys(p["teacher_sampler"], f"{where}.teacher_sampler", _SAMPLER_KEYS, ("steps",))
    check_number(ts["steps"], f"{where}.teacher_sampler.steps", integer=True, low=1, high=10_000)
    for alpha, gen in check_keys(p["released"], f"{where}.released", ("alpha1.0", "alpha1.2")).items():
        if gen not in SID_GENERATORS:
            raise ParamsError(f"{where}.released.{alpha}: {gen!r} is not a released SiD generator")
    try:
        cfg = DistillConfig.from_dict(distill_config_from(p), where=f"{where}.distill.")
        cfg.validate(where=f"{where}.distill.")
    except ConfigError as e:
        raise ParamsError(str(e)) from None


def load_paper_params(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """The validated paper params (``paper/params.yaml``), with ``overrides`` deep-merged first."""
    path = Path(path) if path is not None else params_file()
    if not path.is_file():
        raise FileNotFoundError(f"paper params not found: {path}")
    data = deep_merge(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, overrides or {})
    check_keys(data, "paper params", ("benchmarks", "released", "eval", "presets"), ("presets",))
    for name, p in data["presets"].items():
        _validate_preset(name, p)
    for key in ("benchmarks", "released"):
        for b in check_list(data.get(key, []), key, min_len=0):
            if b not in data["presets"]:
                raise ParamsError(f"{key} names {b!r}; presets: {sorted(data['presets'])}")
    return data


def get_preset(name: str, overrides: dict | None = None, *, path=None) -> dict:
    """Preset ``name`` (a deep copy, with ``name`` added); unknown names raise listing the valid ones."""
    presets = load_paper_params(path)["presets"]
    if name not in presets:
        raise ParamsError(f"unknown paper benchmark {name!r}; valid: {', '.join(presets)}")
    p = deep_merge(presets[name], overrides or {})
    _validate_preset(name, p)
    return {**copy.deepcopy(p), "name": name}


def expected_teacher_kwargs(preset: dict) -> dict:
    """The architecture the preset's teacher must have: every constructor kwarg of its paper network, defaults filled
    in (so a stored ``num_blocks=1`` differs from the default 4), except augment_dim, dropout and use_fp16 (they do not
    change the teacher's function at evaluation, see :data:`_NOT_CHECKED`)."""
    from sidlib.io.checkpoints import effective_kwargs

    full = effective_kwargs("EDMPrecond", paper_network(preset["network"]))
    return {k: v for k, v in full.items() if k not in _NOT_CHECKED}


def distill_config_from(preset: dict, overrides: dict | None = None) -> dict:
    cfg = {"teacher": preset["teacher"], "teacher_kwargs": expected_teacher_kwargs(preset), **preset["distill"]}
    cfg.update(overrides or {})
    if "iterations" in (overrides or {}):
        cfg.pop("duration_kimg", None)
    return cfg


def preset_label_probs(preset: dict, source=None) -> list | None:
    """Class frequencies for a preset: ``source`` (list, file or dataset) or the preset's ``label_probs``; None
    (uniform) when neither is given. Checked against the network's number of classes."""
    source = source if source is not None else preset.get("label_probs")
    if source is None:
        return None
    classes = int(paper_network(preset["network"]).get("label_dim") or 0)
    if not classes:
        raise ParamsError(f"{preset.get('name', '?')}: class frequencies given for an unconditional network")
    return label_frequencies(source, classes)


def distill_config(name: str, overrides: dict | None = None, label_probs=None) -> dict:
    """The DistillConfig mapping of a preset, then ``overrides`` (DistillConfig keys); validated. ``label_probs``
    (a list, file or labelled dataset; default: the preset's) becomes the config's normalised ``label_probs``."""
    preset = get_preset(name)
    probs = preset_label_probs(preset, label_probs)
    cfg = distill_config_from(preset, {**({"label_probs": probs} if probs else {}), **(overrides or {})})
    if str(cfg.get("eval_fn", "")).endswith(":proxy_fid"):
        if probs:  # the in-training FID draws the same labels
            cfg["eval_kwargs"] = {"label_probs": probs, **(cfg.get("eval_kwargs") or {})}
        if cfg.get("snapshot_keep_every") and not cfg.get("snapshot_keep_best"):  # retention keeps what `best` picks
            from sidlib.metrics.protocol import metric_names
            cfg["snapshot_keep_best"] = metric_names((cfg.get("eval_kwargs") or {}).get("num_images", 10_000))["fid"]
    try:
        DistillConfig.from_dict(cfg).validate()
    except ConfigError as e:
        raise ParamsError(f"{name}: {e}") from None
    return cfg


def check_teacher(preset: dict, source: str | None = None) -> dict:
    """Compare a teacher checkpoint's stored architecture with the preset's, without building the network."""
    from sidlib.io.checkpoints import effective_kwargs, read_network_meta

    source = preset["teacher"] if source is None else source
    info = read_network_meta(source)
    eff = effective_kwargs(info["class_name"], info["init_kwargs"])
    diffs = [f"{k}: preset expects {v!r}, teacher has {eff.get(k, '<absent>')!r}"
             for k, v in expected_teacher_kwargs(preset).items() if eff.get(k) != v]
    if info["class_name"] != "EDMPrecond":
        diffs.insert(0, f"class: SiD needs an EDMPrecond teacher, got {info['class_name']}")
    if diffs:
        raise ParamsError(f"teacher {source} does not match preset {preset.get('name', '?')!r} "
                          f"({preset['network']}): " + "; ".join(diffs))
    return eff


# The parameter counts of the five networks (for the README's cost table): one source, sidlib's table.
PARAMETERS = {name: PAPER_NETWORKS[name]["parameters"] for name in PAPER_NETWORKS}

#: Bytes per parameter: fp32 weights (snapshots hold G_ema); a training state holds G, fake score and G_ema plus two
#: Adam moments for each of G and the fake score (7 copies).
_SNAPSHOT_BYTES_PER_PARAM, _STATE_BYTES_PER_PARAM, _SIDECAR_BYTES = 4, 7 * 4, 8_000


def disk_estimate(name: str, overrides: dict | None = None) -> dict:
    """Disk use of a preset's run directory, in bytes, from its duration, tick, snapshot and state settings.

    A snapshot is G_ema (parameters x 4 bytes), its JSON sidecar and a sample grid (at most its raw uint8 size);
    a training state is 7 x parameters x 4 bytes (G, fake score, G_ema and the two Adam moments of G and of the
    fake score). Snapshots come at tick 0, every ``snap_ticks`` ticks, at ``extra_snap_ticks`` and at the end;
    ``snapshot_keep_every`` keeps every N-th of them, the newest and the best (an upper bound); the rolling
    ``training-state.pt`` is one state, and ``numbered_state_ticks`` keeps one more per period.
    """
    preset = get_preset(name)
    cfg = DistillConfig.from_dict(distill_config_from(preset, overrides))
    net = paper_network(preset["network"])
    params = int(PAPER_NETWORKS[preset["network"]]["parameters"])
    # The loop's ticks: one after the first iteration, then every ceil(tick_kimg / batch) iterations, and one at the end.
    per_tick, total = math.ceil(cfg.tick_kimg * 1000 / cfg.batch), cfg.total_iterations()
    ticks = (total - 1) // per_tick + (1 if (total - 1) % per_tick else 0)
    snaps = {0, ticks} | (set(range(0, ticks + 1, cfg.snap_ticks)) if cfg.snap_ticks else set())
    snaps |= {t for t in getattr(cfg, "extra_snap_ticks", None) or () if t <= ticks}
    grid = cfg.grid_size * int(net.get("img_channels", 3)) * int(net["img_resolution"]) ** 2
    snapshot = params * _SNAPSHOT_BYTES_PER_PARAM + _SIDECAR_BYTES + grid
    state = params * _STATE_BYTES_PER_PARAM
    numbered = sum(1 for t in range(1, ticks + 2) if cfg.numbered_state_ticks and t % cfg.numbered_state_ticks == 0
                   and (t == ticks + 1 or (cfg.state_ticks and t % cfg.state_ticks == 0)))
    every = cfg.snapshot_keep_every
    kept = len(snaps) if every <= 0 else min(len(snaps), -(-len(snaps) // every) + 2)  # + the newest and the best
    return {"parameters": params, "ticks": ticks, "snapshots": len(snaps), "snapshots_kept": kept,
            "snapshot_bytes": snapshot, "snapshots_bytes": kept * snapshot, "state_bytes": state,
            "numbered_states": numbered, "states_bytes": (1 + numbered) * state,
            "total_bytes": kept * snapshot + (1 + numbered) * state}
