"""Paper presets (paper/params.yaml): values against the official table, refusals naming the key, the teacher
architecture check, the command line, and the path into sidlib.distill in miniature."""
import subprocess
import sys
from pathlib import Path

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
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["distill-config", "ffhq64", "--out", str(tmp_path / "c.yaml"), "--set", "batch_gpu"])
    with pytest.raises(ParamsError, match="batch"):
        main(["distill-config", "ffhq64", "--out", str(tmp_path / "c.yaml"), "--set", "batch=3"])
    assert not (tmp_path / "c.yaml").exists()


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
