"""Hostile checkpoint files (memory and time bombs, forged opcodes, payloads): each is refused with a
CheckpointError naming the file, within bounded memory and time, and nothing in them runs.

The files are built and loaded by ``tests/hostile.py`` in a separate process (each load in a fork, under an
address-space limit and a time limit); ``python tests/hostile.py`` prints the same results as the README table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ERRORS = {"CheckpointError", "UnsafePickleError", "TrainingStateError"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "results.json"
    proc = subprocess.run([sys.executable, str(HERE / "hostile.py"), str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["kind"]: r for r in json.loads(out.read_text())}


def _kinds():
    sys.path.insert(0, str(HERE))
    import hostile

    return hostile


def test_every_kind_was_tried(results):
    assert len(results) >= 25
    assert not any(r["marker_written"] for r in results.values())  # no payload ran


def test_valid_files_load_and_hostile_ones_are_refused_by_name(results):
    for kind, r in results.items():
        if r["expect"] is None:
            assert r["error"] is None, (kind, r["message"])
            continue
        assert r["error"] in ERRORS, (kind, r["error"], r["message"])
        assert re.search(r["expect"], r["message"]), (kind, r["message"])
        assert r["path"] in r["message"], (kind, r["message"])  # names the file (a sidecar pair: its stem)
        assert len(r["message"]) < 4000, kind  # bounded: never a repr of what the file holds
        for noise in ("MemoryError", "RecursionError: maximum recursion depth exceeded in", "weights_only=False"):
            assert noise not in r["message"], (kind, r["message"])


def test_memory_and_time_are_bounded(results):
    for kind, r in results.items():
        size_mib = r["size"] / (1 << 20)
        # At most a few copies of the file's own bytes (a storage is read from the file once), never its expansion.
        assert r["peak_mib"] < 64 + 4 * size_mib, (kind, r["peak_mib"])
        assert r["seconds"] < 15, (kind, r["seconds"])  # generous: the machine running the tests may be busy


def test_the_bombs_are_what_they_claim(tmp_path):
    """Controls: the crafted objects really are huge when expanded, and the payload really runs under pickle."""
    import pickle

    hostile = _kinds()
    bomb = hostile.shared_bomb(45)
    raw = pickle.dumps(bomb, protocol=4)
    assert len(raw) < 1000
    paths, node = 1, bomb
    while isinstance(node, list):
        assert node[0] is node[1]
        paths, node = paths * 2, node[0]
    assert paths == 2 ** 45
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(hostile.Reduce(os.system, f"touch {marker}")))
    assert marker.exists()
