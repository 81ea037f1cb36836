"""``python -m sidlib.distill``: run or resume SiD from a YAML/JSON config of :class:`DistillConfig` keys (errors
as :mod:`sidlib.cli`: one ``error: ...`` line and status 2, or the traceback with ``--debug``)."""

from __future__ import annotations

import argparse
from typing import List, Optional

import yaml

from .. import distributed as dist_utils
from ..cli import run_main, split_debug
from .config import ConfigError, DistillConfig
from .loop import distill

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m sidlib.distill',
                                description='Score identity Distillation of an EDM teacher (also under torchrun).')
    p.add_argument('--config', help='YAML or JSON file of DistillConfig keys')
    p.add_argument('--run-dir', help='output / resume directory (overrides run_dir)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override one config key (value parsed as YAML); repeatable')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    argv, debug = split_debug(argv)
    args, rest = p.parse_known_args(argv)

    def body():
        data = {}
        if args.config:
            with open(args.config, encoding='utf-8') as f:
                data = yaml.safe_load(f) or {}
            if not isinstance(data, dict):
                raise ConfigError(f'{args.config}: expected a mapping of config keys')
        for item in rest:
            if not item.startswith('--') or '=' not in item:
                p.error(f'unrecognised argument {item!r} (use --key=value or --set key=value)')
        for item in args.set + [a[2:] for a in rest]:
            key, sep, value = item.partition('=')
            if not sep:
                p.error(f'--set expects KEY=VALUE, got {item!r}')
            data[key.strip().replace('-', '_')] = yaml.safe_load(value)
        if args.run_dir:
            data['run_dir'] = args.run_dir
        run_dir = distill(DistillConfig.from_dict(data))
        if dist_utils.env_rank() == 0:
            print(run_dir)
    return run_main(body, debug)
