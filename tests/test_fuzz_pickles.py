"""Fuzzing the network-pickle reader: a few hundred mutated pickles (seeded, so the same every run), loaded with
``load_network`` in a separate process under an address-space limit and a per-file time limit.

Every mutant must end in a CheckpointError (or load, when the mutation left a valid network pickle, e.g. a changed
number), within bounded memory and time, with no other exception type, no memory/recursion safety net tripped,
and no marker file written by the code-execution payloads spliced into many of them.

``python tests/test_fuzz_pickles.py OUT.json`` runs the fuzzing and writes the outcomes.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SEED, COUNT = 1234, 400
ERRORS = {"CheckpointError", "UnsafePickleError"}


def unframed(raw: bytes) -> bytes:
    """The same pickle without its FRAME opcodes (optional in protocols 4 and 5), so that mutations reach past them."""
    cuts = [pos for op, _, pos in pickletools.genops(raw) if op.name == "FRAME"]
    return b"".join(raw[a + (9 if a in cuts else 0):b] for a, b in zip([0] + cuts, cuts + [len(raw)]))


def _payloads(marker: Path) -> list[bytes]:
    """Code-execution payloads that would create ``marker``: their opcodes between PROTO and STOP."""
    sys.path.insert(0, str(HERE))
    from hostile import Reduce

    payloads = [unframed(pickle.dumps(Reduce(os.system, f"touch {marker}"), protocol=p))[2:-1] for p in (2, 4)]
    payloads.append(unframed(pickle.dumps(Reduce(eval, f"open({str(marker)!r}, 'w').close()"), protocol=4))[2:-1])
    payloads.append(unframed(pickle.dumps(Reduce(subprocess.call, ["touch", str(marker)]), protocol=4))[2:-1])
    payloads.append(f"cos\nsystem\n(Vtouch {marker}\ntR".encode())
    return payloads


def _snippets(marker: Path) -> list[bytes]:
    """Opcode fragments worth inserting: length prefixes and memo indices far past the data, stack and memo
    manipulations, BUILD/REDUCE, and whole code-execution payloads."""
    return _payloads(marker) + [
        b"r" + struct.pack("<I", 1 << 26), b"r\xff\xff\xff\xff", b"h\xfe", b"j" + struct.pack("<I", 1 << 30),
        b"\x8e" + struct.pack("<Q", 1 << 40), b"B\xff\xff\xff\x7f", b"\x95" + struct.pack("<Q", 1 << 60),
        b"\x8a\xff" + b"\x7f" * 255, b"I" + b"9" * 5000 + b"\n", b"(", b"0", b"1", b"2", b"a", b"b", b"e", b"s", b"u",
        b"R", b"\x81", b"\x93", b"]", b"}", b")", b"\x8f", b"\x90", b"\x91", b"t", b"\x85", b"\x86", b"N", b"\x94",
        b"P0\n", b"Q", b"\x82\x01", b"\x97", b"\x80\x09",
    ]


def mutants(base: list[bytes], marker: Path, seed: int = SEED, count: int = COUNT) -> list[bytes]:
    rng = random.Random(seed)
    snippets = _snippets(marker)
    bounds = [[pos for _, _, pos in pickletools.genops(b)] for b in base]
    out = []
    for _ in range(count):
        i = rng.randrange(len(base))
        data, ops = bytearray(base[i]), bounds[i]
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            kind = rng.randrange(7)
            at = rng.choice(ops) if rng.random() < 0.7 else rng.randrange(len(data) + 1)
            at = min(at, len(data))
            if kind == 0:  # flip bytes
                for _ in range(rng.randint(1, 4)):
                    j = rng.randrange(len(data))
                    data[j] ^= rng.randrange(1, 256)
            elif kind == 1:  # truncate
                del data[rng.randrange(len(data)):]
            elif kind == 2:  # insert an opcode fragment or a payload at an opcode boundary
                data[at:at] = rng.choice(snippets)
            elif kind == 3:  # delete a slice
                del data[at:at + rng.randint(1, 64)]
            elif kind == 4:  # duplicate a slice elsewhere
                j = rng.randrange(len(data))
                data[at:at] = data[j:j + rng.randint(1, 256)]
            elif kind == 5:  # a length prefix or memo index set to something large
                data[at:at + 1 + 4] = rng.choice((b"X", b"B", b"r", b"j", b"T")) + struct.pack(
                    "<I", rng.choice((1 << 31, 1 << 26, len(data), rng.randrange(1 << 32))))
            else:  # swap two slices (reorders opcodes)
                j = rng.randrange(len(data))
                a, b = data[at:at + 16], data[j:j + 16]
                data[at:at + 16], data[j:j + 16] = b, a
            if not data:
                data = bytearray(b"\x80")
        out.append(bytes(data))
    return out


def payload_splices(base: bytes, marker: Path, seed: int = SEED, per_payload: int = 10) -> list[bytes]:
    """Each payload spliced, intact, at opcode boundaries of a valid pickle: the reader meets it before any error."""
    rng = random.Random(seed)
    ops = [pos for op, _, pos in pickletools.genops(base) if op.name != "PROTO"]
    return [base[:at] + p + base[at:] for p in _payloads(marker) for at in rng.sample(ops, per_payload)]


def _base_pickles() -> list[bytes]:
    sys.path.insert(0, str(HERE))
    import edm_format
    from hostile import network_pickle, tiny_net

    net = tiny_net()
    framed = network_pickle(net)
    return [framed, unframed(framed), unframed(framed), network_pickle(net, protocol=3),
            unframed(edm_format.write_edm_pickle(None, {"ema": net}, protocol=5))]


def run(out: Path) -> None:
    """Write, load and judge every mutant (this process: a separate one, with limits)."""
    import resource

    import torch

    from sidlib.io.checkpoints import load_network

    torch.set_num_threads(1)
    root = out.parent / "mutants"
    root.mkdir(exist_ok=True)
    marker = out.parent / "marker"
    base = _base_pickles()
    (root / "base.pkl").write_bytes(base[0])
    load_network(root / "base.pkl")  # warm-up: imports, first use of the meta device
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def timeout(*_):
        raise TimeoutError("mutant took longer than 10 s")

    signal.signal(signal.SIGALRM, timeout)
    base_rss, results, t_all = rss("VmRSS"), [], time.perf_counter()
    groups = ["random"] * COUNT + ["payload"] * (5 * 10)
    for n, data in enumerate(mutants(base, marker) + payload_splices(base[1], marker)):
        path = root / f"m{n:03d}.pkl"
        path.write_bytes(data)
        t0 = time.perf_counter()
        signal.alarm(10)
        try:
            load_network(path)
            error, message = None, ""
        except BaseException as e:  # judged by the test
            error, message = type(e).__name__, str(e)[:500]
        finally:
            signal.alarm(0)
        results.append(dict(n=n, group=groups[n], error=error, message=message, seconds=time.perf_counter() - t0))
        path.unlink()
    summary = dict(results=results, total_seconds=time.perf_counter() - t_all, marker_written=marker.exists(),
                   peak_mib=(rss("VmHWM") - base_rss) / (1 << 20))
    out.write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "fuzz.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_mutants_are_deterministic_and_unframing_keeps_the_pickle(tmp_path):
    base = [pickle.dumps({"a": [1, 2.5, "x" * 100_000]}, protocol=4)]
    assert mutants(base, tmp_path / "m", count=20) == mutants(base, tmp_path / "m", count=20)
    assert pickle.loads(unframed(base[0])) == pickle.loads(base[0]) and len(unframed(base[0])) < len(base[0])


def test_every_mutant_ends_in_checkpoint_error_or_loads(fuzz):
    results = [r for r in fuzz["results"] if r["group"] == "random"]
    assert len(results) == COUNT
    other = [r for r in results if r["error"] is not None and r["error"] not in ERRORS]
    assert not other, other[:5]
    assert not [r for r in fuzz["results"] if "MemoryError" in r["message"] or "RecursionError" in r["message"]]
    refused = sum(r["error"] is not None for r in results)
    assert refused >= 0.9 * COUNT, refused  # mutations rarely leave a valid network pickle


def test_every_spliced_payload_is_refused_by_name(fuzz):
    spliced = [r for r in fuzz["results"] if r["group"] == "payload"]
    assert len(spliced) == 50
    assert all(r["error"] == "UnsafePickleError" and "not on the allow-list" in r["message"] for r in spliced)


def test_no_payload_ran_and_the_run_was_bounded(fuzz):
    assert not fuzz["marker_written"]
    assert max(r["seconds"] for r in fuzz["results"]) < 5
    assert fuzz["total_seconds"] < 60
    assert fuzz["peak_mib"] < 200


if __name__ == "__main__":
    run(Path(sys.argv[1]))
