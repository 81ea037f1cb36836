"""Paper presets in params.yaml: values against the spec table, refusals, and the path into sidlib.distill."""

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import eval_fixtures as ef  # noqa: E402
from edm_format import write_edm_pickle  # noqa: E402

from sidlib import presets as P  # noqa: E402

# SiD's official run_sid.sh settings (spec §2.2), transcribed independently of params.yaml:
# teacher, arch, cres, alpha, batch, batch_gpu, lr(=glr), g_beta1, eps, fp16, dropout, augment, ema (Mimg),
# duration (Mimg), tick (kimg), snap, fid reference, label_dim, resolution.
SPEC = {
    "cifar10-uncond": ("edm-cifar10-32x32-uncond-vp", "ddpmpp", [2, 2, 2], 1.2, 256, 16, 1e-5, 0.0, 1e-8, False,
                       0.13, 0.12, 0.5, 500, 10, 50, "cifar10-32x32", 0, 32),
    "cifar10-cond": ("edm-cifar10-32x32-cond-vp", "ddpmpp", [2, 2, 2], 1.2, 256, 16, 1e-5, 0.0, 1e-8, False,
                     0.13, 0.12, 0.5, 800, 10, 50, "cifar10-32x32", 10, 32),
    "imagenet64-cond": ("edm-imagenet-64x64-cond-adm", "adm", [1, 2, 3, 4], 1.2, 8192, 16, 4e-6, 0.0, 1e-6, True,
                        0.10, 0.0, 2.0, 1000, 20, 50, "imagenet-64x64", 1000, 64),
    "ffhq64": ("edm-ffhq-64x64-uncond-vp", "ddpmpp", [1, 2, 2, 2], 1.2, 512, 32, 1e-5, 0.9, 1e-6, True,
               0.05, 0.15, 0.5, 500, 10, 50, "ffhq-64x64", 0, 64),
    "afhqv2-64": ("edm-afhqv2-64x64-uncond-vp", "ddpmpp", [1, 2, 2, 2], 1.0, 512, 32, 5e-6, 0.0, 1e-6, True,
                  0.05, 0.15, 0.5, 500, 10, 50, "afhqv2-64x64", 0, 64),
}
FIELDS = ("teacher", "arch", "cres", "alpha", "batch", "batch_gpu", "lr", "g_beta1", "adam_eps", "fp16", "dropout",
          "augment", "ema_mimg", "duration_mimg", "tick_kimg", "snap_ticks", "fid_ref", "label_dim", "resolution")


def test_presets_match_the_spec_table():
    assert P.preset_names() == list(SPEC)
    for name, values in SPEC.items():
        p = P.get_preset(name)
        for key, want in zip(FIELDS, values):
            assert p[key] == pytest.approx(want) if isinstance(want, float) else p[key] == want, (name, key)
        assert p["glr"] == p["lr"] and p["tmax"] == 800 and p["init_sigma"] == 2.5
        assert (p["ls"], p["lsg"]) == (1, 100)
    assert P.get_preset("imagenet64-cond")["pr_ref"] == "imagenet64-openai"
    assert "is50k" in P.get_preset("cifar10-uncond")["metrics"]
    assert P.get_preset("cifar10-cond")["teacher_sampler"]["nfe"] == 35
    assert P.get_preset("imagenet64-cond")["teacher_sampler"]["nfe"] == 511


def test_released_and_teacher_names_exist_in_the_checkpoint_registry():
    from sidlib.checkpoints import SID_GENERATOR_INFO, TEACHERS

    for name in SPEC:
        p = P.get_preset(name)
        assert p["teacher"] in TEACHERS
        for key, released in p["released"].items():
            info = SID_GENERATOR_INFO[released]
            assert key == f"alpha{info['alpha']:.1f}" and info["teacher"] == p["teacher"]


def test_references_are_known():
    from sidlib.references import reference_url

    for name in SPEC:
        p = P.get_preset(name)
        assert reference_url(p["fid_ref"]).endswith(".npz")
        if p["pr_ref"]:
            assert "VIRTUAL_imagenet64_labeled" in reference_url(p["pr_ref"], "pr")


def test_unknown_benchmark_lists_the_valid_names():
    with pytest.raises(P.PresetError) as err:
        P.get_preset("cifar100")
    for name in SPEC:
        assert name in str(err.value)


def test_unknown_override_key_and_malformed_entries_name_the_key(tmp_path):
    with pytest.raises(P.PresetError, match="unknown key 'alhpa'"):
        P.get_preset("ffhq64", {"alhpa": 1.0})
    with pytest.raises(P.PresetError, match=r"paper\.presets\.ffhq64\.batch_gpu"):
        P.get_preset("ffhq64", {"batch_gpu": "many"})
    block = yaml.safe_load(Path(P.find_params_file()).read_text())["paper"]
    bad = dict(block["presets"]["ffhq64"])
    del bad["alpha"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"paper": {"presets": {"broken": bad}}}))
    with pytest.raises(P.PresetError, match=r"paper\.presets\.broken. is missing alpha"):
        P.load_paper_params(path)
    path.write_text(yaml.safe_dump({"other": 1}))
    with pytest.raises(P.PresetError, match="no top-level `paper:` block"):
        P.load_paper_params(path)


def test_distill_config_mapping():
    from sidlib.distill import DistillConfig

    for name in SPEC:
        p = P.get_preset(name)
        cfg = DistillConfig.from_dict(P.preset_to_distill_config(name))
        assert cfg.ema_halflife_kimg == pytest.approx(p["ema_mimg"] * 1000)
        assert cfg.duration_kimg == pytest.approx(p["duration_mimg"] * 1000)
        assert cfg.precision == ("fp16" if p["fp16"] else "fp32")
        assert cfg.augment_p == p["augment"] and cfg.glr == p["glr"] and cfg.adam_eps == p["adam_eps"]
        assert cfg.teacher_kwargs["channel_mult"] == p["cres"]
        cfg.validate(world_size=1)
    short = P.preset_to_distill_config("cifar10-uncond", {"iterations": 2})
    assert "duration_kimg" not in short and short["iterations"] == 2
    with pytest.raises(P.PresetError, match="not DistillConfig keys"):
        P.preset_to_distill_config("cifar10-uncond", {"not_a_key": 1})


def tiny_ddpmpp_teacher(path, channel_mult=(1,)):
    """A teacher with the DDPM++ kwargs the preset checks (128 base channels) but one level and one block."""
    from sidlib.networks import EDMPrecond
    import torch

    torch.manual_seed(0)
    net = EDMPrecond(8, 3, model_type="SongUNet", model_channels=128, channel_mult=list(channel_mult), num_blocks=1,
                     attn_resolutions=[], channel_mult_emb=1, augment_dim=9, dropout=0.0).eval()
    write_edm_pickle(path, {"ema": net})
    return path


def test_teacher_architecture_mismatch_is_refused(tmp_path):
    pkl = tiny_ddpmpp_teacher(tmp_path / "teacher.pkl")
    with pytest.raises(P.PresetError) as err:
        P.check_teacher("cifar10-uncond", str(pkl))
    assert "channel_mult" in str(err.value) and "img_resolution" in str(err.value)
    eff = P.check_teacher(P.get_preset("cifar10-uncond", {"cres": [1], "resolution": 8}), str(pkl))
    assert eff["channel_mult"] == [1]
    with pytest.raises(P.PresetError, match="model_type"):
        P.check_teacher(P.get_preset("imagenet64-cond", {"cres": [1], "resolution": 8, "label_dim": 0}), str(pkl))


@pytest.mark.slow
def test_two_distillation_iterations_with_the_real_preset_at_tiny_size(tmp_path, monkeypatch):
    """The preset's path end to end in miniature: file:// teacher, distill with the proxy-FID hook, paper figure."""
    import json

    from sidlib import paper
    from sidlib.distill import DistillConfig, distill

    pkl = tiny_ddpmpp_teacher(tmp_path / "teacher.pkl")
    ef.write_reference_npz(tmp_path / "ref.npz", ef.random_images(32, seed=3))
    monkeypatch.setenv("SIDLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SIDLIB_PROXY_EVAL", json.dumps({
        "ref": str(tmp_path / "ref.npz"), "num_images": 8, "batch_size": 8, "feature_extractor": ef.TINY,
        "import": [str(Path(__file__).with_name("eval_fixtures.py"))]}))
    preset = P.get_preset("cifar10-uncond", {"cres": [1], "resolution": 8})
    cfg = P.preset_to_distill_config(preset, {"teacher": pkl.resolve().as_uri(), "iterations": 2, "batch": 2,
                                              "batch_gpu": 1, "grid_size": 0, "progress": False, "device": "cpu",
                                              "eval_fn": "sidlib.fid_protocol:proxy_eval_from_env",
                                              "run_dir": str(tmp_path / "run")})
    run = distill(DistillConfig.from_dict(cfg))
    log = (Path(run) / "log.jsonl").read_text().strip().splitlines()
    assert log and '"iteration": 2' in log[-1]
    stored = yaml.safe_load((Path(run) / "config.json").read_text())
    assert stored["alpha"] == 1.2 and stored["augment_p"] == 0.12 and stored["dropout"] == 0.13
    curve = paper.load_training_curve(run)
    assert curve["metric"] == "fid8_proxy" and len(curve["images"]) >= 1 and curve["alpha"] == 1.2
    png = paper.plot_fid_vs_images({"SiD": (curve["images"], curve["fid"])},
                                   paper.teacher_reference_lines("cifar10-uncond"), title="tiny",
                                   out=tmp_path / "fig.png")
    assert png.is_file()
