"""Checkpoint loading: EDM/SiD-format pickles, refusals, registry, and our safetensors format."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import edm_format  # noqa: E402  (test-only writer beside this file)

from sidlib.io import checkpoints, download as dl, registry  # noqa: E402
from sidlib.io.checkpoints import (SID_GENERATORS, TEACHER_ALIASES, TEACHERS, CheckpointError,  # noqa: E402
                                   UnsafePickleError, load_checkpoint, load_network, read_network_meta,
                                   save_network)
from sidlib.io.edm_pickle import ALLOWED_GLOBALS, PersistentRecord, load_storage_blob, read_edm_pickle  # noqa: E402
from sidlib.io.edm_records import network_from_record  # noqa: E402
from sidlib.networks import build_network, edm_kwargs  # noqa: E402

RES = 8
# Scaled-down versions of EDM's three architectures (sidlib's table of EDM's --arch kwargs).
_SMALL = dict(img_resolution=RES, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
CONFIGS = {
    "ddpmpp-cond": edm_kwargs("ddpmpp", label_dim=10, model_channels=16, augment_dim=9, dropout=0.13, **_SMALL),
    "ncsnpp-uncond": edm_kwargs("ncsnpp", model_channels=16, augment_dim=9, dropout=0.13, **_SMALL),
    "adm-cond": edm_kwargs("adm", label_dim=5, use_fp16=True, model_channels=64, augment_dim=0, dropout=0.10,
                           **_SMALL),
}
EXPECTED_GLOBALS = {  # the globals Hugging Face's scanner lists for a SiD snapshot
    "torch_utils.persistence._reconstruct_persistent_obj", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter", "numpy.dtype", "collections.OrderedDict",
    "torch.storage._load_from_bytes", "torch.nn.modules.container.ModuleDict",
}
LEGACY_MAGIC_PICKLE = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def make_net(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny network whose every weight is perturbed (so zero-initialised layers matter too)."""
    torch.manual_seed(seed)
    net = build_network("EDMPrecond", CONFIGS[name])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def net_inputs(net, n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, RES, RES, generator=g)
    sigma = torch.tensor([0.02, 0.7, 40.0][:n])
    labels = None
    if net.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(n) % net.label_dim, net.label_dim).float()
    aug_dim = net.init_kwargs.get("augment_dim", 0)
    aug = torch.randn(n, aug_dim, generator=g) if aug_dim else None
    return x, sigma, labels, aug


def outputs(net, inputs):
    x, sigma, labels, aug = inputs
    with torch.no_grad():
        return net(x, sigma, class_labels=labels, augment_labels=aug)


@pytest.fixture(scope="module")
def nets():
    return {name: make_net(name, seed=i) for i, name in enumerate(CONFIGS)}


@pytest.fixture(scope="module")
def edm_pkl(nets, tmp_path_factory):
    path = tmp_path_factory.mktemp("pkl") / "edm-tiny-ddpmpp.pkl"
    edm_format.write_edm_pickle(path, edm_format.edm_snapshot(nets["ddpmpp-cond"]))
    return path


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------ EDM format writer


def test_writer_pickles_like_edm(nets):
    raw = edm_format.write_edm_pickle(None, edm_format.edm_snapshot(nets["ncsnpp-uncond"]))
    assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules
    found = edm_format.pickle_globals(raw)
    numpy_scalar = {g for g in found if g.endswith("multiarray.scalar")}
    assert numpy_scalar and numpy_scalar <= {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
    assert found - numpy_scalar == EXPECTED_GLOBALS
    assert found <= set(ALLOWED_GLOBALS)
    # Every storage is a legacy torch.save blob; our parser agrees with torch's own reader.
    literals = edm_format.bytes_args(raw)
    blobs = [b for b in literals if b.startswith(LEGACY_MAGIC_PICKLE)]
    assert len(blobs) == len(nets["ncsnpp-uncond"].state_dict())
    # The remaining bytes literals are the float64 payloads of numpy scalars (skip_scale).
    assert {len(b) for b in literals if not b.startswith(LEGACY_MAGIC_PICKLE)} == {8}
    for blob in blobs:
        ours = load_storage_blob(blob)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation notices
            theirs = torch.load(io.BytesIO(blob), weights_only=True)
            theirs = torch.empty(0, dtype=theirs.dtype).set_(theirs.untyped(), 0, (theirs.size(),), (1,))
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def _legacy_blob(t: torch.Tensor) -> bytes:
    """A storage as torch's pickle reducer writes it: a legacy (non-zip) ``torch.save`` of the typed storage."""
    typed = torch.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)
    buf = io.BytesIO()
    torch.save(typed, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


class _DeclaredStorage:
    """Stands for a storage in a hand-written legacy blob (its persistent id is written out below)."""


class _BlobPickler(pickle.Pickler):
    def __init__(self, file, declared, key):
        super().__init__(file, protocol=2)
        self.declared, self.key = declared, key

    def persistent_id(self, obj):
        if isinstance(obj, _DeclaredStorage):
            # torch's legacy persistent id of a storage: ('storage', type, key, location, numel, view).
            return ("storage", torch.FloatStorage, self.key, "cpu", self.declared, None)
        return None


def hand_written_blob(values, declared: int, key="0", keys=None, count=None) -> bytes:
    """A legacy storage blob of float32 ``values`` whose header declares ``declared`` elements.

    Layout of torch's legacy format: magic number, protocol version, system info, the object (here the storage's
    persistent id), the list of storage keys, then per storage an 8-byte element count and the raw data.
    """
    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001,
                {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, buf, protocol=2)
    _BlobPickler(buf, declared, key).dump(_DeclaredStorage())
    pickle.dump([key] if keys is None else keys, buf, protocol=2)
    data = np.asarray(values, dtype="<f4")
    buf.write(struct.pack("<q", data.size if count is None else count))
    buf.write(data.tobytes())
    return buf.getvalue()


def test_hand_written_legacy_blob_is_read():
    # Control for the size check below: an honest header is accepted and the data comes back exactly.
    got = load_storage_blob(hand_written_blob([1.5, -2.0, 3.25], declared=3))
    assert got.dtype == torch.float32 and got.tolist() == [1.5, -2.0, 3.25]


def test_zip_storage_blob_is_refused():
    t = torch.randn(7, dtype=torch.float64)
    typed = torch.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)
    buf = io.BytesIO()
    torch.save(typed, buf)
    assert buf.getvalue()[:4] == b"PK\x03\x04"
    # The same storage written the legacy way is read; the zip form, which torch's reducers never write, is not.
    assert torch.equal(load_storage_blob(_legacy_blob(t)), t)
    with pytest.raises(CheckpointError, match="zip"):
        load_storage_blob(buf.getvalue())


def test_blob_declaring_more_elements_than_it_holds_is_refused_before_allocation(monkeypatch):
    blob = hand_written_blob([1.0, 2.0, 3.0], declared=2 ** 40)  # 4 TiB of float32 declared, 12 bytes present
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=str(2 ** 40)):
        load_storage_blob(blob)
    with pytest.raises(CheckpointError, match=str(2 ** 40)):
        load_storage_blob(blob, load_data=False)  # the shape-only path (read_network_meta) checks it too
    assert loads == [] and time.perf_counter() - t0 < 5.0  # refused from the header, torch.load never ran
    # One element too many is refused as well; the exact count is accepted.
    with pytest.raises(CheckpointError, match="declares 4"):
        load_storage_blob(hand_written_blob([1.0, 2.0, 3.0], declared=4))
    # torch writes the storage key as a string; an int key in front of the count must not pass for the count.
    with pytest.raises(CheckpointError):
        load_storage_blob(hand_written_blob([1.0, 2.0, 3.0], declared=2 ** 40, key=0))
    # The element count before the data, the key list and the length must all agree with the declaration: torch
    # reads the data once per listed key, sized by that count.
    for bad in (hand_written_blob([1.0, 2.0, 3.0], declared=3, count=2 ** 40),
                hand_written_blob([1.0, 2.0, 3.0], declared=3, keys=["0", "0"]),
                hand_written_blob([1.0, 2.0, 3.0], declared=3, keys=["1"]),
                hand_written_blob([1.0, 2.0, 3.0], declared=3) + b"\0" * 4):
        with pytest.raises(CheckpointError):
            load_storage_blob(bad)
    assert loads == []


class _Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_blob_referenced_several_times_is_materialised_once(monkeypatch):
    from sidlib.io import edm_pickle

    blob = _legacy_blob(torch.arange(6, dtype=torch.float32))
    # Two storage calls on one bytes object: pickle writes the bytes once and refers back to them through its memo.
    # Each tensor views its own half of the storage.
    tensors = {name: _Reduce(torch._utils._rebuild_tensor_v2,
                             _Reduce(torch.storage._load_from_bytes, blob), offset, (3,), (1,), False, None)
               for name, offset in (("a", 0), ("b", 3))}
    raw = pickle.dumps(tensors, protocol=4)
    assert len(edm_format.bytes_args(raw)) == 1
    assert sum(op.name == "REDUCE" for op, _, _ in pickletools.genops(raw)) == 4
    calls = []
    real = edm_pickle.load_storage_blob
    monkeypatch.setattr(edm_pickle, "load_storage_blob", lambda b, **kw: calls.append(len(b)) or real(b, **kw))
    out = read_edm_pickle(raw)
    assert calls == [len(blob)]
    assert out["a"].tolist() == [0.0, 1.0, 2.0] and out["b"].tolist() == [3.0, 4.0, 5.0]
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()  # one storage, shared


@pytest.mark.parametrize("load_tensors", [True, False])
def test_overlapping_views_of_one_blob_are_refused(load_tensors):
    # 128 full views of one 16-element storage would make a network 128 times the size of the file's weights.
    blob = _legacy_blob(torch.arange(16, dtype=torch.float32))
    storage = _Reduce(torch.storage._load_from_bytes, blob)
    views = {f"w{i}": _Reduce(torch._utils._rebuild_tensor_v2, storage, 0, (4, 4), (4, 1), False, None)
             for i in range(128)}
    with pytest.raises(CheckpointError, match="claim more elements"):
        read_edm_pickle(pickle.dumps(views, protocol=4), load_tensors=load_tensors)
    # A zero stride is the same trick in one tensor.
    wide = {"w": _Reduce(torch._utils._rebuild_tensor_v2, storage, 0, (1 << 20, 16), (0, 1), False, None)}
    with pytest.raises(CheckpointError, match="claim more elements"):
        read_edm_pickle(pickle.dumps(wide, protocol=4), load_tensors=load_tensors)


def test_positional_constructor_arguments_are_refused(nets):
    ema = edm_format.as_persistent(nets["ddpmpp-cond"])
    ema.state["_init_args"] = (RES, 3)  # EDM builds networks from keyword arguments only
    record = read_edm_pickle(edm_format.write_edm_pickle(None, {"ema": ema}))["ema"]
    assert isinstance(record, PersistentRecord)
    with pytest.raises(CheckpointError, match="positional"):
        network_from_record(record)


def test_record_tree_flattens_to_state_dict(nets):
    net = nets["ddpmpp-cond"]
    data = read_edm_pickle(edm_format.write_edm_pickle(None, edm_format.edm_snapshot(net)))
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    class_name, kwargs, sd = network_from_record(data["ema"])
    assert class_name == "EDMPrecond" and kwargs == net.init_kwargs
    ref = net.state_dict()
    assert list(sd) == list(ref)  # same names and the same (state_dict) order
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert data["loss_fn"].class_name == "EDMLoss" and data["loss_fn"].state["sigma_data"] == 0.5


# ------------------------------------------------------------------------------ loading EDM pickles


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["edm", "sid"])
def test_load_network_reproduces_outputs(nets, tmp_path, name, layout):
    net = nets[name]
    data = edm_format.edm_snapshot(net) if layout == "edm" else {"ema": net}
    path = tmp_path / f"{layout}-{name}.pkl"
    edm_format.write_edm_pickle(path, data)
    loaded = load_network(path)
    assert type(loaded).__name__ == "EDMPrecond" and not loaded.training
    assert loaded.init_kwargs == net.init_kwargs
    _assert_same_weights(loaded, net)
    inputs = net_inputs(net)
    ref = outputs(net, inputs)
    assert ref.abs().max() > 1e-3  # a non-trivial function of the weights
    torch.testing.assert_close(outputs(loaded, inputs), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("protocol", [3, 5])
def test_other_pickle_protocols(nets, protocol):
    raw = edm_format.write_edm_pickle(None, {"ema": nets["ddpmpp-cond"]}, protocol=protocol)
    _, _, sd = network_from_record(read_edm_pickle(raw)["ema"])
    assert set(sd) == set(nets["ddpmpp-cond"].state_dict())


@pytest.mark.parametrize("threshold", [0, 10**12])
def test_meta_device_and_cpu_builds_agree(edm_pkl, nets, monkeypatch, threshold):
    # threshold 0: built on the meta device then given the loaded tensors; huge: plain CPU build.
    monkeypatch.setattr(checkpoints, "META_BUILD_MIN_ELEMENTS", threshold)
    loaded = load_network(edm_pkl)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    _assert_same_weights(loaded, nets["ddpmpp-cond"])
    inputs = net_inputs(loaded)
    torch.testing.assert_close(outputs(loaded, inputs), outputs(nets["ddpmpp-cond"], inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("class_name", ["EDMPrecond", "VPPrecond", "VEPrecond"])
@pytest.mark.parametrize("threshold", [0, 10**12])
def test_every_wrapper_is_checked_and_built_from_its_kwargs(tmp_path, monkeypatch, class_name, threshold):
    # The kwargs check builds on the meta device, where VPPrecond's constructor still reads its sigma range.
    monkeypatch.setattr(checkpoints, "META_BUILD_MIN_ELEMENTS", threshold)
    torch.manual_seed(0)
    net = build_network(class_name, CONFIGS["adm-cond"])
    save_network(tmp_path / "net", net)
    loaded = load_network(tmp_path / "net")
    assert type(loaded) is type(net) and (loaded.sigma_min, loaded.sigma_max) == (net.sigma_min, net.sigma_max)
    _assert_same_weights(loaded, net)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_top_level_load_network_is_the_checkpoint_loader(edm_pkl, nets):
    import sidlib

    _assert_same_weights(sidlib.load_network(edm_pkl), nets["ddpmpp-cond"])
    with pytest.raises(CheckpointError, match="architecture"):
        sidlib.load_network(edm_pkl, expected_kwargs={"model_channels": 32})


def test_loading_leaves_global_rng_alone(edm_pkl):
    before = torch.get_rng_state()
    load_network(edm_pkl)
    assert torch.equal(torch.get_rng_state(), before)


def test_meta_of_edm_pickle(edm_pkl, nets):
    info = read_network_meta(edm_pkl)
    assert info["format"] == "edm-pickle" and info["class_name"] == "EDMPrecond"
    assert info["init_kwargs"] == nets["ddpmpp-cond"].init_kwargs
    sd = nets["ddpmpp-cond"].state_dict()
    assert info["num_tensors"] == len(sd) and info["num_elements"] == sum(v.numel() for v in sd.values())
    prov = info["meta"]["provenance"]
    assert prov["kind"] == "edm-network-snapshot" and prov["loss_fn"]["class_name"] == "EDMLoss"
    assert prov["sha256"] == dl.file_sha256(edm_pkl)
    assert len(prov["module_src_sha256"]) == 64


def test_sid_snapshot_name_gives_alpha_and_kimg(nets, tmp_path):
    path = tmp_path / "network-snapshot-1.200000-000512.pkl"
    edm_format.write_edm_pickle(path, {"ema": nets["ddpmpp-cond"]})
    _, meta = load_checkpoint(path)
    assert meta["alpha"] == 1.2 and meta["kimg"] == 512 and meta["images_seen"] == 512_000
    assert meta["provenance"]["kind"] == "sid-snapshot"


def test_expected_kwargs(edm_pkl):
    # Matching values, including ones only present as constructor defaults, pass.
    load_network(edm_pkl, expected_kwargs={"model_channels": 16, "channel_mult": (1, 2), "sigma_data": 0.5,
                                           "channel_mult_emb": 4})
    with pytest.raises(CheckpointError) as err:
        load_network(edm_pkl, expected_kwargs={"augment_dim": 0, "channel_mult": [2, 2, 2], "dropout": 0.13})
    msg = str(err.value)
    assert "augment_dim" in msg and "channel_mult" in msg and "dropout:" not in msg
    with pytest.raises(CheckpointError, match="no_such_kwarg"):
        load_network(edm_pkl, expected_kwargs={"no_such_kwarg": 1})


def test_strict_loading_names_missing_keys(nets, tmp_path):
    import copy

    net = copy.deepcopy(nets["ddpmpp-cond"])
    del net.model.map_layer0._parameters["bias"]
    path = tmp_path / "missing.pkl"
    edm_format.write_edm_pickle(path, {"ema": net})
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.map_layer0\.bias"):
        load_network(path)


def test_torch_save_archive_is_rejected_clearly(tmp_path):
    path = tmp_path / "training-state-000100.pt"
    torch.save({"G": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="torch.save archive"):
        load_network(path)


# ------------------------------------------------------------------------------ refusals


class _Call:
    """Pickles as ``func(*args)``: the shape of every code-execution payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_command(sentinel: Path) -> str:
    return f"{sys.executable} -c \"open({str(sentinel)!r}, 'w').close()\""


def _payloads(sentinel: Path) -> dict:
    cmd = _touch_command(sentinel)
    return {
        "os.system": (pickle.dumps(_Call(os.system, cmd)), f"{os.system.__module__}.system"),
        "os.system-protocol0": (f"cos\nsystem\n(V{cmd}\ntR.".encode(), "os.system"),
        "builtins.eval": (pickle.dumps(_Call(eval, f"open({str(sentinel)!r}, 'w').close()")), "builtins.eval"),
        "subprocess.Popen": (pickle.dumps(_Call(subprocess.Popen, cmd, 0, None, None, None, None, None, True, True)),
                             "subprocess.Popen"),
        "subprocess.check_call": (pickle.dumps(_Call(subprocess.check_call, cmd)), "subprocess.check_call"),
    }


@pytest.mark.parametrize("kind", ["os.system", "os.system-protocol0", "builtins.eval", "subprocess.Popen",
                                  "subprocess.check_call"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, kind):
    sentinel = tmp_path / "pwned"
    raw, global_name = _payloads(sentinel)[kind]
    path = tmp_path / "evil.pkl"
    path.write_bytes(raw)
    for reader in (read_edm_pickle, load_network):
        with pytest.raises(UnsafePickleError) as err:
            reader(path)
        assert err.value.global_name == global_name
        assert f"'{global_name}'" in str(err.value)
    assert not sentinel.exists()


def test_payload_is_live_under_plain_pickle(tmp_path):
    # Control: the same bytes really execute code when loaded with pickle.loads.
    sentinel = tmp_path / "pwned"
    raw, _ = _payloads(sentinel)["builtins.eval"]
    pickle.loads(raw)
    assert sentinel.exists()


def test_payload_hidden_inside_a_network_pickle(nets, tmp_path):
    sentinel = tmp_path / "pwned"
    ema = edm_format.as_persistent(nets["ddpmpp-cond"])
    # Deep in the tree, after many legitimate tensors: an attribute whose value runs code.
    conv = ema.state["_modules"]["model"].state["_modules"]["enc"]._modules["8x8_conv"]
    conv.state["payload"] = _Call(eval, f"open({str(sentinel)!r}, 'w').close()")
    raw = edm_format.write_edm_pickle(None, {"ema": ema})
    assert "builtins.eval" in edm_format.pickle_globals(raw)
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        read_edm_pickle(raw)
    assert not sentinel.exists()


def test_embedded_module_source_is_never_run(nets, tmp_path):
    sentinel = tmp_path / "module_src_ran"
    src = f"open({str(sentinel)!r}, 'w').close()\n"
    path = tmp_path / "snap.pkl"
    edm_format.write_edm_pickle(path, {"ema": nets["ddpmpp-cond"]}, module_src=src)
    load_network(path)
    assert not sentinel.exists()
    assert "torch_utils" not in sys.modules


def test_storage_blob_with_foreign_global_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = f"cos\nsystem\n(V{_touch_command(sentinel)}\ntR.".encode()
    honest = hand_written_blob([1.0, 2.0], declared=2)
    f = io.BytesIO(honest)
    for _ in range(3):  # magic number, protocol version, system info
        pickle.load(f)
    # The call in place of the system info: the header declares a storage that fits, so torch.load(weights_only)
    # sees the blob and must refuse the global.
    in_sys_info = LEGACY_MAGIC_PICKLE + pickle.dumps(1001, protocol=2) + evil + honest[f.tell():]
    with pytest.raises(CheckpointError, match="os.system"):
        load_storage_blob(in_sys_info)
    # The call in place of the storage: refused from the header already.
    in_storage = (LEGACY_MAGIC_PICKLE + pickle.dumps(1001, protocol=2) + pickle.dumps({"little_endian": True}, protocol=2)
                  + evil)
    with pytest.raises(CheckpointError):
        load_storage_blob(in_storage)
    assert not sentinel.exists()
    # Control: the payload is live under plain pickle.
    pickle.loads(evil)
    assert sentinel.exists()


# ------------------------------------------------------------------------------ corrupt files


def test_truncated_files_are_refused(edm_pkl, tmp_path):
    raw = edm_pkl.read_bytes()
    cuts = [0, 1, 2, 10, 100] + [int(len(raw) * f) for f in np.linspace(0.05, 0.999, 25)] + [len(raw) - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated|empty|corrupt"):
            read_edm_pickle(path)


def test_corrupt_files_are_refused(edm_pkl, tmp_path):
    raw = edm_pkl.read_bytes()
    blob_start = raw.find(LEGACY_MAGIC_PICKLE)
    variants = {
        "garbage": b"this is not a pickle at all",
        "trailing": raw + b"\x00junk",
        "blob-magic": raw[:blob_start + 5] + bytes([raw[blob_start + 5] ^ 0xFF]) + raw[blob_start + 6:],
        "not-a-dict": pickle.dumps([1, 2, 3], protocol=4),
        "bad-opcode": raw[:40] + b"\xff" + raw[41:],
    }
    for name, data in variants.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            read_edm_pickle(path)
        assert str(path) in str(err.value) or "storage blob" in str(err.value), name
    with pytest.raises(CheckpointError):
        load_network(tmp_path / "blob-magic.pkl")


def test_tensor_past_its_storage_is_refused():
    storage = _Reduce(torch.storage._load_from_bytes, _legacy_blob(torch.zeros(4)))
    raw = pickle.dumps({"t": _Reduce(torch._utils._rebuild_tensor_v2, storage, 0, (3, 2), (2, 1), False, None)})
    with pytest.raises(CheckpointError, match="reaches past its storage"):
        read_edm_pickle(raw)


# ------------------------------------------------------------------------------ registry


def test_registry_urls():
    edm = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
    assert TEACHERS == {
        "edm-cifar10-32x32-uncond-vp": edm + "edm-cifar10-32x32-uncond-vp.pkl",
        "edm-cifar10-32x32-cond-vp": edm + "edm-cifar10-32x32-cond-vp.pkl",
        "edm-ffhq-64x64-uncond-vp": edm + "edm-ffhq-64x64-uncond-vp.pkl",
        "edm-afhqv2-64x64-uncond-vp": edm + "edm-afhqv2-64x64-uncond-vp.pkl",
        "edm-imagenet-64x64-cond-adm": edm + "edm-imagenet-64x64-cond-adm.pkl",
    }
    assert set(TEACHER_ALIASES.values()) == set(TEACHERS)
    assert len(SID_GENERATORS) == 10 and len(set(SID_GENERATORS.values())) == 10
    hf = "https://huggingface.co/UT-Austin-PML/SiD/resolve/main/"
    for name, url in SID_GENERATORS.items():
        info = checkpoints.SID_GENERATOR_INFO[name]
        assert url.startswith(hf) and url.endswith(f"-{info['kimg']:06d}.pkl")
        assert f"network-snapshot-{info['alpha']:f}-" in url
        assert name.endswith(f"alpha{info['alpha']:.1f}") and info["teacher"] in TEACHERS
    assert SID_GENERATORS["sid-cifar10-uncond-alpha1.2"] == hf + "cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl"


@pytest.fixture
def fake_download(edm_pkl, tmp_path, monkeypatch):
    """Route every registered URL to the local fixture through the real cache (file://)."""
    requested = []

    def fake(url, *, sha256=None, cache_dir=None, progress=True):
        requested.append(url)
        return dl.download(edm_pkl.as_uri(), sha256=sha256, cache_dir=tmp_path / "cache", progress=False)

    monkeypatch.setattr(registry, "download", fake)
    return requested


@pytest.mark.parametrize("name", ["sid-cifar10-uncond-alpha1.2", "sid-imagenet64-cond-alpha1.0",
                                  "edm-imagenet-64x64-cond-adm", "cifar10-uncond", "edm-cifar10-32x32-uncond-ve"])
def test_registered_names_resolve(fake_download, nets, name):
    net, meta = load_checkpoint(name)
    url = {**TEACHERS, **checkpoints.OTHER_EDM_PICKLES, **SID_GENERATORS,
           **{a: TEACHERS[t] for a, t in TEACHER_ALIASES.items()}}[name]
    assert registry.registered_names()[name] == url
    assert fake_download == [url]
    assert meta["provenance"]["url"] == url and meta["provenance"]["name"] == name
    if name in SID_GENERATORS:
        info = checkpoints.SID_GENERATOR_INFO[name]
        assert meta["init_sigma"] == 2.5 and meta["alpha"] == info["alpha"] and meta["kimg"] == info["kimg"]
    _assert_same_weights(net, nets["ddpmpp-cond"])


def test_unknown_name_suggests(tmp_path):
    with pytest.raises(CheckpointError, match="did you mean sid-cifar10-uncond-alpha1.2"):
        load_network("sid-cifar10-uncond-alpha1.3", cache_dir=tmp_path)


def test_registered_names_and_url_detection():
    names = registry.registered_names()
    assert set(names) == (set(TEACHERS) | set(TEACHER_ALIASES) | set(checkpoints.OTHER_EDM_PICKLES)
                          | set(SID_GENERATORS))
    assert all(registry.is_url(u) and u.startswith("https://") for u in names.values())
    assert registry.is_url("file:///tmp/x.pkl") and registry.is_url("HTTP://example.org/a.pkl")
    for not_url in ("edm-cifar10-32x32-cond-vp", "/tmp/x.pkl", "C:/x.pkl", "ftp://example.org/x.pkl", "file:x"):
        assert not registry.is_url(not_url), not_url


def test_file_url_source(edm_pkl, nets, tmp_path):
    net = load_network(edm_pkl.as_uri(), cache_dir=tmp_path / "c")
    _assert_same_weights(net, nets["ddpmpp-cond"])
    assert list((tmp_path / "c").rglob("*.pkl"))


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_file_url_to_our_format_fetches_weights_and_sidecar(nets, tmp_path, suffix):
    net = nets["ddpmpp-cond"]
    save_network(tmp_path / "src" / "net.safetensors", net, {"init_sigma": 2.5})
    url = (tmp_path / "src" / f"net{suffix}").as_uri()
    loaded = load_network(url, cache_dir=tmp_path / "c")
    _assert_same_weights(loaded, net)
    assert read_network_meta(url, cache_dir=tmp_path / "c")["meta"]["init_sigma"] == 2.5


# ------------------------------------------------------------------------------ our format


def test_save_load_round_trip(nets, tmp_path):
    net = nets["ncsnpp-uncond"]  # has a random buffer (Fourier frequencies) besides parameters
    meta = {"init_sigma": 2.5, "alpha": np.float64(1.2), "kimg": 12, "images_seen": 12_000,
            "provenance": {"teacher": "edm-cifar10-32x32-uncond-ve", "seeds": (0, 1)}}
    weights = save_network(tmp_path / "run" / "network", net, meta)
    assert weights == tmp_path / "run" / "network.safetensors"
    doc = json.loads((tmp_path / "run" / "network.json").read_text())
    assert doc["format"] == "sidlib-network/1" and doc["class_name"] == "EDMPrecond"
    assert doc["init_kwargs"] == net.init_kwargs and doc["weights_sha256"] == dl.file_sha256(weights)
    expected_meta = {**meta, "alpha": 1.2, "provenance": {"teacher": "edm-cifar10-32x32-uncond-ve", "seeds": [0, 1]}}
    for source in (weights, tmp_path / "run" / "network.json", tmp_path / "run" / "network", tmp_path / "run"):
        loaded, got = load_checkpoint(source)
        assert got == expected_meta and not loaded.training
        _assert_same_weights(loaded, net)
        inputs = net_inputs(net)
        assert torch.equal(outputs(loaded, inputs), outputs(net, inputs))
    info = read_network_meta(tmp_path / "run")
    assert info["format"] == "sidlib-network/1" and info["meta"] == expected_meta
    assert info["num_elements"] == sum(v.numel() for v in net.state_dict().values())
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]


def test_run_dir_picks_latest_snapshot(nets, tmp_path):
    save_network(tmp_path / "network-snapshot-000100", nets["ncsnpp-uncond"], {"kimg": 100})
    save_network(tmp_path / "network-snapshot-000200.safetensors", nets["ncsnpp-uncond"], {"kimg": 200})
    assert load_checkpoint(tmp_path)[1] == {"kimg": 200}
    save_network(tmp_path / "other", nets["ncsnpp-uncond"])
    with pytest.raises(CheckpointError, match="several"):
        load_checkpoint(tmp_path)


def test_strict_loading_of_our_format_names_keys(nets, tmp_path):
    save_network(tmp_path / "net", nets["ddpmpp-cond"])
    sidecar = tmp_path / "net.json"
    doc = json.loads(sidecar.read_text())

    doc["init_kwargs"]["augment_dim"] = 0
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"not in the network: model\.map_augment\.weight"):
        load_network(tmp_path / "net")

    doc["init_kwargs"]["augment_dim"] = 9
    doc["init_kwargs"]["label_dim"] = 7
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"shape mismatches: model\.map_label\.weight \(checkpoint \[16, 10\]"):
        load_network(tmp_path / "net")


def test_weights_and_sidecar_must_belong_together(nets, tmp_path):
    save_network(tmp_path / "a", nets["ddpmpp-cond"])
    save_network(tmp_path / "b", make_net("ddpmpp-cond", seed=9))
    os.replace(tmp_path / "b.safetensors", tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="sha256"):
        load_network(tmp_path / "a")
    (tmp_path / "c.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "c.json").write_text(json.dumps({"format": "sidlib-network/1", "class_name": "EDMPrecond",
                                                  "init_kwargs": CONFIGS["ddpmpp-cond"]}))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_network(tmp_path / "c")


def test_save_refuses_what_it_cannot_store(nets, tmp_path):
    with pytest.raises(CheckpointError, match="meta"):
        save_network(tmp_path / "x", nets["ddpmpp-cond"], {"bad": object()})
    with pytest.raises(CheckpointError, match="sidlib network"):
        save_network(tmp_path / "y", torch.nn.Linear(2, 2))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ hardening


def test_kwargs_are_checked_against_the_weights_before_anything_is_allocated(nets, tmp_path, monkeypatch):
    save_network(tmp_path / "net", nets["ddpmpp-cond"])
    doc = json.loads((tmp_path / "net.json").read_text())
    doc["init_kwargs"]["model_channels"] = 2048  # would be an 11 GiB network on the CPU
    (tmp_path / "net.json").write_text(json.dumps(doc))
    devices = []
    real = checkpoints.networks.build_network
    monkeypatch.setattr(checkpoints.networks, "build_network",
                        lambda *a, **k: devices.append(str(torch.empty(0).device)) or real(*a, **k))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_network(tmp_path / "net")
    assert devices == ["meta"]
    doc["init_kwargs"]["model_channels"] = 16
    doc["init_kwargs"]["num_blocks"] = 10 ** 6  # millions of modules, even on the meta device
    (tmp_path / "net.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="far more modules"):
        load_network(tmp_path / "net")


def test_errors_from_the_record_tree_name_the_file(nets, tmp_path):
    ema = edm_format.as_persistent(nets["ddpmpp-cond"])
    ema.state["_init_args"] = (RES,)
    path = tmp_path / "positional.pkl"
    edm_format.write_edm_pickle(path, {"ema": ema})
    with pytest.raises(CheckpointError, match=f"{path}.*positional"):
        load_network(path)
    ema = edm_format.as_persistent(nets["ddpmpp-cond"])
    enc = ema.state["_modules"]["model"].state["_modules"]["enc"]._modules
    enc["again"] = enc["8x8_conv"]  # one module twice in the tree: two names for the same tensors
    edm_format.write_edm_pickle(path, {"ema": ema})
    with pytest.raises(CheckpointError, match=f"{path}.*twice"):
        load_network(path)


def test_identical_weights_give_identical_files(tmp_path):
    """Two processes (different hash seeds) save the same network: the bytes, and so the recorded hashes, agree,
    and the files are 0644 under umask 022."""
    code = ("import os, sys; os.umask(0o022); sys.path.insert(0, sys.argv[2]); from hostile import tiny_net; "
            "from sidlib.io.checkpoints import save_network; "
            "save_network(sys.argv[1], tiny_net('ddpmpp'), {'alpha': 1.2, 'provenance': {'b': 1, 'a': [2, 3]}})")
    for seed in ("1", "2", "3"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed / "net"), str(Path(__file__).parent)],
                       check=True, env={**os.environ, "PYTHONHASHSEED": seed}, timeout=300)
    for name in ("net.safetensors", "net.json"):
        a, b, c = (tmp_path / seed / name for seed in ("1", "2", "3"))
        assert a.read_bytes() == b.read_bytes() == c.read_bytes(), name
        assert a.stat().st_mode & 0o777 == 0o644, name
    assert json.loads((tmp_path / "1" / "net.json").read_text())["weights_sha256"] == dl.file_sha256(
        tmp_path / "2" / "net.safetensors")
