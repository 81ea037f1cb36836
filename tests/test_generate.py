"""python -m sidlib.generate: EDM's seed syntax, the official output layouts, the images of each seed (written out
by hand from EDM's recipe, and against EDM's own sampler when SIDLIB_EDM_REPO is set), errors. CPU, no network."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import eval_fixtures as ef  # noqa: E402
from edm_format import write_edm_pickle  # noqa: E402

from sidlib import generate as gen  # noqa: E402
from sidlib.io.checkpoints import save_network  # noqa: E402
from sidlib.sampling import edm_sigmas, heun_sampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("generate")
    cond, uncond = ef.tiny_edm(label_dim=4, seed=1), ef.tiny_edm(seed=2)
    write_edm_pickle(d / "cond.pkl", {"ema": cond})
    save_network(d / "uncond", uncond, meta={"init_sigma": 1.7})
    return {"cond": cond, "uncond": uncond, "cond_pkl": d / "cond.pkl", "uncond_src": d / "uncond.safetensors"}


def edm_recipe(net, seeds, init_sigma=2.5, class_idx=None):
    """SiD's generate_onestep.py written out: generator(seed % 2**32), randn, randint, G(sigma * z), uint8."""
    gens = [torch.Generator().manual_seed(s % 2 ** 32) for s in seeds]
    z = torch.stack([torch.randn([3, 8, 8], generator=g) for g in gens])
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim)[torch.stack([torch.randint(net.label_dim, [], generator=g) for g in gens])]
        if class_idx is not None:
            labels[:] = 0
            labels[:, class_idx] = 1
    with torch.no_grad():
        x = net(init_sigma * z.double(), torch.full([len(seeds), 1, 1, 1], init_sigma), labels).double()
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8), labels


def test_seed_syntax_is_edms():
    assert gen.parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert gen.parse_seeds("5") == [5] and gen.parse_seeds(" 2 - 3 ") == [2, 3] and gen.parse_seeds([4, 1]) == [4, 1]
    for bad in ("3-1", "a", "-1", "1,,2", ""):
        with pytest.raises(ValueError, match="seeds"):
            gen.parse_seeds(bad)


def test_png_folders_npz_and_grid_hold_each_seeds_image(nets, tmp_path):
    seeds = [998, 999, 1000, 1001, 2 ** 32 + 5]
    out, npz, grid = tmp_path / "png", tmp_path / "s.npz", tmp_path / "grid.png"
    assert gen.main(["--network", str(nets["cond_pkl"]), "--seeds", f"998-1001,{2 ** 32 + 5}", "--batch", "2",
                     "--device", "cpu", "--outdir", str(out), "--npz", str(npz), "--grid", str(grid)]) == 0
    want, labels = edm_recipe(nets["cond"], seeds)
    # EDM's --subdirs layout: one folder per 1,000 seeds, six-digit names.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "000000/000998.png", "000000/000999.png", "001000/001000.png", "001000/001001.png",
        "4294967000/4294967301.png"]
    for s, w in zip(seeds, want):
        png = np.array(Image.open(out / f"{s - s % 1000:06d}" / f"{s:06d}.png"))
        assert np.array_equal(png, w.permute(1, 2, 0).numpy())
    with np.load(npz) as d:
        assert d["arr_0"].dtype == np.uint8 and d["arr_0"].shape == (5, 8, 8, 3)  # OpenAI's NHWC batches
        assert np.array_equal(d["arr_0"], want.permute(0, 2, 3, 1).numpy())
        assert d["seeds"].tolist() == seeds and d["labels"].tolist() == labels.argmax(1).tolist()
    g = np.array(Image.open(grid))
    assert g.shape == (2 * 8, 3 * 8, 3)  # ceil(sqrt(5)) = 3 columns, 2 rows, the last cell empty
    assert np.array_equal(g[8:16, 0:8], want[3].permute(1, 2, 0).numpy()) and not g[8:, 16:].any()


def test_fixed_class_flat_folder_and_init_sigma_from_the_checkpoint(nets, tmp_path):
    assert gen.main(["--network", str(nets["cond_pkl"]), "--seeds", "3-5", "--class", "2", "--device", "cpu",
                     "--npz", str(tmp_path / "c.npz")]) == 0
    want, _ = edm_recipe(nets["cond"], [3, 4, 5], class_idx=2)
    with np.load(tmp_path / "c.npz") as d:
        assert np.array_equal(d["arr_0"], want.permute(0, 2, 3, 1).numpy()) and (d["labels"] == 2).all()
    # Our checkpoint format stores init_sigma (1.7 here); an unconditional npz has no labels.
    assert gen.main(["--network", str(nets["uncond_src"]), "--seeds", "0-2", "--device", "cpu", "--no-subdirs",
                     "--outdir", str(tmp_path / "flat"), "--npz", str(tmp_path / "u.npz")]) == 0
    want, _ = edm_recipe(nets["uncond"], [0, 1, 2], init_sigma=1.7)
    with np.load(tmp_path / "u.npz") as d:
        assert np.array_equal(d["arr_0"], want.permute(0, 2, 3, 1).numpy()) and "labels" not in d.files
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_teacher_heun_images_do_not_depend_on_the_batch(nets, tmp_path):
    common = ["--network", str(nets["cond_pkl"]), "--sampler", "heun", "--steps", "3", "--S-churn", "40",
              "--S-min", "0.05", "--S-max", "50", "--seeds", "0-3", "--device", "cpu"]
    assert gen.main(common + ["--batch", "4", "--npz", str(tmp_path / "a.npz")]) == 0
    assert gen.main(common + ["--batch", "1", "--npz", str(tmp_path / "b.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_teacher_heun_matches_edms_generate_py(nets, tmp_path):
    """EDM's edm_sampler with its StackedRandomGenerator (latents, randint labels, randn_like churn noise from the
    seeds' generators) on the same network: the same uint8 images as python -m sidlib.generate --sampler heun."""
    path = os.environ.get("SIDLIB_EDM_REPO")
    if not path:
        pytest.skip("SIDLIB_EDM_REPO is not set: point it at a checkout of NVlabs/edm")
    from official_ref import OfficialRepo

    edm = OfficialRepo(path, "EDM").load("generate")
    net, seeds = nets["cond"], [0, 5, 9]
    kw = dict(num_steps=4, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    rnd = edm.StackedRandomGenerator(torch.device("cpu"), seeds)
    latents = rnd.randn([3, 3, 8, 8], device="cpu")
    labels = torch.eye(4)[rnd.randint(4, size=[3], device="cpu")]
    with torch.no_grad():
        x = edm.edm_sampler(net, latents, labels, randn_like=rnd.randn_like, **kw)
    want = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert gen.main(["--network", str(nets["cond_pkl"]), "--sampler", "heun", "--steps", "4", "--S-churn", "40",
                     "--S-min", "0.05", "--S-max", "50", "--S-noise", "1.003", "--seeds", "0,5,9", "--device", "cpu",
                     "--npz", str(tmp_path / "t.npz")]) == 0
    with np.load(tmp_path / "t.npz") as d:
        assert np.array_equal(d["arr_0"], want)


def test_deterministic_heun_is_sidlibs_sampler_on_the_seeds_latents(nets, tmp_path):
    assert gen.main(["--network", str(nets["cond_pkl"]), "--sampler", "heun", "--steps", "3", "--seeds", "7-8",
                     "--device", "cpu", "--npz", str(tmp_path / "h.npz")]) == 0
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    z = torch.stack([torch.randn([3, 8, 8], generator=g) for g in gens]).double()
    labels = torch.eye(4)[torch.stack([torch.randint(4, [], generator=g) for g in gens])]
    sigmas = edm_sigmas(3)
    x, nfe = heun_sampler(nets["cond"], z * sigmas[0], sigmas, class_labels=labels)
    with np.load(tmp_path / "h.npz") as d:
        assert nfe == 5 and np.array_equal(d["arr_0"], (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
                                           .permute(0, 2, 3, 1).numpy())


def test_errors_are_one_line_with_status_2_and_debug_raises(nets, tmp_path, capsys):
    for argv, text in ((["--network", str(tmp_path / "missing.pkl"), "--npz", "x.npz"], "missing.pkl"),
                       (["--network", str(nets["cond_pkl"]), "--seeds", "5-1", "--npz", "x.npz"], "seeds"),
                       (["--network", str(nets["cond_pkl"]), "--class", "9", "--npz", "x.npz"], "class 9"),
                       (["--network", str(nets["cond_pkl"])], "nothing to write"),
                       (["--network", str(nets["cond_pkl"]), "--snapshot", "best", "--npz", "x.npz"], "run directory")):
        assert gen.main(argv + ["--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and text in err and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="seeds"):
        gen.main(["--network", str(nets["cond_pkl"]), "--seeds", "5-1", "--npz", "x.npz", "--debug"])


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_files(nets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["--network", str(nets["cond_pkl"]), "--seeds", "0-6", "--batch", "2", "--device", "cpu"]
    assert gen.main(args + ["--npz", str(tmp_path / "one.npz"), "--outdir", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "sidlib.generate", *args, "--npz", str(tmp_path / "two.npz"), "--outdir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("arr_0", "seeds", "labels"))
    one, two = sorted((tmp_path / "one").rglob("*.png")), sorted((tmp_path / "two").rglob("*.png"))
    assert [p.relative_to(tmp_path / "one") for p in one] == [p.relative_to(tmp_path / "two") for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    assert json.dumps(proc.stdout.count("images of")) == "1"  # rank 0 reports once
