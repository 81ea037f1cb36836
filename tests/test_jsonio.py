"""sidlib's one JSON convention (sidlib.io.jsonio) and the run log built on it (sidlib.io.logs)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sidlib.io.atomic import TEMP_SUFFIX
from sidlib.io.jsonio import dumps, to_jsonable, write_json
from sidlib.io.logs import JsonlLogger, read_jsonl, training_curve


def test_non_finite_floats_become_null():
    got = to_jsonable({'nan': float('nan'), 'inf': float('inf'), 'minf': -math.inf, 'ok': 1.5,
                       'np_nan': np.float32('nan'), 'torch_inf': torch.tensor(float('inf')),
                       'nested': [1.0, float('nan'), {'x': -math.inf}]})
    assert got == {'nan': None, 'inf': None, 'minf': None, 'ok': 1.5, 'np_nan': None, 'torch_inf': None,
                   'nested': [1.0, None, {'x': None}]}
    assert dumps({'loss': float('nan'), 'scale': float('inf')}) == '{"loss": null, "scale": null}'


def test_numpy_and_torch_scalars_become_python_numbers():
    got = to_jsonable({'i': np.int64(3), 'f': np.float32(0.5), 'b': np.bool_(True), 't': torch.tensor(2.25),
                       'ti': torch.tensor(7), 'arr': np.arange(3), 'tensor': torch.tensor([[1, 2], [3, 4]])})
    assert got == {'i': 3, 'f': 0.5, 'b': True, 't': 2.25, 'ti': 7, 'arr': [0, 1, 2], 'tensor': [[1, 2], [3, 4]]}
    assert type(got['i']) is int and type(got['f']) is float and type(got['b']) is bool
    assert type(got['t']) is float and type(got['ti']) is int


def test_tuples_paths_and_keys():
    got = to_jsonable({1: (1, (2, 3)), 'p': Path('/tmp/x.npz'), 'none': None, 's': 'text'})
    assert got == {'1': [1, [2, 3]], 'p': '/tmp/x.npz', 'none': None, 's': 'text'}
    # A round trip through the text gives the same data.
    assert json.loads(dumps(got)) == got


def test_anything_else_is_refused_naming_its_type():
    with pytest.raises(TypeError, match='object'):
        to_jsonable({'x': object()})
    with pytest.raises(TypeError, match='set'):
        dumps({'x': {1, 2}})


def test_write_json_is_atomic_and_creates_folders(tmp_path):
    path = tmp_path / 'a' / 'b' / 'metrics.json'
    assert write_json(path, {'fid': np.float64(2.5), 'bad': float('nan')}) == path
    assert json.loads(path.read_text()) == {'fid': 2.5, 'bad': None}
    write_json(path, {'fid': 3})
    assert json.loads(path.read_text()) == {'fid': 3}
    assert not [p for p in tmp_path.rglob('*') if p.name.endswith(TEMP_SUFFIX)]


def test_jsonl_logger_writes_null_for_nan_and_reads_back(tmp_path):
    log = JsonlLogger(tmp_path / 'log.jsonl')
    log.log({'iteration': 1, 'loss_G': float('nan'), 'loss_fake': np.float32(0.25)})
    log.log({'iteration': 2, 'loss_G': 1.0, 'loss_fake': float('inf')})
    lines = (tmp_path / 'log.jsonl').read_text().splitlines()
    assert len(lines) == 2 and all('NaN' not in line and 'Infinity' not in line for line in lines)
    # Strict JSON: a parser that refuses NaN/Infinity constants reads every line.
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f'non-standard constant {c}')) for line in lines]
    assert strict == read_jsonl(tmp_path / 'log.jsonl') == [
        {'iteration': 1, 'loss_G': None, 'loss_fake': 0.25}, {'iteration': 2, 'loss_G': 1.0, 'loss_fake': None}]
    JsonlLogger(tmp_path / 'off.jsonl', enabled=False).log({'iteration': 1})
    assert not (tmp_path / 'off.jsonl').exists()


def test_truncate_after_drops_redone_iterations_and_a_torn_line(tmp_path):
    log = JsonlLogger(tmp_path / 'log.jsonl')
    for it in range(1, 6):
        log.log({'iteration': it})
    with open(tmp_path / 'log.jsonl', 'a') as f:
        f.write('{"iteration": 6, "loss')   # killed mid-write
    assert [r['iteration'] for r in read_jsonl(tmp_path / 'log.jsonl')] == [1, 2, 3, 4, 5]
    log.truncate_after(3)
    assert (tmp_path / 'log.jsonl').read_text().splitlines() == [json.dumps({'iteration': i}) for i in (1, 2, 3)]


def test_training_curve_returns_only_records_with_metrics(tmp_path):
    log = JsonlLogger(tmp_path / 'log.jsonl')
    log.log({'tick': 0, 'iteration': 1, 'images_seen': 4, 'kimg': 0.004, 'loss_G': 1.0,
             'metrics': {'fid10k_proxy': 30.5}})
    log.log({'tick': 1, 'iteration': 2, 'images_seen': 8, 'kimg': 0.008, 'loss_G': 0.9})
    log.log({'tick': 2, 'iteration': 3, 'images_seen': 12, 'kimg': 0.012, 'loss_G': 0.8, 'metrics': {}})
    log.log({'tick': 3, 'iteration': 4, 'images_seen': 16, 'kimg': 0.016, 'loss_G': 0.7,
             'metrics': {'fid10k_proxy': float('nan'), 'is10k_proxy': 2.0}})
    assert training_curve(tmp_path) == [
        {'kimg': 0.004, 'images_seen': 4, 'iteration': 1, 'fid10k_proxy': 30.5},
        {'kimg': 0.016, 'images_seen': 16, 'iteration': 4, 'fid10k_proxy': None, 'is10k_proxy': 2.0},
    ]
    assert training_curve(tmp_path / 'no-run') == []
