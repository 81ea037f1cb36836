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
from sidlib.rng import labels_for_seeds, latents_for_seeds  # noqa: E402

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


def independent_fid(net, seeds, mu_ref, sigma_ref, init_sigma=2.5):
    """The protocol written out by hand: per-seed latents/labels, G(2.5 z, 2.5), x*127.5+128 clipped, features."""
    z = latents_for_seeds(seeds, [3, 8, 8]).float()
    labels = labels_for_seeds(seeds, net.label_dim)
    with torch.no_grad():
        x = net(z * init_sigma, torch.full([len(seeds)], init_sigma), labels)
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
    res = FP.evaluate_network(setup["url"], sampler="heun", steps=2, num_images=6, reference_stats=setup["ref"],
                              feature_extractor=ef.TINY, batch_size=6)
    assert res["nfe"] == 3 and res["method"] == "EDM teacher" and res["generator"]["kind"] == "heun"
    assert np.isfinite(res["trials"][0]["fid6_proxy"])


def test_precision_recall_against_a_reference_batch_npz(setup, tmp_path):
    batch = tmp_path / "batch.npz"
    np.savez(batch, arr_0=setup["ref_images"].permute(0, 2, 3, 1).numpy())  # OpenAI's NHWC layout
    res = FP.evaluate_network(str(setup["pkl"]), num_images=10, reference_stats=setup["ref"], pr_reference=batch,
                              feature_extractor=ef.TINY, batch_size=5)
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
    metrics_main(["calc", "--network", str(setup["pkl"]), "--ref", str(setup["ref"]), "--num", "6",
                  "--batch", "6", "--init-sigma", "1.5", "--feature-extractor", ef.TINY, "--device", "cpu",
                  "--out", str(out)])
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
        metrics_main(["fetch", "afhqv2-64x64", "--out", str(tmp_path / "refs" / "narrow.npz")])
    assert not (tmp_path / "refs" / "narrow.npz").exists()
    # A known name whose file is not statistics is refused rather than copied.
    monkeypatch.setitem(references.FID_REFERENCES, "ffhq-64x64", src.as_uri())
    with pytest.raises(ReferenceFileError):
        metrics_main(["fetch", "ffhq-64x64", "--out", str(tmp_path / "refs" / "bad.npz")])
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


def test_missing_network_and_missing_reference_are_clear_errors(setup, tmp_path):
    from sidlib.io.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="no-such-network.pkl"):
        metrics_main(["calc", "--network", str(tmp_path / "no-such-network.pkl"), "--ref", str(setup["ref"]),
                      "--num-images", "4", "--feature-extractor", ef.TINY, "--device", "cpu"])
    with pytest.raises(FP.ProtocolError, match="--ref"):
        metrics_main(["calc", "--network", setup["url"], "--num-images", "4", "--device", "cpu"])
    with pytest.raises(FP.ProtocolError, match="proxy"):
        FP.evaluate_generator(never, img_shape=[3, 8, 8], num_images=4, proxy=False, reference_stats=setup["ref"],
                              feature_extractor=ef.TINY)


# --- distributed --------------------------------------------------------------------------------------------------------

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
