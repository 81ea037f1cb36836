"""Paper presets (paper/params.yaml): values against the official table, refusals naming the key, the teacher
architecture check, the command line, and the path into sidlib.distill in miniature."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import eval_fixtures as ef  # noqa: E402
from edm_format import write_edm_pickle  # noqa: E402

from experiments.common.params import ParamsError  # noqa: E402
from experiments.paper import presets as P  # noqa: E402
from sidlib.distill import DistillConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# SiD's official run_sid.sh settings, transcribed independently of paper/params.yaml:
# teacher, model_type, channel_mult, alpha, batch, batch_gpu, lr (= glr), g_beta1, adam eps, fp16, dropout, augment_p,
# EMA half-life (kimg), duration (Mimg), tick (kimg), snap (ticks), FID reference, label_dim, resolution.
SPEC = {
    "cifar10-uncond": ("edm-cifar10-32x32-uncond-vp", "SongUNet", [2, 2, 2], 1.2, 256, 16, 1e-5, 0.0, 1e-8, False,
                       0.13, 0.12, 500, 500, 10, 50, "cifar10-32x32", 0, 32),
    "cifar10-cond": ("edm-cifar10-32x32-cond-vp", "SongUNet", [2, 2, 2], 1.2, 256, 16, 1e-5, 0.0, 1e-8, False,
                     0.13, 0.12, 500, 800, 10, 50, "cifar10-32x32", 10, 32),
    "imagenet64-cond": ("edm-imagenet-64x64-cond-adm", "DhariwalUNet", [1, 2, 3, 4], 1.2, 8192, 16, 4e-6, 0.0, 1e-6,
                        True, 0.10, 0.0, 2000, 1000, 20, 50, "imagenet-64x64", 1000, 64),
    "ffhq64": ("edm-ffhq-64x64-uncond-vp", "SongUNet", [1, 2, 2, 2], 1.2, 512, 32, 1e-5, 0.9, 1e-6, True,
               0.05, 0.15, 500, 500, 10, 50, "ffhq-64x64", 0, 64),
    "afhqv2-64": ("edm-afhqv2-64x64-uncond-vp", "SongUNet", [1, 2, 2, 2], 1.0, 512, 32, 5e-6, 0.0, 1e-6, True,
                  0.05, 0.15, 500, 500, 10, 50, "afhqv2-64x64", 0, 64),
}
FIELDS = ("teacher", "model_type", "channel_mult", "alpha", "batch", "batch_gpu", "lr", "g_beta1", "adam_eps", "fp16",
          "dropout", "augment_p", "ema_kimg", "duration_mimg", "tick_kimg", "snap_ticks", "fid_ref", "label_dim",
          "resolution")


def spec(name):
    return dict(zip(FIELDS, SPEC[name]))


def test_presets_are_the_five_paper_runs():
    assert list(P.load_paper_params()["presets"]) == list(SPEC)
    params = yaml.safe_load((ROOT / "paper" / "params.yaml").read_text())
    assert params["benchmarks"] == [] and params["released"] == []  # nothing runs unless selected


@pytest.mark.parametrize("name", list(SPEC))
def test_distill_block_matches_the_official_table_and_builds_a_valid_config(name):
    s, p = spec(name), P.get_preset(name)
    cfg = DistillConfig.from_dict(P.distill_config(name))
    cfg.validate(world_size=1)
    assert p["teacher"] == s["teacher"] == cfg.teacher and p["fid_ref"] == s["fid_ref"]
    assert cfg.alpha == s["alpha"] and cfg.batch == s["batch"] and cfg.batch_gpu == s["batch_gpu"]
    assert cfg.lr == pytest.approx(s["lr"]) and cfg.glr == pytest.approx(s["lr"])
    assert cfg.g_beta1 == s["g_beta1"] and cfg.resolved_adam_eps() == pytest.approx(s["adam_eps"])
    assert cfg.precision == ("fp16" if s["fp16"] else "fp32")
    assert cfg.dropout == pytest.approx(s["dropout"]) and cfg.augment_p == pytest.approx(s["augment_p"])
    assert cfg.ema_halflife_kimg == pytest.approx(s["ema_kimg"])
    assert cfg.duration_kimg == pytest.approx(s["duration_mimg"] * 1000) and cfg.iterations is None
    assert cfg.tick_kimg == s["tick_kimg"] and cfg.snap_ticks == s["snap_ticks"]
    assert cfg.extra_snap_ticks == list(range(0, 101, 10))  # sid_training_loop.py: cur_tick in [10, ..., 100]
    assert (cfg.tmax, cfg.init_sigma, cfg.ls, cfg.lsg) == (800, 2.5, 1, 100)
    assert cfg.total_iterations() == pytest.approx(s["duration_mimg"] * 1e6 / s["batch"], abs=1)


@pytest.mark.parametrize("name", list(SPEC))
def test_expected_teacher_kwargs_come_from_the_paper_networks(name):
    from sidlib.networks import PAPER_NETWORKS

    s, p = spec(name), P.get_preset(name)
    assert p["network"] == name
    kw = P.expected_teacher_kwargs(p)
    table = PAPER_NETWORKS[p["network"]]["kwargs"]
    # Every stored kwarg is checked except those the students set themselves; the defaults are filled in, so a
    # teacher that stores a different num_blocks (default 4) cannot pass.
    assert kw and all(kw[k] == v for k, v in table.items() if k in kw)
    assert set(table) - set(kw) <= {"augment_dim", "dropout", "use_fp16", "sigma_min", "sigma_max"}
    assert kw["num_blocks"] == (3 if p["network"] == "imagenet64-cond" else 4)  # ADM's default is 3
    assert (kw["model_type"], kw["channel_mult"], kw["label_dim"], kw["img_resolution"], kw["img_channels"]) == \
        (s["model_type"], s["channel_mult"], s["label_dim"], s["resolution"], 3)
    assert P.distill_config(name)["teacher_kwargs"] == kw


def test_released_and_teacher_names_exist_in_the_checkpoint_registry():
    from sidlib.io.registry import SID_GENERATOR_INFO, TEACHERS

    for name in SPEC:
        p = P.get_preset(name)
        assert p["teacher"] in TEACHERS
        assert set(p["released"]) == {"alpha1.0", "alpha1.2"}
        for key, released in p["released"].items():
            info = SID_GENERATOR_INFO[released]
            assert key == f"alpha{info['alpha']:.1f}" and info["teacher"] == p["teacher"]


def test_references_are_known():
    from sidlib.metrics.references import reference_url

    for name in SPEC:
        p = P.get_preset(name)
        assert reference_url(p["fid_ref"]).endswith(".npz")
        if p["pr_ref"]:
            assert "VIRTUAL_imagenet64_labeled" in reference_url(p["pr_ref"])
    assert [n for n in SPEC if P.get_preset(n)["pr_ref"]] == ["imagenet64-cond"]
    assert [n for n in SPEC if P.get_preset(n)["isc"]] == ["cifar10-uncond"]


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ParamsError) as err:
        P.get_preset("cifar100")
    for name in SPEC:
        assert name in str(err.value)


def test_bad_overrides_and_entries_name_the_full_key(tmp_path):
    for over, key in (({"distill": {"alhpa": 1.0}}, "presets.ffhq64.distill.alhpa"),
                      ({"distill": {"batch_gpu": "many"}}, "presets.ffhq64.distill.batch_gpu"),
                      ({"distill": {"alpha": 100}}, "presets.ffhq64.distill.alpha"),
                      ({"network": "cifar100"}, "presets.ffhq64.network"),
                      ({"teacher": "edm-cifar100"}, "presets.ffhq64.teacher"),
                      ({"released": {"alpha1.2": "sid-nothing"}}, "presets.ffhq64.released.alpha1.2"),
                      ({"teacher_sampler": {"stepz": 3}}, "presets.ffhq64.teacher_sampler.stepz"),
                      ({"colour": 1}, "presets.ffhq64.colour")):
        with pytest.raises(ParamsError) as err:
            P.get_preset("ffhq64", over)
        assert key in str(err.value), (over, str(err.value))
    data = yaml.safe_load((ROOT / "paper" / "params.yaml").read_text())
    broken = dict(data["presets"]["ffhq64"])
    del broken["network"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**data, "presets": {"broken": broken}}))
    with pytest.raises(ParamsError, match=r"presets\.broken\.network"):
        P.load_paper_params(path)
    path.write_text(yaml.safe_dump({**data, "benchmarks": ["cifar100"]}))
    with pytest.raises(ParamsError, match="cifar100"):
        P.load_paper_params(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        P.load_paper_params(tmp_path / "nope.yaml")


def test_distill_config_overrides():
    short = P.distill_config("cifar10-uncond", {"iterations": 2})
    assert "duration_kimg" not in short and short["iterations"] == 2
    DistillConfig.from_dict(short).validate()
    with pytest.raises(ParamsError, match="not_a_key"):
        P.distill_config("cifar10-uncond", {"not_a_key": 1})
    with pytest.raises(ParamsError, match="batch"):
        P.distill_config("cifar10-uncond", {"batch": 3})  # not a multiple of batch_gpu 16


# ---- the teacher's architecture --------------------------------------------------------------------------------------

def tiny_ddpmpp_teacher(path, stored_kwargs=None, **overrides):
    """A DDPM++ EDMPrecond at 8x8 with one level and one block (a few MB), written in EDM's pickle format.

    ``stored_kwargs``: the constructor kwargs the pickle records instead of the real ones (what the check reads)."""
    from sidlib.networks import EDMPrecond, edm_kwargs

    torch.manual_seed(0)
    kw = edm_kwargs("ddpmpp", img_resolution=8, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                    channel_mult_emb=1, augment_dim=9, dropout=0.0, **overrides)
    net = EDMPrecond(**kw).eval()
    if stored_kwargs is not None:
        net.init_kwargs = stored_kwargs
    write_edm_pickle(path, {"ema": net})
    return path, kw


def test_a_teacher_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    pkl, _ = tiny_ddpmpp_teacher(tmp_path / "teacher.pkl")
    with pytest.raises(ParamsError) as err:
        P.check_teacher(P.get_preset("cifar10-uncond"), str(pkl))
    msg = str(err.value)
    assert "channel_mult" in msg and "img_resolution" in msg and "cifar10-uncond" in msg
    assert "model_channels" not in msg  # 128, as in the paper's DDPM++
    with pytest.raises(ParamsError, match="model_type"):
        P.check_teacher(P.get_preset("imagenet64-cond"), str(pkl))


def test_a_teacher_of_the_expected_architecture_is_accepted(tmp_path, monkeypatch):
    from sidlib.networks import PAPER_NETWORKS, edm_kwargs

    pkl, kw = tiny_ddpmpp_teacher(tmp_path / "teacher.pkl", model_channels=16)
    # A paper network of the teacher's size (the real ones take hundreds of MB to write).
    tiny = edm_kwargs("ddpmpp", img_resolution=8, channel_mult=[1], model_channels=16, num_blocks=1,
                      attn_resolutions=[], channel_mult_emb=1, augment_dim=9, dropout=0.1)
    monkeypatch.setitem(PAPER_NETWORKS, "tiny-test", {"arch": "ddpmpp", "parameters": 0, "kwargs": tiny})
    preset = {**P.get_preset("cifar10-uncond"), "network": "tiny-test"}
    eff = P.check_teacher(preset, str(pkl))
    assert eff["channel_mult"] == [1] and eff["model_channels"] == 16 and eff["num_blocks"] == 1
    monkeypatch.setitem(PAPER_NETWORKS["tiny-test"], "kwargs", {**tiny, "label_dim": 10})
    with pytest.raises(ParamsError, match="label_dim"):
        P.check_teacher(preset, str(pkl))


def test_a_teacher_with_fewer_blocks_is_refused(tmp_path):
    from sidlib.networks import edm_kwargs

    claimed = edm_kwargs("ddpmpp", img_resolution=32, channel_mult=[2, 2, 2], num_blocks=1, augment_dim=9,
                         dropout=0.13)
    pkl, _ = tiny_ddpmpp_teacher(tmp_path / "teacher.pkl", stored_kwargs=claimed)
    with pytest.raises(ParamsError, match="num_blocks|parameters"):
        P.check_teacher(P.get_preset("cifar10-uncond"), str(pkl))


# ---- the command line ------------------------------------------------------------------------------------------------

def test_distill_config_command_writes_a_config_distill_accepts(tmp_path):
    out = tmp_path / "cfg.yaml"
    res = subprocess.run([sys.executable, "-m", "experiments.paper", "distill-config", "ffhq64", "--out", str(out),
                          "--set", "batch_gpu=8", "--set", "eval_kwargs={num_images: 100}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    written = yaml.safe_load(out.read_text())
    cfg = DistillConfig.from_dict(written)
    cfg.validate()
    assert cfg.batch_gpu == 8 and cfg.eval_kwargs == {"num_images": 100}
    assert {k: v for k, v in written.items() if k not in ("batch_gpu", "eval_kwargs")} == \
        {k: v for k, v in P.distill_config("ffhq64").items() if k not in ("batch_gpu",)}


def test_command_line_list_show_and_bad_set(tmp_path, capsys):
    from experiments.paper.__main__ import main

    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == list(SPEC)
    assert main(["show", "afhqv2-64"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "afhqv2-64" and shown["distill"]["alpha"] == 1.0
    capsys.readouterr()
    assert main(["distill-config", "ffhq64", "--out", str(tmp_path / "c.yaml"), "--set", "batch_gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "KEY=VALUE" in err and err.count("\n") == 1
    assert main(["distill-config", "ffhq64", "--out", str(tmp_path / "c.yaml"), "--set", "batch=3"]) == 2
    assert "batch" in capsys.readouterr().err
    with pytest.raises(ParamsError, match="batch"):  # --debug: the exception itself, anywhere on the line
        main(["distill-config", "ffhq64", "--out", str(tmp_path / "c.yaml"), "--set", "batch=3", "--debug"])
    assert not (tmp_path / "c.yaml").exists()


# ---- class frequencies, disk estimates, fetch-all ---------------------------------------------------------------------

def test_class_frequencies_reach_the_distill_config_and_are_checked(tmp_path):
    assert "label_probs" not in P.distill_config("cifar10-cond")  # data-free default: uniform
    cfg = P.distill_config("cifar10-cond", label_probs=[2] + [1] * 9)
    assert cfg["label_probs"] == pytest.approx([2 / 11] + [1 / 11] * 9)
    DistillConfig.from_dict(cfg).validate()
    cfg = P.distill_config("cifar10-cond", {"eval_fn": "sidlib.metrics.protocol:proxy_fid",
                                            "eval_kwargs": {"num_images": 8}}, label_probs="1,1,1,1,1,1,1,1,1,3")
    assert cfg["eval_kwargs"] == {"num_images": 8, "label_probs": cfg["label_probs"]}  # the proxy FID's labels too
    assert cfg["snapshot_keep_best"] == "fid8_proxy"  # retention keeps the snapshot `--snapshot best` would pick
    # A labelled dataset in EDM's layout: its labels are counted.
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(__import__("json").dumps(
        {"labels": [[f"img{i:02d}.png", i % 3] for i in range(12)] + [["img12.png", 9]]}))
    from PIL import Image
    for i in range(13):
        Image.new("RGB", (4, 4)).save(data / f"img{i:02d}.png")
    probs = P.preset_label_probs(P.get_preset("cifar10-cond"), str(data))
    assert probs == pytest.approx([4 / 13] * 3 + [0] * 6 + [1 / 13])
    assert P.get_preset("imagenet64-cond", {"label_probs": [1] * 1000})["label_probs"] == [1] * 1000
    with pytest.raises(Exception, match="10 classes"):
        P.distill_config("cifar10-cond", label_probs=[1, 2, 3])
    with pytest.raises(ParamsError, match="unconditional"):
        P.get_preset("ffhq64", {"label_probs": [1, 2]})
    with pytest.raises(ParamsError, match="unconditional"):
        P.preset_label_probs(P.get_preset("ffhq64"), [1, 2])


def test_disk_estimate_counts_snapshots_and_states():
    over = {"duration_kimg": 100, "tick_kimg": 10, "snap_ticks": 3, "state_ticks": 2, "numbered_state_ticks": 4,
            "grid_size": 0, "snapshot_keep_every": 0}
    e = P.disk_estimate("cifar10-uncond", over)
    params = P.PARAMETERS["cifar10-uncond"]
    # 100 kimg at batch 256 = 391 iterations; a tick after iteration 1, then every 40 iterations (10,240 images >= 10
    # kimg), and at the end: ticks 0..10. Snapshots at 0, 3, 6, 9 and 10; numbered states after ticks 4 and 8.
    assert e["parameters"] == params and e["ticks"] == 10 and e["snapshots"] == 5 and e["numbered_states"] == 2
    assert params * 4 <= e["snapshot_bytes"] < params * 4 + 100_000
    assert e["state_bytes"] == params * 4 * 7  # G, fake score, G_ema, two Adam moments of G and of the fake score
    assert e["total_bytes"] == 5 * e["snapshot_bytes"] + 3 * e["state_bytes"] and e["snapshots_kept"] == 5
    # Retention keeps every N-th snapshot, the newest and the best: at most ceil(5 / 4) + 2 of the 5.
    kept = P.disk_estimate("cifar10-uncond", {**over, "snapshot_keep_every": 4})
    assert kept["snapshots"] == 5 and kept["snapshots_kept"] == 4
    assert kept["total_bytes"] == 4 * e["snapshot_bytes"] + 3 * e["state_bytes"]
    # SiD's loop also snapshots ticks 10, 20, ..., 100 (sid_training_loop.py): 5 more below tick 50 here.
    extra = P.disk_estimate("cifar10-uncond", {**over, "duration_kimg": 600, "snap_ticks": 50})
    assert extra["ticks"] == 59 and extra["snapshots"] == len({0, 10, 20, 30, 40, 50, 59})
    assert P.disk_estimate("imagenet64-cond")["snapshot_bytes"] > 4 * 295_000_000


def test_fetch_all_fills_the_cache_from_file_urls(tmp_path, monkeypatch, capsys):
    from experiments.paper.__main__ import main
    from sidlib.io.download import cache_path_for
    from sidlib.io.registry import TEACHERS
    from sidlib.metrics import fidelity, references
    from sidlib.networks import PAPER_NETWORKS, edm_kwargs

    monkeypatch.setenv("SIDLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    (tmp_path / "up").mkdir()
    pkl, _ = tiny_ddpmpp_teacher(tmp_path / "up" / "teacher.pkl", model_channels=16)
    tiny = edm_kwargs("ddpmpp", img_resolution=8, channel_mult=[1], model_channels=16, num_blocks=1,
                      attn_resolutions=[], channel_mult_emb=1, augment_dim=9, dropout=0.1)
    monkeypatch.setitem(PAPER_NETWORKS, "cifar10-uncond", {"arch": "ddpmpp", "parameters": 0, "kwargs": tiny})
    monkeypatch.setitem(TEACHERS, "edm-cifar10-32x32-uncond-vp", pkl.as_uri())
    ref = tmp_path / "up" / "cifar10-32x32.npz"
    references.save_reference_stats(ref, np.zeros(2048), np.eye(2048))
    monkeypatch.setitem(references.FID_REFERENCES, "cifar10-32x32", ref.as_uri())
    weights = tmp_path / "up" / "inception.pth"
    weights.write_bytes(b"stand-in for the Inception weights")
    monkeypatch.setattr(fidelity, "INCEPTION_WEIGHTS_URL", weights.as_uri())
    assert main(["fetch-all", "cifar10-uncond"]) == 0, capsys.readouterr().err
    assert cache_path_for(pkl.as_uri()).read_bytes() == pkl.read_bytes()
    assert cache_path_for(ref.as_uri()).read_bytes() == ref.read_bytes()
    assert fidelity.inception_weights_path().read_bytes() == weights.read_bytes()
    assert str(fidelity.inception_weights_path()) in capsys.readouterr().out
    # Offline afterwards: the same command finds everything in the cache.
    for f in (pkl, ref, weights):
        f.unlink()
    assert main(["fetch-all", "cifar10-uncond"]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_two_distillation_iterations_with_a_real_preset_at_tiny_size(tmp_path):
    """A preset's path end to end in miniature: EDM-format teacher, distill with the proxy-FID hook, paper figure."""
    import json

    from experiments.paper import tables
    from sidlib.distill import distill

    pkl, kw = tiny_ddpmpp_teacher(tmp_path / "teacher.pkl", model_channels=16)
    ef.write_reference_npz(tmp_path / "ref.npz", ef.random_images(32, seed=3))
    cfg = P.distill_config("cifar10-uncond", {
        "teacher": pkl.resolve().as_uri(), "teacher_kwargs": {k: v for k, v in kw.items() if k != "dropout"},
        "iterations": 2, "batch": 2, "batch_gpu": 1, "grid_size": 0, "progress": False, "device": "cpu",
        "eval_fn": "sidlib.metrics.protocol:proxy_fid",
        "eval_kwargs": {"reference_stats": str(tmp_path / "ref.npz"), "num_images": 8, "batch_size": 8,
                        "feature_extractor": ef.TINY}})
    run = distill(DistillConfig.from_dict(cfg), run_dir=tmp_path / "run")
    log = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iteration"] == 2
    stored = json.loads((Path(run) / "config.json").read_text())
    assert stored["alpha"] == 1.2 and stored["augment_p"] == 0.12 and stored["dropout"] == 0.13
    curve = tables.load_training_curve(run)
    assert curve["metric"] == "fid8_proxy" and len(curve["images"]) == 2 and curve["alpha"] == 1.2
    png = tables.plot_fid_vs_images({"SiD": (curve["images"], curve["fid"])},
                                    tables.teacher_reference_lines("cifar10-uncond"), title="tiny",
                                    out=tmp_path / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_paper_calc_under_torchrun_with_two_cpu_processes_equals_one(tmp_path):
    """The eval stage's command (torchrun ... -m experiments.paper calc) with the gloo backend on two CPU processes:
    the same trials as one process. A tiny network and the tiny extractor stand in for the paper's."""
    import json
    import os

    write_edm_pickle(tmp_path / "net.pkl", {"ema": ef.tiny_edm(label_dim=10, seed=4)})
    (tmp_path / "refs").mkdir()
    ef.write_reference_npz(tmp_path / "refs" / "fid.npz", ef.random_images(32, seed=2))
    common = ["-m", "experiments.paper", "calc", "cifar10-cond", "--network", str(tmp_path / "net.pkl"), "--refs",
              str(tmp_path / "refs"), "--num-images", "7", "--trials", "2", "--batch", "2", "--feature-extractor",
              ef.TINY, "--import", "eval_fixtures"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one.json")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--out", str(tmp_path / "two.json")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["protocol"]["world_size"], b["protocol"]["world_size"]) == (1, 2) and b["benchmark"] == "cifar10-cond"
    for ta, tb in zip(a["trials"], b["trials"]):
        assert tb["fid7_proxy"] == pytest.approx(ta["fid7_proxy"], rel=1e-6, abs=1e-9)
