"""Test-only builders of hostile checkpoint files, and a runner that loads each in a fresh fork with a memory cap.

``python tests/hostile.py`` builds every kind in a temporary folder, loads each and prints the table of the README's
security section: hostile file kind | refused with | peak memory | time.

The files are crafted with :mod:`pickle` (shared references and ``__reduce__`` make tiny pickles of huge object
graphs), raw opcodes, :mod:`zipfile` and JSON. Peak memory is the rise of the loading process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) over its resident set before the load; the loads run in a
process forked from one that has already loaded a network (imports and first-use costs are not counted), under an
address-space limit, with a time limit.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import signal
import struct
import sys
import time
import re
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import edm_format  # noqa: E402

from sidlib.io.checkpoints import load_network, save_network  # noqa: E402
from sidlib.io.edm_pickle import read_edm_pickle  # noqa: E402
from sidlib.io.training_state import load_training_state, save_training_state  # noqa: E402
from sidlib.networks import build_network, edm_kwargs  # noqa: E402

MIB = 1 << 20
#: Address space a load may add on top of the warmed-up process (a runaway allocation fails instead of swapping).
EXTRA_ADDRESS_SPACE = 4 << 30


class Reduce:
    """Pickles as ``func(*args)`` (plus ``state``, which pickle applies with BUILD)."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


class _ForgedState(edm_format.PersistentObject):
    """A persistent object whose pickle ends with a BUILD that would replace the record's state and class name."""

    def __reduce__(self):
        return (*super().__reduce__(), {"state": None, "class_name": 7})


class _DeclaredStorage:
    """Stands for a storage in a hand-written legacy blob (its persistent id is written out below)."""


class _BlobPickler(pickle.Pickler):
    def __init__(self, file, declared):
        super().__init__(file, protocol=2)
        self.declared = declared

    def persistent_id(self, obj):  # torch's legacy persistent id: ('storage', type, key, location, numel, view)
        return ("storage", torch.FloatStorage, "0", "cpu", self.declared, None) if obj is _DeclaredStorage else None


def hand_written_blob(values, declared: int) -> bytes:
    """A legacy storage blob of float32 ``values`` whose header declares ``declared`` elements (torch's layout:
    magic number, protocol version, system info, the storage's persistent id, key list, element count, data)."""
    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001,
                {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, buf, protocol=2)
    _BlobPickler(buf, declared).dump(_DeclaredStorage)
    pickle.dump(["0"], buf, protocol=2)
    data = np.asarray(values, dtype="<f4")
    return buf.getvalue() + struct.pack("<q", data.size) + data.tobytes()


def shared_bomb(levels: int = 45):
    """A list with 2**levels paths to its leaf, each level two references to the one below: a tiny pickle."""
    x = 0
    for _ in range(levels):
        x = [x, x]
    return x


def tiny_net(arch: str = "mlp", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "mlp":
        kwargs = dict(img_resolution=1, img_channels=2, model_type="MLPNet", model_channels=8, num_layers=2)
    else:
        kwargs = edm_kwargs("ddpmpp", img_resolution=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                            model_channels=16)
    return build_network("EDMPrecond", {**kwargs, **overrides}).eval()


def legacy_blob(t: torch.Tensor) -> bytes:
    """A storage as torch's pickle reducer writes it: a legacy (non-zip) ``torch.save`` of the typed storage."""
    typed = torch.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)
    buf = io.BytesIO()
    torch.save(typed, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def storage(t: torch.Tensor) -> Reduce:
    return Reduce(torch.storage._load_from_bytes, legacy_blob(t))


def tensor(store: Reduce, size, stride, offset=0) -> Reduce:
    return Reduce(torch._utils._rebuild_tensor_v2, store, offset, size, stride, False, None)


def network_pickle(net=None, *, protocol: int = 4, kwargs_extra=None, **snapshot) -> bytes:
    """An EDM network snapshot of ``net`` (default :func:`tiny_net`), with values added to its ``_init_kwargs``."""
    ema = edm_format.as_persistent(net if net is not None else tiny_net())
    ema.state["_init_kwargs"].update(kwargs_extra or {})
    return edm_format.write_edm_pickle(None, edm_format.edm_snapshot(ema, **snapshot), protocol=protocol)


def splice(raw: bytes, placeholder: str, opcodes: bytes) -> bytes:
    """Replace the string ``placeholder`` of a protocol-3 pickle (BINUNICODE, no frames) by raw opcodes."""
    literal = b"X" + struct.pack("<I", len(placeholder)) + placeholder.encode()
    assert raw.count(literal) == 1
    return raw.replace(literal, opcodes)


def deflated_zeros_zip(name: str, size: int) -> bytes:
    """A zip whose entry ``name`` inflates to ``size`` zero bytes (written block by block, never held inflated)."""
    block = 1 << 24
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    one = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)  # the state is reset: every block is the same
    data = one * (size // block) + c.flush()
    crc = 0
    for _ in range(size // block):
        crc = zlib.crc32(bytes(block), crc)
    n = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(n), 0) + n
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size, len(n),
                          0, 0, 0, 0, 0, 0) + n
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    return local + data + central + end


def build_all(root: Path, marker: Path) -> list[dict]:
    """Write every hostile file into ``root``; returns ``[{kind, path, loader, expect}]`` (``expect``: a regex
    of the error, or None for files that load)."""
    root.mkdir(parents=True, exist_ok=True)
    out = []

    def add(kind, name, data, loader, expect):
        path = root / name
        path.write_bytes(data) if isinstance(data, bytes) else None
        out.append(dict(kind=kind, path=str(path), loader=loader, expect=expect))

    add("control: a valid EDM snapshot (MLP)", "valid.pkl", network_pickle(), "load", None)
    add("control: a valid EDM snapshot (DDPM++, 8x8)", "valid-ddpmpp.pkl", network_pickle(tiny_net("ddpmpp")), "load",
        None)
    bomb = shared_bomb()
    add("2^45-path shared list in _init_kwargs", "bomb-kwargs.pkl", network_pickle(kwargs_extra={"x": bomb}), "load",
        "expand to more than")
    add("2^45-path shared list in dataset_kwargs", "bomb-dataset.pkl",
        network_pickle(dataset_kwargs={"path": bomb}), "load", "expand to more than")
    add("2^45-path shared list in the loss kwargs", "bomb-loss.pkl",
        network_pickle(loss_fn=edm_format.persistent_plain("EDMLoss", {"P_mean": bomb})), "load",
        "expand to more than")
    ema = edm_format.as_persistent(tiny_net())
    sub = edm_format.PersistentObject("Leaf", {"_modules": {}})
    for _ in range(45):
        sub = edm_format.PersistentObject("Node", {"_modules": {"a": sub, "b": sub}})
    ema.state["_modules"]["extra"] = sub
    add("2^45-path shared module tree", "bomb-modules.pkl", edm_format.write_edm_pickle(None, {"ema": ema}), "load",
        "expand to more than")
    add("2^45-path shared list as a tensor size (reaches an error's repr)", "bomb-repr.pkl",
        pickle.dumps({"ema": tensor(storage(torch.zeros(4)), bomb, bomb)}, protocol=4), "load",
        "expand to more than")
    loop = []
    loop.append(loop)
    add("self-referencing list in _init_kwargs", "cycle.pkl", network_pickle(kwargs_extra={"x": loop}), "load",
        "cycle")
    deep = splice(network_pickle(protocol=3, kwargs_extra={"x": "PLACEHOLDER"}), "PLACEHOLDER",
                  b"]" * 100_000 + b"a" * 99_999)
    add("list nested 10^5 deep in _init_kwargs", "deep.pkl", deep, "load", "nested more than")
    forged = edm_format.as_persistent(tiny_net())
    forged.__class__ = _ForgedState
    add("BUILD replacing a validated record's state", "build.pkl",
        edm_format.write_edm_pickle(None, {"ema": forged}), "load", "BUILD on a result of")
    big = storage(torch.zeros(4 * MIB))  # 16 MiB of float32, referenced by 128 full views
    add("one 16 MiB storage blob viewed by 128 tensors", "views.pkl",
        pickle.dumps({f"w{i}": tensor(big, (4 * MIB,), (1,)) for i in range(128)}, protocol=4), "read",
        "claim more elements")
    blob = deflated_zeros_zip("archive/data/0", 1 << 30)
    add("zip-deflated blob of 1 GiB zeros, referenced 4 times", "zipbomb.pkl",
        pickle.dumps({f"w{i}": tensor(Reduce(torch.storage._load_from_bytes, blob), (1 << 28,), (1,))
                      for i in range(4)}, protocol=4), "read", "zip archive")
    lying = Reduce(torch.storage._load_from_bytes, hand_written_blob([1.0, 2.0, 3.0], declared=1 << 40))
    add("storage blob declaring 2^40 elements, holding 3", "blob-size.pkl",
        pickle.dumps({"w": tensor(lying, (3,), (1,))}, protocol=4), "read", "declares 1099511627776")
    add("LONG_BINPUT 2^26 (9 bytes)", "memo.pkl", b"\x80\x04Nr" + struct.pack("<I", 1 << 26) + b".", "read",
        "memo index")
    add("BINBYTES8 declaring 1 TiB (14 bytes)", "bytes8.pkl", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc",
        "read", "exceeds|remain")
    add("FRAME declaring 2^60 bytes", "frame.pkl", b"\x80\x04\x95" + struct.pack("<Q", 1 << 60) + b"N.", "read",
        "frame longer")
    body = b"cbuiltins\nset\nq\x00](" + b"X\x01\x00\x00\x00a" * 10_000 + b"e\x85q\x01R0" + b"h\x00h\x01R0" * 100_000
    add("10^5 set() calls on one shared 10^4-string list", "set-calls.pkl", b"\x80\x03" + body + b"}.", "read",
        "more than")
    add("dict keyed by tuples (hash collisions)", "tuple-keys.pkl",
        pickle.dumps({"ema": {(i, -1): 0 for i in range(1000)}}, protocol=4), "read", "not a string")
    src = "#" * (10 * MIB)  # one 10 MiB module source shared by 10^4 persistent objects: hashed once, not 10^4 times
    data = edm_format.edm_snapshot(tiny_net())
    data["extra"] = [edm_format.PersistentObject("X", {}, src) for _ in range(10_000)]
    raw = edm_format.write_edm_pickle(None, data, module_src=src)
    add("10^4 records sharing one 10 MiB module source (loads)", "module-src.pkl", raw, "load", None)
    add("os.system payload (would write a marker file)", "payload.pkl",
        pickle.dumps({"ema": Reduce(os.system, f"touch {marker}")}), "load", "not on the allow-list")

    net = tiny_net("ddpmpp")
    for channels in (512, 2048):
        d = root / f"sidecar-{channels}"
        save_network(d / "net", net)
        doc = json.loads((d / "net.json").read_text())
        doc["init_kwargs"]["model_channels"] = channels
        (d / "net.json").write_text(json.dumps(doc))
        add(f"sidecar claiming model_channels={channels} beside small weights", f"sidecar-{channels}/net", None,
            "load", "do not match")
    d = root / "sidecar-blocks"
    save_network(d / "net", net)
    doc = json.loads((d / "net.json").read_text())
    doc["init_kwargs"]["num_blocks"] = 10**6
    (d / "net.json").write_text(json.dumps(doc))
    add("sidecar claiming num_blocks=10^6", "sidecar-blocks/net", None, "load", "far more modules")
    d = root / "sidecar-deep"
    save_network(d / "net", net)
    (d / "net.json").write_text("[" * 100_000 + "]" * 100_000)
    add("sidecar of JSON nested 10^5 deep", "sidecar-deep/net", None, "load", "not valid JSON")

    state = root / "state" / "training-state.pt"
    save_training_state(state, {"iteration": 1, "w": torch.zeros(1000)})
    raw = state.read_bytes()
    add("training state truncated to half", "state-truncated.pt", raw[: len(raw) // 2], "state", "Delete it")
    add("training state with bytes flipped", "state-flipped.pt",
        raw[:100] + bytes(b ^ 0xFF for b in raw[100:400]) + raw[400:], "state", "Delete it")
    buf = io.BytesIO()
    torch.save({"format": "sidlib-training-state/1", "x": Reduce(os.system, f"touch {marker}")}, buf)
    add("training state with an os.system payload", "state-payload.pt", buf.getvalue(), "state",
        "not a readable sidlib training state")
    add("training state that is a deflated 1 GiB zip", "state-zip.pt", deflated_zeros_zip("archive/data.pkl", 1 << 30),
        "state", "compressed")
    buf = io.BytesIO()
    torch.save({"net": torch.zeros(3)}, buf)
    add("foreign torch.save file as training state", "state-foreign.pt", buf.getvalue(), "state", "no 'sidlib")
    return out


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _load_one(case: dict) -> dict:
    loader = {"read": read_edm_pickle, "load": load_network, "state": load_training_state}[case["loader"]]
    vm = _status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm + EXTRA_ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.alarm(60)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status("VmRSS")
    t0 = time.perf_counter()
    try:
        loader(case["path"])
        error, message = None, ""
    except Exception as e:  # recorded, judged by the caller
        error, message = type(e).__name__, str(e)
    return dict(case, error=error, message=message[:2000], seconds=time.perf_counter() - t0,
                peak_mib=(_status("VmHWM") - base) / MIB, size=_size(case["path"]))


def _size(path: str) -> int:
    """Bytes on disk of a case: its file, or the files beside it (a sidecar pair is named by its stem)."""
    return os.path.getsize(path) if os.path.isfile(path) else sum(p.stat().st_size for p in Path(path).parent.iterdir())


def run_all(cases: list[dict]) -> list[dict]:
    """Load every case in a fork of this (warmed-up) process; a crash or timeout is recorded as such."""
    torch.set_num_threads(1)  # no OpenMP pool before fork()
    for case in cases:
        if case["kind"].startswith("control"):
            load_network(case["path"])  # warm-up: imports, first use of the meta device
    results = []
    for case in cases:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            try:
                payload = json.dumps(_load_one(case)).encode()
            except BaseException as e:  # noqa: BLE001 -- report anything
                payload = json.dumps(dict(case, error="runner: " + repr(e), message="", seconds=0, peak_mib=0)).encode()
            os.write(w, payload)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        results.append(json.loads(data) if data else dict(case, error=f"child died (status {status})", message="",
                                                            seconds=float("nan"), peak_mib=float("nan")))
    return results


def table(results: list[dict], root: str = "") -> str:
    rows = ["| hostile file | size | refused with | peak memory | time |", "|---|---:|---|---:|---:|"]
    for r in results:
        size = r.get("size", 0)
        message = re.sub(re.escape(root) + r"[^ ']*", "<file>", r["message"]) if root else r["message"]
        first = message.split("; ")[0].split(". ")[0]
        outcome = f"`{r['error']}`: {first[:90]}" if r["error"] else "loads"
        rows.append(f"| {r['kind']} | {size / 1024:,.1f} KiB | {outcome} | {r['peak_mib']:.0f} MiB | "
                    f"{r['seconds']:.2f} s |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    # python tests/hostile.py [results.json]: build, load, print the table (and write the results as JSON).
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "marker"
        results = run_all(build_all(Path(tmp) / "files", marker))
        for r in results:
            r["marker_written"] = marker.exists()
        if len(sys.argv) > 1:
            Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
        print(table(results, str(Path(tmp) / "files")))
        print(f"\nmarker file written: {marker.exists()}")
