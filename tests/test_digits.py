"""digits: the fixed split, the value range, the feature classifier, the metrics, the benchmark's validation and
teacher config, the sample grids, and one evaluation of a student distilled here in miniature."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from experiments.common.params import ParamsError
from experiments.digits import bench as D
from experiments.digits import data
from experiments.digits.classifier import DigitClassifier, accuracy, load_classifier, save_classifier, train_classifier
from experiments.digits.plots import grid_order, tile
from sidlib.sampling import to_uint8

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def from_uint8(u):
    """EDM's convention, written out here: uint8 0..255 back to [-1, 1]."""
    return u.float() / 127.5 - 1.0


# ---- data ------------------------------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_complete():
    a_tr, a_te = data.split_indices()
    b_tr, b_te = data.split_indices()
    assert np.array_equal(a_tr, b_tr) and np.array_equal(a_te, b_te)
    assert len(a_tr) == 1400 and len(a_te) == 397
    assert not set(a_tr) & set(a_te)
    assert set(a_tr) | set(a_te) == set(range(1797))
    assert not np.array_equal(data.split_indices(seed=1)[1], a_te)  # the seed matters


def test_loaded_split_matches_indices_and_range():
    sp = data.load_digits_split()
    assert sp.train_images.shape == (1400, 1, 8, 8) and sp.test_images.shape == (397, 1, 8, 8)
    assert sp.train_images.dtype == torch.float32
    assert sp.train_images.min() == -1.0 and sp.train_images.max() == 1.0
    from sklearn.datasets import load_digits
    raw = load_digits()
    i = int(sp.test_index[5])
    assert torch.allclose(sp.test_images[5, 0], torch.from_numpy(raw.images[i] / 8.0 - 1.0).float())
    assert int(sp.test_labels[5]) == int(raw.target[i])
    assert set(sp.test_labels.tolist()) == set(range(10))  # every class is in the reference set
    # params.yaml's split is the one the module documents.
    d = PARAMS["digits"]["data"]
    other = data.load_digits_split(d["split_seed"], d["num_train"])
    assert np.array_equal(other.test_index, sp.test_index)


def test_uint8_round_trip():
    sp = data.load_digits_split()
    u = to_uint8(sp.test_images)
    assert u.dtype == torch.uint8 and u.min() == 0 and u.max() == 255
    assert (from_uint8(u) - sp.test_images).abs().max() <= 1 / 127.5 + 1e-6


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="num_train"):
        data.split_indices(num_train=1797)
    with pytest.raises(ValueError, match="num_train"):
        data.split_indices(num_train=0)


# ---- the feature classifier ------------------------------------------------------------------------------------------

def test_classifier_features_and_uint8_input():
    model = DigitClassifier().eval()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert model.features(x).shape == (4, 128) and model(x).shape == (4, 10)
    u = to_uint8(x)
    assert torch.allclose(model.features(u), model.features(from_uint8(u)))


@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(1)
    sp = data.load_digits_split()
    model, info = train_classifier(sp.train_images, sp.train_labels, epochs=3, seed=0)
    return model, accuracy(model, sp.test_images, sp.test_labels)


def test_classifier_learns_and_round_trips(tmp_path, classifier):
    model, acc = classifier
    sp = data.load_digits_split()
    assert acc > 0.8  # three epochs already separate the classes far above chance (0.1)
    again, _ = train_classifier(sp.train_images, sp.train_labels, epochs=1, seed=0)
    again2, _ = train_classifier(sp.train_images, sp.train_labels, epochs=1, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(again.state_dict().values(), again2.state_dict().values()))
    path = save_classifier(tmp_path / "clf", model, {"test_accuracy": acc})
    loaded, meta = load_classifier(path)
    assert meta["test_accuracy"] == acc
    assert torch.equal(loaded.features(sp.test_images[:8]), model.features(sp.test_images[:8]))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_classifier(tmp_path / "missing")


def test_image_metrics_of_the_reference_set_against_itself(classifier):
    # The held-out images scored against themselves: FID 0, every point inside the other set's k-NN balls.
    from experiments.digits.metrics import ImageMetrics

    model, _ = classifier
    sp = data.load_digits_split()
    m = ImageMetrics(model)
    onehot = torch.nn.functional.one_hot(sp.test_labels, 10).float()
    got = m(from_uint8(to_uint8(sp.test_images)), onehot, kid=False)
    assert abs(got["fid"]) < 1e-3
    assert got["precision"] == 1.0 and got["recall"] == 1.0
    assert 0.8 < got["class_accuracy"] <= 1.0
    # A different set scores a clearly positive FID.
    assert m(sp.train_images[:397], kid=False, prc=False)["fid"] > 10 * max(abs(got["fid"]), 1e-3)


# ---- validation and the teacher's config ----------------------------------------------------------------------------

def section(**changes):
    s = copy.deepcopy(PARAMS["digits"])
    for path, value in changes.items():
        d = s
        keys = path.split("__")
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return s


def test_validate_accepts_the_repository_section_and_names_bad_keys():
    D.BENCHMARK.validate(section())
    for changes, key in (({"teacher__classifier__lr": 0}, "digits.teacher.classifier.lr"),
                         ({"teacher__classifier__epochs": 1.5}, "digits.teacher.classifier.epochs"),
                         ({"teacher__dropout": 1.0}, "digits.teacher.dropout"),
                         ({"teacher__channel_mult": [1, 2, 2, 2, 2]}, "digits.teacher.channel_mult"),
                         ({"runs": {"seed": [0]}}, "digits.runs"),
                         ({"runs": {"variant": ["uncond", "uncond"]}}, "digits.runs.variant"),
                         ({"data__split_seed": -1}, "digits.data.split_seed"),
                         ({"eval__last_evals": 0}, "digits.eval.last_evals")):
        with pytest.raises(ParamsError) as err:
            D.BENCHMARK.validate(section(**changes))
        assert key in str(err.value), (changes, str(err.value))


def test_teacher_config_per_variant():
    s = section()
    for variant, label_dim in (("uncond", 0), ("cond", 10)):
        cfg = D.teacher_config(s, variant)
        assert cfg.label_dim == label_dim
        for k, v in s["teacher"].items():
            if k != "classifier":
                assert getattr(cfg, k) == v, k
        kw = cfg.network_kwargs()
        assert (kw["img_resolution"], kw["img_channels"], kw["label_dim"]) == (8, 1, label_dim)
        assert kw["channel_mult"] == s["teacher"]["channel_mult"]
        assert kw["model_channels"] == s["teacher"]["model_channels"]
    assert D.variants(s) == ["uncond", "cond"]
    with pytest.raises(ParamsError, match=r"digits\.teacher\.iters"):
        D.teacher_config(section(teacher__iters=3), "cond")


# ---- sample grids ----------------------------------------------------------------------------------------------------

def test_grid_order_puts_class_c_in_row_c():
    g = torch.Generator().manual_seed(0)
    n = 400
    labels = torch.randint(10, (n,), generator=g)
    x = torch.stack([torch.full((1, 8, 8), float(c)) for c in labels.tolist()])
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)  # remember each sample's position
    out = grid_order(x, torch.nn.functional.one_hot(labels, 10).float())
    assert out.shape == (100, 1, 8, 8)
    for c in range(10):
        row = out[10 * c: 10 * c + 10]
        assert (row[:, 0, 1, 1] == c).all()
        first = [i for i in range(n) if labels[i] == c][:10]  # the first ten samples of the class, in order
        assert row[:, 0, 0, 0].long().tolist() == first
    # Unlabelled samples: the first hundred as they come.
    assert torch.equal(grid_order(x, None), x[:100])


def test_tile_separates_tiles_with_background_gaps():
    n, cols, gap, h, w = 13, 5, 2, 8, 8
    imgs = np.stack([np.full((1, h, w), 100 + i, dtype=np.uint8) for i in range(n)])
    m = tile(imgs, cols=cols, gap=gap, gap_value=7)
    rows = math.ceil(n / cols)
    assert m.dtype == np.uint8 and m.shape == (rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (h + gap), c * (w + gap)
        assert (m[y:y + h, x:x + w] == 100 + i).all(), i
    # Everything else is background: the gaps, and the empty cells after the last image.
    covered = np.zeros(m.shape, bool)
    for i in range(n):
        r, c = divmod(i, cols)
        covered[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = True
    assert (m[~covered] == 7).all() and (~covered).sum() == m.size - n * h * w
    # [N, H, W] input gives the same mosaic; a gap of 0 packs the tiles.
    assert np.array_equal(tile(imgs[:, 0], cols=cols, gap=gap, gap_value=7), m)
    assert tile(imgs[:10], cols=5, gap=0).shape == (16, 40)


# ---- one evaluation of a student distilled here in miniature ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, classifier):
    """Classifier, conditional teacher (4 iterations) and a 2-iteration SiD run with the smoke settings."""
    from experiments.common.params import load_params

    torch.set_num_threads(1)
    ckpt = tmp_path_factory.mktemp("digits-ckpt")
    s = copy.deepcopy(load_params(ROOT / "params.yaml", smoke=True)["digits"])
    s["runs"] = {"variant": ["cond"], "seed": [0]}
    s["distill"].update(batch=8, duration_kimg=0.016, tick_kimg=0.008, grid_size=0)
    s["eval"].update(num_samples=60, train_samples=20, last_evals=2)
    D.BENCHMARK.validate(s)
    save_classifier(D.classifier_path(ckpt), classifier[0], {})
    D.train_teacher_variant(s, "cond", str(ckpt))
    run = D.runs(s, ckpt)[0]
    D.run_one(s, run, str(ckpt))
    return s, ckpt, run


def test_evaluate_job_of_a_tiny_student(tiny_run):
    s, ckpt, run = tiny_run
    row = D.evaluate_job(s, str(ckpt), "student", "cond", run=run)
    assert (row["model"], row["variant"], row["nfe"], row["seed"]) == ("SiD student (one step)", "cond", 1, 0)
    assert row["num_samples"] == 60 and row["kimg"] == pytest.approx(0.016)
    for k in ("fid", "kid", "precision", "recall", "class_accuracy", "sec_per_1k"):
        assert isinstance(row[k], float) and math.isfinite(row[k]), k
    assert row["fid"] > 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert 0 <= row["class_accuracy"] <= 1
    assert row["images"].dtype == np.uint8 and row["images"].shape == (60, 1, 8, 8)  # fewer than 10 per class
    # The summary of the last in-training evaluations is read from the run's log.
    log = [json.loads(line) for line in (run.dir(ckpt / "sid") / "log.jsonl").read_text().splitlines()]
    fids = [r["metrics"]["fid"] for r in log if r.get("metrics")]
    assert len(fids) == 2 and row["last_evals"]["count"] == 2
    assert row["last_evals"]["mean"] == pytest.approx(sum(fids) / 2)
    # Fixed seeds: the same row again.
    again = D.evaluate_job(s, str(ckpt), "student", "cond", run=run)
    assert again["fid"] == row["fid"] and np.array_equal(again["images"], row["images"])


def test_teacher_and_student_samples_share_latent_labels(tiny_run):
    from experiments.digits.metrics import student_samples, teacher_samples
    from sidlib.io.checkpoints import load_checkpoint, load_network

    s, ckpt, run = tiny_run
    G, meta = load_checkpoint(sorted(run.dir(ckpt / "sid").glob("network-snapshot-*.safetensors"))[-1])
    net = load_network(D.teacher_path(ckpt, s, "cond"))
    seeds = list(range(1000, 1012))
    xs, ls = student_samples(G, seeds, float(meta["init_sigma"]), 10)
    xt, lt, used = teacher_samples(net, seeds, 3, 10)
    assert used == 3 and xs.shape == xt.shape == (12, 1, 8, 8)
    assert torch.equal(ls, lt) and torch.equal(ls.sum(1), torch.ones(12))
    # Per-seed latents: a sub-list of seeds gives the same samples as the whole list.
    sub, _ = student_samples(G, seeds[4:8], float(meta["init_sigma"]), 10)
    assert torch.allclose(sub, xs[4:8], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="teacher@digits"):
        D.evaluate_job(s, str(ckpt), "teacher", "uncond", nfe=1)
