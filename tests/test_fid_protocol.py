"""The paper's FID protocol in miniature: tiny extractor, tiny reference npz, tiny EDM-format checkpoints. CPU only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).parent))
import eval_fixtures as ef  # noqa: E402
from edm_format import write_edm_pickle  # noqa: E402

from sidlib import metrics as M  # noqa: E402
from sidlib.metrics import protocol as FP  # noqa: E402
from sidlib.metrics import references  # noqa: E402
from sidlib.metrics.__main__ import main as metrics_main  # noqa: E402
from sidlib.metrics.references import ReferenceFileError, load_reference_stats, save_reference_stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny conditional one-step generator as a SiD-style snapshot pickle, and a reference npz."""
    d = tmp_path_factory.mktemp("protocol")
    net = ef.tiny_edm(label_dim=3)
    pkl = d / "network-snapshot-1.200000-000128.pkl"
    write_edm_pickle(pkl, {"ema": net})
    ref_images = ef.random_images(48, seed=11)
    mu, sigma = ef.write_reference_npz(d / "ref.npz", ref_images)
    return {"dir": d, "net": net, "pkl": pkl, "url": pkl.resolve().as_uri(), "ref": d / "ref.npz", "mu": mu,
            "sigma": sigma, "ref_images": ref_images}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDLIB_CACHE", str(tmp_path / "cache"))


def frechet_scipy(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def edm_inputs(seeds, label_dim, shape=(3, 8, 8)):
    """EDM's generate.py written out: a CPU generator per seed (seed % 2**32), randn float32, then randint."""
    gens = [torch.Generator().manual_seed(int(s) % 2 ** 32) for s in seeds]
    z = torch.stack([torch.randn(list(shape), generator=g) for g in gens])
    labels = torch.eye(label_dim)[torch.stack([torch.randint(label_dim, [], generator=g) for g in gens])] \
        if label_dim else None
    return z, labels


def independent_fid(net, seeds, mu_ref, sigma_ref, init_sigma=2.5):
    """The protocol written out by hand: EDM's per-seed latents/labels, G(2.5 z, 2.5), x*127.5+128 clipped, features."""
    z, labels = edm_inputs(seeds, net.label_dim)
    with torch.no_grad():
        x = net(z * init_sigma, torch.full([len(seeds)], init_sigma), labels).double()
    images = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
    fe = ef.TinyInception(ef.TINY, ["pool"])
    with torch.no_grad():
        f = fe(images)[0].double().numpy()
    return frechet_scipy(f.mean(0), np.cov(f, rowvar=False), mu_ref, sigma_ref)


def all_keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from all_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from all_keys(v)


# --- names and seeds ---------------------------------------------------------------------------------------------------

def test_paper_count_is_not_a_proxy_and_every_other_count_is():
    assert FP.metric_names(50_000) == {"fid": "fid50k", "is": "is50k", "pr": "pr50k3", "proxy": False}
    names = FP.metric_names(10_000)
    assert names["proxy"] and all(names[k].endswith("_proxy") for k in ("fid", "is", "pr"))
    assert FP.metric_names(50_000, proxy=True)["fid"] == "fid50k_proxy"
    with pytest.raises(FP.ProtocolError, match="proxy"):
        FP.metric_names(10_000, proxy=False)


def test_trial_seed_ranges_are_disjoint_and_rank_splits_partition_them():
    ranges = [FP.trial_seeds(t, 50, seed_start=7) for t in range(3)]
    assert list(ranges[0]) == list(range(7, 57)) and ranges[2][0] == 107
    assert not set(ranges[0]) & set(ranges[1])
    seeds = list(ranges[1])
    for world in (1, 2, 3, 8, 64):
        parts = [list(FP.rank_seeds(seeds, r, world)) for r in range(world)]
        assert sorted(s for p in parts for s in p) == seeds


def test_summary_statistics_match_numpy():
    names = FP.metric_names(100)
    fids = [3.0, 2.0, 2.5, 1.5]
    trials = [{names["fid"]: f, names["is"]: 9 + f} for f in fids]
    s = FP.summarise_trials(trials, names)
    assert s[f"{names['fid']}_mean"] == pytest.approx(np.mean(fids))
    assert s[f"{names['fid']}_std"] == pytest.approx(np.std(fids, ddof=1))
    assert s[f"{names['fid']}_best"] == 1.5 and s[f"{names['fid']}_min_of_3"] == 2.0
    assert s[f"{names['is']}_best"] == pytest.approx(12.0)
    assert f"{names['fid']}_min_of_3" not in FP.summarise_trials(trials[:2], names)


# --- generation ---------------------------------------------------------------------------------------------------------

def test_features_do_not_depend_on_batch_size(setup):
    fn = FP.onestep_generator(setup["net"])
    seeds = list(range(5, 16))
    with M.FeatureExtractor(ef.TINY, ["fid", "isc"]) as fe:
        a = FP.generate_features(fn, seeds, fe, img_shape=[3, 8, 8], label_dim=3, batch_size=3)
        b = FP.generate_features(fn, seeds, fe, img_shape=[3, 8, 8], label_dim=3, batch_size=11)
        c = FP.generate_features(fn, seeds[4:], fe, img_shape=[3, 8, 8], label_dim=3, batch_size=2)
    for m in ("fid", "isc"):
        torch.testing.assert_close(a[m], b[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[m][4:], c[m], rtol=1e-5, atol=1e-6)


def test_stochastic_heun_noise_is_per_seed(setup):
    fn = FP.heun_generator(setup["net"], num_steps=3, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    assert fn.nfe == 5
    seeds = [3, 4, 5, 6]
    with M.FeatureExtractor(ef.TINY, ["fid"]) as fe:
        a = FP.generate_features(fn, seeds, fe, img_shape=[3, 8, 8], label_dim=3, batch_size=4)["fid"]
        b = FP.generate_features(fn, seeds[2:], fe, img_shape=[3, 8, 8], label_dim=3, batch_size=1)["fid"]
    torch.testing.assert_close(a[2:], b, rtol=1e-5, atol=1e-6)


# --- released-checkpoint path -------------------------------------------------------------------------------------------

def test_released_checkpoint_path_equals_the_protocol_written_out(setup):
    res = FP.evaluate_network(setup["url"], num_images=20, trials=2, seed_start=100, reference_stats=setup["ref"],
                              feature_extractor=ef.TINY, isc=True, batch_size=8)
    name = res["protocol"]["name"]
    assert name == "fid20_proxy" and res["protocol"]["proxy"] is True
    assert res["method"] == "SiD" and res["alpha"] == pytest.approx(1.2) and res["nfe"] == 1
    for t, trial in enumerate(res["trials"]):
        seeds = list(range(100 + 20 * t, 120 + 20 * t))
        assert [trial["seed_first"], trial["seed_last"]] == [seeds[0], seeds[-1]]
        expected = independent_fid(setup["net"], seeds, setup["mu"], setup["sigma"])
        assert trial[name] == pytest.approx(expected, rel=1e-4)
    assert res["summary"][f"{name}_best"] == min(t[name] for t in res["trials"])
    assert all("proxy" in k for k in all_keys(res["summary"]) if k != "trials")
    assert all("proxy" in k for t in res["trials"] for k in t if k.startswith(("fid", "is", "pr")))


def test_teacher_heun_path_reports_nfe(setup):
    res = FP.evaluate_network(setup["url"], sampler="heun", steps=2, num_images=6, trials=1,
                              reference_stats=setup["ref"], feature_extractor=ef.TINY, batch_size=6)
    assert res["nfe"] == 3 and res["method"] == "EDM teacher" and res["generator"]["kind"] == "heun"
    assert np.isfinite(res["trials"][0]["fid6_proxy"])


def test_precision_recall_against_a_reference_batch_npz(setup, tmp_path):
    batch = tmp_path / "batch.npz"
    np.savez(batch, arr_0=setup["ref_images"].permute(0, 2, 3, 1).numpy())  # OpenAI's NHWC layout
    res = FP.evaluate_network(str(setup["pkl"]), num_images=10, trials=1, reference_stats=setup["ref"],
                              pr_reference=batch, feature_extractor=ef.TINY, batch_size=5)
    t = res["trials"][0]
    assert 0 <= t["pr10_k3_proxy_precision"] <= 1 and 0 <= t["pr10_k3_proxy_recall"] <= 1
    assert res["protocol"]["pr_reference_images"] == 48


def test_cli_calc_writes_metrics_json(setup, tmp_path):
    # In-process: eval_fixtures (imported above) registered the tiny extractor; --import takes installed modules.
    out = tmp_path / "m" / "metrics.json"
    assert metrics_main(["calc", "--network", setup["url"], "--ref", str(setup["ref"]), "--num-images", "8",
                         "--trials", "3", "--batch", "4", "--feature-extractor", ef.TINY, "--device", "cpu",
                         "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["format"] == FP.FORMAT and len(res["trials"]) == 3
    assert res["protocol"]["quantisation"].startswith("uint8(clip(x * 127.5 + 128")
    assert "fid8_proxy_min_of_3" in res["summary"]
    for t, trial in enumerate(res["trials"]):
        seeds = list(range(8 * t, 8 * t + 8))
        assert trial["fid8_proxy"] == pytest.approx(independent_fid(setup["net"], seeds, setup["mu"], setup["sigma"]),
                                                    rel=1e-4)
    assert not list(out.parent.glob("*.partial"))


def test_cli_init_sigma_reaches_the_generator(setup, tmp_path):
    out = tmp_path / "m.json"
    assert metrics_main(["calc", "--network", str(setup["pkl"]), "--ref", str(setup["ref"]), "--num", "6",
                         "--trials", "1", "--batch", "6", "--init-sigma", "1.5", "--feature-extractor", ef.TINY,
                         "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["generator"]["init_sigma"] == 1.5
    assert res["trials"][0]["fid6_proxy"] == pytest.approx(
        independent_fid(setup["net"], range(6), setup["mu"], setup["sigma"], init_sigma=1.5), rel=1e-4)


def test_cli_fetch_copies_a_file_url_and_validates_known_references(setup, tmp_path, monkeypatch, capsys):
    src = tmp_path / "somewhere" / "batch.bin"
    src.parent.mkdir()
    src.write_bytes(b"not an npz, but fetch only copies files given by URL")
    out = tmp_path / "refs" / "copy.bin"
    assert metrics_main(["fetch", src.as_uri(), "--out", str(out)]) == 0
    assert out.read_bytes() == src.read_bytes()
    # A known FID reference name is resolved to its URL, downloaded into the cache, checked as 2048-d Inception
    # statistics (EDM's layout), and copied.
    inception_like = tmp_path / "upstream" / "cifar10-32x32.npz"
    inception_like.parent.mkdir()
    mu = np.linspace(-1, 1, 2048)
    np.savez_compressed(inception_like, mu=mu, sigma=np.eye(2048))
    monkeypatch.setitem(references.FID_REFERENCES, "cifar10-32x32", inception_like.as_uri())
    ref_out = tmp_path / "refs" / "fid.npz"
    metrics_main(["fetch", "cifar10-32x32", "--out", str(ref_out)])
    got_mu, got_sigma = load_reference_stats(ref_out)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, np.eye(2048))
    assert list((tmp_path / "cache").rglob("cifar10-32x32.npz"))  # through the download cache of this test
    # Statistics of the wrong width under a known FID name are refused rather than copied.
    monkeypatch.setitem(references.FID_REFERENCES, "afhqv2-64x64", setup["ref"].resolve().as_uri())
    with pytest.raises(ReferenceFileError, match="2048"):
        metrics_main(["fetch", "afhqv2-64x64", "--out", str(tmp_path / "refs" / "narrow.npz"), "--debug"])
    assert not (tmp_path / "refs" / "narrow.npz").exists()
    # A known name whose file is not statistics is refused rather than copied (one error line, status 2).
    monkeypatch.setitem(references.FID_REFERENCES, "ffhq-64x64", src.as_uri())
    capsys.readouterr()
    assert metrics_main(["fetch", "ffhq-64x64", "--out", str(tmp_path / "refs" / "bad.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "refs" / "bad.npz").exists()
    capsys.readouterr()
    metrics_main(["list"])
    listed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert listed["cifar10-32x32"] == inception_like.as_uri()
    assert set(listed) == set(references.FID_REFERENCES) | set(references.PR_REFERENCES)


def test_proxy_fid_for_distillation(setup):
    fn = FP.proxy_fid(setup["ref"], num_images=6, feature_extractor=ef.TINY, batch_size=6)
    out = fn(setup["net"], 12.0)
    assert set(out) == {"fid6_proxy"}
    assert out["fid6_proxy"] == pytest.approx(independent_fid(setup["net"], range(6), setup["mu"], setup["sigma"]),
                                              rel=1e-4)


def test_reference_names_resolve_through_the_download_cache(setup, monkeypatch):
    monkeypatch.setitem(references.FID_REFERENCES, "cifar10-32x32", setup["ref"].resolve().as_uri())
    assert references.reference_url("cifar10-32x32") == setup["ref"].resolve().as_uri()
    path = references.fetch_reference("cifar10-32x32")
    assert path != setup["ref"] and path.read_bytes() == setup["ref"].read_bytes()
    mu, sigma = load_reference_stats(path, dim=None)
    np.testing.assert_allclose(mu, setup["mu"])
    # An existing file is used in place; unknown names are refused naming the known ones.
    assert references.fetch_reference(setup["ref"]) == setup["ref"]
    with pytest.raises(ReferenceFileError, match="known references"):
        references.fetch_reference("cifar-11")
    with pytest.raises(ReferenceFileError, match="cifar10-32x32"):
        references.reference_url("cifar10-uncond")  # benchmark names are not reference names


# --- refusals before compute --------------------------------------------------------------------------------------------

def never(*a, **k):
    raise AssertionError("the generator must not run")


def test_wrong_shape_reference_is_refused_before_generation(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(16), sigma=np.zeros((16, 15)))
    with pytest.raises(ReferenceFileError) as err:
        FP.evaluate_generator(never, img_shape=[3, 8, 8], num_images=4, reference_stats=bad,
                              feature_extractor=ef.TINY)
    assert str(bad) in str(err.value) and "'sigma'" in str(err.value) and "(16, 16)" in str(err.value)
    small = tmp_path / "small.npz"
    save_reference_stats(small, np.zeros(16), np.eye(16))
    # The paper's Inception reference must be 2048-d; the check happens before the Inception weights are needed.
    with pytest.raises(ReferenceFileError, match=r"'mu' has shape \(16,\), expected \(2048,\)"):
        FP.evaluate_generator(never, img_shape=[3, 8, 8], num_images=4, reference_stats=small)
    # A custom extractor accepts any width, but it must be the extractor's own (16 here, not 4).
    narrow = tmp_path / "narrow.npz"
    save_reference_stats(narrow, np.zeros(4), np.eye(4))
    with pytest.raises(FP.ProtocolError, match="feature width 16"):
        FP.evaluate_generator(never, img_shape=[3, 8, 8], num_images=4, reference_stats=narrow,
                              feature_extractor=ef.TINY)
    with pytest.raises(ReferenceFileError, match="key 'mu' missing"):
        np.savez(tmp_path / "nomu.npz", sigma=np.eye(2))
        load_reference_stats(tmp_path / "nomu.npz", dim=None)


def test_missing_network_and_missing_reference_are_clear_errors(setup, tmp_path, capsys):
    from sidlib.io.checkpoints import CheckpointError

    bad = ["calc", "--network", str(tmp_path / "no-such-network.pkl"), "--ref", str(setup["ref"]),
           "--num-images", "4", "--feature-extractor", ef.TINY, "--device", "cpu"]
    assert metrics_main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-network.pkl" in err and err.count("\n") == 1
    with pytest.raises(CheckpointError, match="no-such-network.pkl"):
        metrics_main(["--debug"] + bad)
    with pytest.raises(FP.ProtocolError, match="--ref"):
        metrics_main(["calc", "--network", setup["url"], "--num-images", "4", "--device", "cpu", "--debug"])
    with pytest.raises(FP.ProtocolError, match="proxy"):
        FP.evaluate_generator(never, img_shape=[3, 8, 8], num_images=4, proxy=False, reference_stats=setup["ref"],
                              feature_extractor=ef.TINY)


# --- distributed --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_ref_equals_one_process(tmp_path):
    write_dataset(tmp_path / "data", ef.random_images(21, seed=8))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    common = ["ref", "--data", str(tmp_path / "data"), "--feature-extractor", ef.TINY, "--import", "eval_fixtures",
              "--batch", "4", "--device", "cpu"]
    assert metrics_main(common + ["--dest", str(tmp_path / "one.npz")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "sidlib.metrics", *common, "--dest", str(tmp_path / "two.npz")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(load_reference_stats(tmp_path / "one.npz", dim=None), load_reference_stats(tmp_path / "two.npz",
                                                                                                 dim=None)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(setup, tmp_path):
    # The ranks import the fixture module by name (--import takes importable modules), found via PYTHONPATH.
    common = ["--network", setup["url"], "--ref", str(setup["ref"]), "--num-images", "9", "--batch", "2",
              "--isc", "--feature-extractor", ef.TINY, "--import", "eval_fixtures", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    metrics_main(["calc", *common, "--out", str(single)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sidlib.metrics", "calc", *common, "--out", str(multi)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert b["protocol"]["world_size"] == 2 and a["protocol"]["world_size"] == 1
    for key in ("fid9_proxy", "is9_proxy"):
        assert b["trials"][0][key] == pytest.approx(a["trials"][0][key], rel=1e-6, abs=1e-9)


# --- trials, class frequencies ------------------------------------------------------------------------------------------

def recording_generator(seen):
    """A generator_fn whose images encode the class (and the latent), recording every label it receives."""
    def fn(z, labels):
        seen.append(labels.argmax(1))
        return torch.tanh(z + labels.argmax(1).float().reshape(-1, 1, 1, 1))
    return fn


def test_ten_trials_by_default_on_consecutive_seed_ranges(setup):
    assert FP.PAPER_TRIALS == 10
    res = FP.evaluate_generator(recording_generator([]), img_shape=[3, 8, 8], label_dim=3, num_images=3,
                                reference_stats=setup["ref"], feature_extractor=ef.TINY, batch_size=3)
    assert res["summary"]["trials"] == 10 and len(res["trials"]) == 10
    assert res["protocol"]["seed_ranges"] == [[3 * t, 3 * t + 2] for t in range(10)]


def test_class_frequencies_are_the_protocols_labels(setup, tmp_path, capsys):
    seen = []
    res = FP.evaluate_generator(recording_generator(seen), img_shape=[3, 8, 8], label_dim=3, num_images=40,
                                trials=1, label_probs=[0, 0, 5], reference_stats=setup["ref"],
                                feature_extractor=ef.TINY, batch_size=16)
    assert torch.cat(seen).tolist() == [2] * 40
    assert res["protocol"]["labels"] == "given class frequencies" and res["protocol"]["label_probs"] == [0, 0, 5]
    seen.clear()
    FP.evaluate_generator(recording_generator(seen), img_shape=[3, 8, 8], label_dim=3, num_images=300, trials=1,
                          reference_stats=setup["ref"], feature_extractor=ef.TINY, batch_size=300)
    assert set(torch.cat(seen).tolist()) == {0, 1, 2}  # uniform without frequencies
    with pytest.raises(FP.ProtocolError, match="2 class frequencies"):
        FP.evaluate_generator(never, img_shape=[3, 8, 8], label_dim=3, num_images=4, label_probs=[1, 1],
                              reference_stats=setup["ref"], feature_extractor=ef.TINY)
    # From the command line: a list, and the conditional network's labels follow it.
    out = tmp_path / "m.json"
    assert metrics_main(["calc", "--network", str(setup["pkl"]), "--ref", str(setup["ref"]), "--num-images", "4",
                         "--trials", "1", "--label-probs", "0,1,0", "--feature-extractor", ef.TINY, "--device",
                         "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["protocol"]["label_probs"] == [0, 1, 0]
    assert references.label_frequencies("1,3") == [0.25, 0.75]
    with pytest.raises(ReferenceFileError, match="3 classes"):
        references.label_frequencies([1, 1], 3)


# --- snapshot selection -------------------------------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path):
    """A distillation run as sidlib.distill writes it: snapshots named by kimg, FIDs logged at snapshots."""
    from sidlib.io.checkpoints import save_network

    run = tmp_path / "run"
    run.mkdir()
    nets = {k: ef.tiny_edm(label_dim=3, seed=k) for k in (0, 10, 20, 30)}
    for k, net in nets.items():
        save_network(run / f"network-snapshot-{k:06d}", net, meta={"kimg": k, "init_sigma": 2.5})
    fids = {0: 90.0, 5: 1.0, 10: 12.5, 20: 7.25, 30: 8.0}  # kimg 5 was logged, its snapshot removed since
    recs = [{"tick": i, "iteration": i, "images_seen": k * 1000 + 240, "kimg": k + 0.24,
             "metrics": {"fid8_proxy": f}} for i, (k, f) in enumerate(fids.items())]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run, nets


def test_snapshot_selection_latest_best_and_kimg(run_dir, setup):
    run, _ = run_dir
    path, sel = FP.select_snapshot(run, "latest")
    assert Path(path).name == "network-snapshot-000030.json" and sel["kimg"] == 30 and sel["of"] == 4
    path, sel = FP.select_snapshot(run, "best")
    assert Path(path).name == "network-snapshot-000020.json"
    assert sel["snapshot"] == "best" and sel["criterion_value"] == 7.25 and "fid8_proxy" in sel["criterion"]
    assert FP.select_snapshot(run, "10")[1]["kimg"] == 10 and FP.select_snapshot(run, 0)[1]["kimg"] == 0
    with pytest.raises(ValueError, match="0, 10, 20, 30"):
        FP.select_snapshot(run, 15)
    with pytest.raises(ValueError, match="latest"):
        FP.select_snapshot(run, "worst")
    assert FP.select_snapshot(setup["pkl"], "latest") == (str(setup["pkl"]), None)
    with pytest.raises(ValueError, match="run directory"):
        FP.select_snapshot(setup["pkl"], "best")
    (run / "log.jsonl").unlink()
    with pytest.raises(ValueError, match="no logged FID"):
        FP.select_snapshot(run, "best")


def test_a_run_is_evaluated_at_the_selected_snapshot_and_says_so(run_dir, setup, tmp_path):
    run, nets = run_dir
    out = tmp_path / "m.json"
    assert metrics_main(["calc", "--network", str(run), "--snapshot", "best", "--ref", str(setup["ref"]),
                         "--num-images", "6", "--trials", "1", "--feature-extractor", ef.TINY, "--device", "cpu",
                         "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["snapshot"]["kimg"] == 20 and res["snapshot"]["snapshot"] == "best" and res["kimg"] == 20
    assert res["trials"][0]["fid6_proxy"] == pytest.approx(
        independent_fid(nets[20], range(6), setup["mu"], setup["sigma"]), rel=1e-4)
    from experiments.paper.tables import measurement_from_result
    assert "20 kimg" in measurement_from_result({**res, "benchmark": "x"})["selection"]


# --- reference statistics of a dataset ----------------------------------------------------------------------------------

def write_dataset(root, images, zip_path=None):
    """EDM's dataset_tool.py layout: 00000/img00000000.png ... and dataset.json with [name, label] pairs."""
    from PIL import Image

    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    for n, img in zip(names, images):
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / n)
    (root / "dataset.json").write_text(json.dumps({"labels": [[n, i % 2] for i, n in enumerate(names)]}))
    if zip_path is not None:
        import zipfile
        with zipfile.ZipFile(zip_path, "w") as z:
            for f in sorted(root.rglob("*")):
                z.write(f, f.relative_to(root).as_posix())


def test_ref_command_computes_edm_style_statistics_of_a_folder_and_a_zip(tmp_path, capsys):
    images = ef.random_images(1003, seed=5)
    write_dataset(tmp_path / "data", images, tmp_path / "data.zip")
    fe = ef.TinyInception(ef.TINY, ["pool"])
    with torch.no_grad():
        f = fe(images)[0].double().numpy()
    for src in (tmp_path / "data", tmp_path / "data.zip"):
        dest = tmp_path / f"{src.name}.npz"
        assert metrics_main(["ref", "--data", str(src), "--dest", str(dest), "--feature-extractor", ef.TINY,
                             "--batch", "300", "--device", "cpu"]) == 0
        mu, sigma = load_reference_stats(dest, dim=None)
        np.testing.assert_allclose(mu, f.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-6, atol=1e-9)
    assert "1003 images" in capsys.readouterr().out
    assert metrics_main(["ref", "--data", str(tmp_path / "data"), "--dest", str(tmp_path / "few.npz"),
                         "--max-images", "10", "--feature-extractor", ef.TINY, "--device", "cpu"]) == 0
    np.testing.assert_allclose(load_reference_stats(tmp_path / "few.npz", dim=None)[0], f[:10].mean(0), rtol=1e-9)
    assert references.label_frequencies(tmp_path / "data.zip") == [502 / 1003, 501 / 1003]
    (tmp_path / "empty").mkdir()
    assert metrics_main(["ref", "--data", str(tmp_path / "empty"), "--dest", str(tmp_path / "e.npz"),
                         "--feature-extractor", ef.TINY]) == 2
    assert "holds no images" in capsys.readouterr().err and not (tmp_path / "e.npz").exists()
