"""The paper's five SiD runs as presets, read from the ``paper:`` block of ``params.yaml``.

``params.yaml`` is the single source of the numbers (official ``run_sid.sh`` settings, spec §2.2); this module only
reads, validates and translates them:

* :func:`get_preset` -> plain dict (teacher, arch/cres, alpha, batch, batch_gpu, lr, glr, g_beta1, adam_eps, fp16,
  dropout, augment, ema_mimg, duration_mimg, tick_kimg, snap_ticks, metrics, fid_ref, pr_ref, teacher_sampler,
  released, resources).
* :func:`preset_to_distill_config` -> keys of :class:`sidlib.distill.DistillConfig`.
* :func:`expected_teacher_kwargs` / :func:`check_teacher` -> refuse a teacher whose architecture is not the preset's,
  before any compute (SiD's own loader would silently skip mismatched layers).

Units: ``ema_mimg`` and ``duration_mimg`` in millions of images, ``tick_kimg`` in thousands; ``snap_ticks`` and
``dump_ticks`` in ticks. CLI::

    python -m sidlib.presets list
    python -m sidlib.presets show cifar10-uncond
    python -m sidlib.presets distill-config cifar10-uncond --out cfg.yaml --set batch_gpu=8
    python -m sidlib.presets fetch-teacher cifar10-uncond --out data/paper/teachers/cifar10-uncond.pkl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = [
    "PARAMS_ENV_VAR", "PARAMS_KEY", "PRESET_KEYS", "ARCHITECTURES", "PresetError", "find_params_file",
    "load_paper_params", "preset_names", "get_preset", "expected_teacher_kwargs", "check_teacher",
    "preset_to_distill_config",
]

#: Environment variable naming an alternative params file.
PARAMS_ENV_VAR = "SIDLIB_PARAMS"
#: Top-level key of the paper block in params.yaml.
PARAMS_KEY = "paper"

#: Keys every preset must have, with the accepted Python types.
PRESET_KEYS: dict[str, tuple] = {
    "teacher": (str,), "arch": (str,), "cres": (list,), "resolution": (int,), "channels": (int,),
    "label_dim": (int,), "alpha": (int, float), "tmax": (int, float), "init_sigma": (int, float),
    "batch": (int,), "batch_gpu": (int,), "gpus": (int,), "lr": (float,), "glr": (float,),
    "g_beta1": (int, float), "adam_eps": (float,), "fp16": (bool,), "ls": (int, float), "lsg": (int, float),
    "dropout": (int, float), "augment": (int, float), "ema_mimg": (int, float), "duration_mimg": (int, float),
    "tick_kimg": (int, float), "snap_ticks": (int,), "dump_ticks": (int,), "metrics": (list,),
    "fid_ref": (str,), "pr_ref": (str, type(None)), "teacher_sampler": (dict,), "released": (dict,),
    "resources": (dict,),
}

#: SiD's ``--arch`` -> the EDM constructor kwargs it implies (spec §5.3); ``cres`` sets channel_mult.
ARCHITECTURES: dict[str, dict] = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128),
    "adm": dict(model_type="DhariwalUNet", model_channels=192),
}


class PresetError(ValueError):
    """Unknown preset, malformed params entry, or a teacher that does not fit the preset."""


def find_params_file(path: str | os.PathLike | None = None) -> Path:
    """The params file: ``path``, else ``$SIDLIB_PARAMS``, else ``./params.yaml``, else the repository's."""
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get(PARAMS_ENV_VAR):
        candidates.append(Path(os.environ[PARAMS_ENV_VAR]))
    else:
        candidates += [Path.cwd() / "params.yaml", Path(__file__).resolve().parents[1] / "params.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise PresetError(f"params file not found (looked at {', '.join(str(c) for c in candidates)}); "
                      f"pass a path or set ${PARAMS_ENV_VAR}")


def _validate(block: Any, where: str) -> dict:
    if not isinstance(block, dict):
        raise PresetError(f"{where}: `{PARAMS_KEY}` must be a mapping, got {type(block).__name__}")
    presets = block.get("presets")
    if not isinstance(presets, dict) or not presets:
        raise PresetError(f"{where}: `{PARAMS_KEY}.presets` must be a non-empty mapping of benchmark -> settings")
    for name, p in presets.items():
        key = f"{PARAMS_KEY}.presets.{name}"
        if not isinstance(p, dict):
            raise PresetError(f"{where}: `{key}` must be a mapping, got {type(p).__name__}")
        missing = [k for k in PRESET_KEYS if k not in p]
        if missing:
            raise PresetError(f"{where}: `{key}` is missing {', '.join(missing)}")
        for k, types in PRESET_KEYS.items():
            v = p[k]
            ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
            if not ok and float in types and isinstance(v, int) and not isinstance(v, bool):
                ok = True  # an integer-valued float such as `lr: 0` is fine
            if not ok:
                raise PresetError(f"{where}: `{key}.{k}` must be {'/'.join(t.__name__ for t in types)}, "
                                  f"got {v!r}")
        if p["arch"] not in ARCHITECTURES:
            raise PresetError(f"{where}: `{key}.arch` is {p['arch']!r}; valid: {sorted(ARCHITECTURES)}")
        for k in ("alpha", "tmax", "init_sigma", "lr", "glr", "ema_mimg", "duration_mimg", "tick_kimg"):
            if not (math.isfinite(float(p[k])) and (float(p[k]) > 0 or k == "alpha")):
                raise PresetError(f"{where}: `{key}.{k}` must be a positive finite number, got {p[k]!r}")
        if p["batch"] % p["batch_gpu"]:
            raise PresetError(f"{where}: `{key}.batch` ({p['batch']}) is not a multiple of batch_gpu "
                              f"({p['batch_gpu']})")
    selected = block.get("benchmarks", [])
    if not isinstance(selected, list) or any(b not in presets for b in selected):
        raise PresetError(f"{where}: `{PARAMS_KEY}.benchmarks` must be a list of preset names "
                          f"({sorted(presets)}), got {selected!r}")
    return block


def load_paper_params(path: str | os.PathLike | None = None) -> dict:
    """The validated ``paper:`` block of the params file (a deep copy)."""
    file = find_params_file(path)
    with open(file, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if PARAMS_KEY not in data:
        raise PresetError(f"{file}: no top-level `{PARAMS_KEY}:` block (the paper presets live there)")
    return copy.deepcopy(_validate(data[PARAMS_KEY], str(file)))


def preset_names(path: str | os.PathLike | None = None) -> list[str]:
    """Names of the paper presets, in file order."""
    return list(load_paper_params(path)["presets"])


def _merge(base: dict, overrides: Mapping, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if k not in out:
            raise PresetError(f"{where}: unknown key {k!r}; valid keys: {', '.join(sorted(out))}")
        out[k] = _merge(out[k], v, f"{where}.{k}") if isinstance(out[k], dict) and isinstance(v, Mapping) else v
    return out


def get_preset(name: str, overrides: Mapping | None = None, *, params_path=None) -> dict:
    """Plain dict of preset ``name`` (with ``name`` added), optionally with ``overrides`` merged in.

    Unknown names raise :class:`PresetError` listing the valid ones; unknown override keys raise naming the key.
    """
    params = load_paper_params(params_path)
    presets = params["presets"]
    if name not in presets:
        raise PresetError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(presets)}")
    p = _merge(presets[name], overrides or {}, f"{PARAMS_KEY}.presets.{name}")
    p["name"] = name
    _validate({"presets": {name: {k: v for k, v in p.items() if k != "name"}}}, "overrides")
    return p


def _as_preset(preset_or_name, params_path=None) -> dict:
    return get_preset(preset_or_name, params_path=params_path) if isinstance(preset_or_name, str) \
        else dict(preset_or_name)


def expected_teacher_kwargs(preset) -> dict:
    """EDMPrecond kwargs a preset's teacher must have: architecture, ``channel_mult``, resolution, channels,
    label_dim (spec §5.3/§5.4). ``augment_dim`` and ``dropout`` are not checked (they do not change the U-Net's
    function at evaluation, and the students set them from the preset)."""
    p = _as_preset(preset)
    kw = dict(ARCHITECTURES[p["arch"]])
    kw.update(channel_mult=list(p["cres"]), img_resolution=int(p["resolution"]), img_channels=int(p["channels"]),
              label_dim=int(p["label_dim"]))
    return kw


def check_teacher(preset, source=None, *, cache_dir=None) -> dict:
    """Compare a teacher checkpoint's stored architecture with the preset's, without building the network.

    source: any :func:`sidlib.checkpoints.read_network_meta` source; default the preset's ``teacher``.
    Returns the checkpoint's effective kwargs. Raises :class:`PresetError` naming every differing key.
    """
    from sidlib import checkpoints

    p = _as_preset(preset)
    source = p["teacher"] if source is None else source
    info = checkpoints.read_network_meta(source, cache_dir=cache_dir)
    eff = checkpoints.effective_kwargs(info["class_name"], info["init_kwargs"])
    diffs = [f"{k}: preset expects {v!r}, teacher has {eff.get(k, '<absent>')!r}"
             for k, v in expected_teacher_kwargs(p).items() if eff.get(k) != v]
    if info["class_name"] != "EDMPrecond":
        diffs.insert(0, f"class: SiD needs an EDMPrecond teacher, got {info['class_name']}")
    if diffs:
        raise PresetError(f"teacher {source} does not match preset {p.get('name', '?')!r} "
                          f"(arch {p['arch']}, cres {p['cres']}): " + "; ".join(diffs))
    return eff


def preset_to_distill_config(preset, overrides: Mapping | None = None, *, params_path=None) -> dict:
    """Keys of :class:`sidlib.distill.DistillConfig` for a preset, then ``overrides`` (DistillConfig keys).

    Mapping: ``fp16`` -> ``precision`` ('fp16'/'fp32'), ``augment`` -> ``augment_p``, ``ema_mimg`` ->
    ``ema_halflife_kimg`` (x1000), ``duration_mimg`` -> ``duration_kimg`` (x1000), the expected architecture ->
    ``teacher_kwargs`` (so the loader refuses a mismatched teacher). An ``iterations`` override replaces the
    duration. The result passes ``DistillConfig.from_dict``.
    """
    p = _as_preset(preset, params_path)
    cfg = dict(
        teacher=p["teacher"], teacher_kwargs=expected_teacher_kwargs(p), alpha=float(p["alpha"]),
        tmax=float(p["tmax"]), init_sigma=float(p["init_sigma"]), batch=int(p["batch"]),
        batch_gpu=int(p["batch_gpu"]), lr=float(p["lr"]), glr=float(p["glr"]), g_beta1=float(p["g_beta1"]),
        adam_eps=float(p["adam_eps"]), ls=float(p["ls"]), lsg=float(p["lsg"]), dropout=float(p["dropout"]),
        augment_p=float(p["augment"]), ema_halflife_kimg=float(p["ema_mimg"]) * 1000.0,
        duration_kimg=float(p["duration_mimg"]) * 1000.0, tick_kimg=float(p["tick_kimg"]),
        snap_ticks=int(p["snap_ticks"]), precision="fp16" if p["fp16"] else "fp32",
    )
    overrides = dict(overrides or {})
    if "iterations" in overrides:
        cfg.pop("duration_kimg")
    cfg.update(overrides)
    try:
        from sidlib.distill import DistillConfig
    except ImportError:  # distill not importable: return the plain mapping unchecked
        return cfg
    known = {f for f in DistillConfig.__dataclass_fields__}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise PresetError(f"override keys {unknown} are not DistillConfig keys; valid: {sorted(known)}")
    return cfg


def _parse_value(text: str):
    return yaml.safe_load(text)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sidlib.presets", description="Paper presets from params.yaml")
    ap.add_argument("--params", default=None, help="params file (default: $SIDLIB_PARAMS or ./params.yaml)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    s = sub.add_parser("show")
    s.add_argument("name")
    d = sub.add_parser("distill-config", help="write a sidlib.distill config for a preset")
    d.add_argument("name")
    d.add_argument("--out", required=True)
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="DistillConfig override")
    c = sub.add_parser("check-teacher")
    c.add_argument("name")
    c.add_argument("--source", default=None)
    t = sub.add_parser("fetch-teacher", help="download a preset's teacher, check its architecture, copy it to --out")
    t.add_argument("name")
    t.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(preset_names(args.params)))
    elif args.cmd == "show":
        print(yaml.safe_dump(get_preset(args.name, params_path=args.params), sort_keys=False))
    elif args.cmd == "check-teacher":
        check_teacher(get_preset(args.name, params_path=args.params), args.source)
        print(f"teacher matches preset {args.name}")
    elif args.cmd == "fetch-teacher":
        from sidlib.atomic import atomic_copy
        from sidlib.checkpoints import resolve_source
        preset = get_preset(args.name, params_path=args.params)
        src, _ = resolve_source(preset["teacher"])
        check_teacher(preset, str(src))
        out = atomic_copy(src, args.out)
        print(f"{preset['teacher']} -> {out}")
    else:
        overrides = {}
        for item in args.set:
            k, sep, v = item.partition("=")
            if not sep:
                raise PresetError(f"--set expects KEY=VALUE, got {item!r}")
            overrides[k.strip()] = _parse_value(v)
        cfg = preset_to_distill_config(args.name, overrides, params_path=args.params)
        from sidlib.atomic import atomic_write_text
        atomic_write_text(args.out, yaml.safe_dump(cfg, sort_keys=False))
        print(json.dumps(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
