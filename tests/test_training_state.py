"""Training states: atomic round trip, and a clear error naming the file and what to do for corrupt or foreign ones."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch

from sidlib.io.edm_pickle import CheckpointError
from sidlib.io.training_state import (STATE_FORMAT, TrainingStateError, load_training_state,
                                      save_training_state)


class _Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture
def state_file(tmp_path):
    path = tmp_path / "run" / "training-state.pt"
    old = os.umask(0o022)
    try:
        save_training_state(path, {"iteration": 7, "net": {"w": torch.arange(6.0)}, "config": {"lr": 1e-4}})
    finally:
        os.umask(old)
    return path


def test_round_trip_and_mode(state_file):
    state = load_training_state(state_file)
    assert state["format"] == STATE_FORMAT and state["iteration"] == 7 and state["config"] == {"lr": 1e-4}
    assert torch.equal(state["net"]["w"], torch.arange(6.0))
    assert state_file.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in state_file.parent.iterdir()] == ["training-state.pt"]  # no temporary file left


def _variants(raw: bytes, marker) -> dict:
    foreign, payload, deflated = io.BytesIO(), io.BytesIO(), io.BytesIO()
    torch.save({"G": torch.zeros(2)}, foreign)  # e.g. another program's checkpoint
    torch.save({"format": STATE_FORMAT, "x": _Call(os.system, f"touch {marker}")}, payload)
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "garbage": os.urandom(4096),
        "flipped": raw[:64] + bytes(b ^ 0x5A for b in raw[64:1024]) + raw[1024:],
        "plain-pickle": pickle.dumps({"format": STATE_FORMAT}),
        "foreign": foreign.getvalue(),
        "payload": payload.getvalue(),
        "deflated": deflated.getvalue(),
    }


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "flipped", "plain-pickle", "foreign", "payload",
                                  "deflated"])
def test_corrupt_or_foreign_state_names_the_file_and_the_way_out(state_file, tmp_path, kind):
    marker = tmp_path / "marker"
    raw = _variants(state_file.read_bytes(), marker)[kind]
    state_file.write_bytes(raw)
    with pytest.raises(TrainingStateError) as err:
        load_training_state(state_file)
    msg = str(err.value)
    assert str(state_file) in msg and "Delete it" in msg and "numbered state" in msg
    assert "no numbered training-state-<kimg>.pt" in msg
    assert "weights_only" not in msg and len(msg) < 1000
    assert not marker.exists()
    if kind == "deflated":
        assert "compressed" in msg
    if kind == "foreign":
        assert STATE_FORMAT in msg


def test_error_points_at_the_latest_numbered_state(state_file):
    for kimg in (100, 300, 200):
        save_training_state(state_file.parent / f"training-state-{kimg:06d}.pt", {"iteration": kimg})
    state_file.write_bytes(b"\x00" * 100)
    with pytest.raises(TrainingStateError, match="latest numbered state is training-state-000300.pt"):
        load_training_state(state_file)
    # The error is a CheckpointError, and a ValueError as the format check used to raise.
    assert issubclass(TrainingStateError, CheckpointError) and issubclass(TrainingStateError, ValueError)
