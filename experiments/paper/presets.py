"""The paper's five SiD runs as presets, read from ``paper/params.yaml``.

A preset is :class:`sidlib.distill.DistillConfig` values (its ``distill`` block: the official ``run_sid.sh``
settings in DistillConfig's own keys) plus its teacher and reference files:

* ``teacher``: a registered checkpoint name (:mod:`sidlib.io.registry`); ``network``: the key of
  :data:`sidlib.networks.PAPER_NETWORKS` the teacher's architecture must match (checked before any compute);
* ``fid_ref`` / ``pr_ref``: reference files (:mod:`sidlib.metrics.references`); ``isc``: also the Inception Score;
* ``teacher_sampler``: EDM's sampler settings for the teacher's own FID; ``released``: the released generators;
* ``resources``: the paper's GPUs and estimated GPU-hours (estimates, see the README).
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from sidlib.distill import ConfigError, DistillConfig
from sidlib.io.registry import SID_GENERATORS, registered_names
from sidlib.metrics.references import FID_REFERENCES, PR_REFERENCES
from sidlib.networks import PAPER_NETWORKS, paper_network

from ..common.params import ParamsError, check_keys, check_list, check_number, deep_merge, repo_root

__all__ = ["PRESET_KEYS", "params_file", "load_paper_params", "get_preset", "expected_teacher_kwargs",
           "distill_config", "check_teacher"]

PRESET_KEYS = ("teacher", "network", "fid_ref", "pr_ref", "isc", "teacher_sampler", "released", "resources", "distill")
_SAMPLER_KEYS = ("steps", "S_churn", "S_min", "S_max", "S_noise")
#: Keys of the stored architecture that do not change the teacher's function at evaluation (the students set the
#: first three; sigma_min/sigma_max are informational for EDMPrecond).
_NOT_CHECKED = ("augment_dim", "dropout", "use_fp16", "sigma_min", "sigma_max")


def params_file() -> Path:
    return repo_root() / "paper" / "params.yaml"


def _validate_preset(name: str, p: dict) -> None:
    where = f"presets.{name}"
    check_keys(p, where, PRESET_KEYS, PRESET_KEYS)
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


def distill_config(name: str, overrides: dict | None = None) -> dict:
    """The DistillConfig mapping of a preset, then ``overrides`` (DistillConfig keys); validated."""
    cfg = distill_config_from(get_preset(name), overrides)
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
