"""torch-fidelity's Inception-v3 (sidlib's FID) against EDM's TorchScript detector (EDM's ``fid.py``, SiD's metrics),
on the images of one released generator: a GPU cross-check of the two feature extractors.

Both are ports of TensorFlow's ``inception-2015-12-05`` graph: torch-fidelity's ``inception-v3-compat`` (weights
``weights-inception-2015-12-05-6726825d.pth``) and NVIDIA's ``inception-2015-12-05.pkl``, with which EDM computed its
reference statistics. The script generates the images once (EDM's per-seed noise, ``sidlib.metrics.protocol``),
feeds the same uint8 batches to both, and reports the per-image difference of the 2048-d pool features, the FID of
each feature set against the reference statistics, and the Frechet distance between the two feature sets::

    python benchmarks/compare_inception.py --detector /data/inception-2015-12-05.pkl --device cuda
    SIDLIB_EDM_DETECTOR=/data/inception-2015-12-05.pkl python benchmarks/compare_inception.py \\
        --network sid-imagenet64-cond-alpha1.2 --ref imagenet-64x64 --num-images 50000 --out cmp.json

The detector comes from https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/
inception-2015-12-05.pkl (the URL in EDM's ``fid.py``). It is opened with ``torch.jit.load`` or, failing that, with
``pickle`` (which runs code from the file: use only NVIDIA's file; ``--edm-repo`` puts an EDM checkout on the path
for it). Without the detector, the network or the reference the script prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
import warnings

import numpy as np
import torch

DETECTOR_ENV = "SIDLIB_EDM_DETECTOR"


def load_detector(path: str, edm_repo: str | None = None):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the file is TorchScript
            return torch.jit.load(path, map_location="cpu")
    except Exception:  # noqa: BLE001 -- NVIDIA's file is a pickle around the TorchScript module
        if edm_repo:
            sys.path.insert(0, edm_repo)
        with open(path, "rb") as f:
            return pickle.load(f)


def compare(features_a: np.ndarray, features_b: np.ndarray, mu_ref, sigma_ref) -> dict:
    """Feature differences and FIDs of two ``[N, 2048]`` feature sets of the same images."""
    from sidlib.metrics import feature_statistics, fid_from_statistics

    diff = np.abs(features_a - features_b)
    scale = float(np.abs(features_b).mean())
    stats_a, stats_b = feature_statistics(features_a), feature_statistics(features_b)
    return {"images": int(features_a.shape[0]), "max_abs_feature_diff": float(diff.max()),
            "mean_abs_feature_diff": float(diff.mean()), "mean_abs_feature": scale,
            "fid_torch_fidelity": fid_from_statistics(*stats_a, mu_ref, sigma_ref),
            "fid_edm_detector": fid_from_statistics(*stats_b, mu_ref, sigma_ref),
            "frechet_between_extractors": fid_from_statistics(*stats_a, *stats_b)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", default=os.environ.get(DETECTOR_ENV), help=f"EDM's detector pickle (${DETECTOR_ENV})")
    p.add_argument("--edm-repo", default=os.environ.get("SIDLIB_EDM_REPO"), help="EDM checkout, if pickle needs it")
    p.add_argument("--network", default="sid-cifar10-uncond-alpha1.2", help="released generator (or any source)")
    p.add_argument("--ref", default="cifar10-32x32", help="EDM reference statistics (name, URL or .npz)")
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON report")
    args = p.parse_args(argv)
    if not args.detector or not os.path.isfile(args.detector):
        print(f"skipped: EDM's detector pickle not found (pass --detector or set ${DETECTOR_ENV}; download "
              f"inception-2015-12-05.pkl from the URL in EDM's fid.py)")
        return 0

    from sidlib.io.checkpoints import load_checkpoint
    from sidlib.metrics import INCEPTION, FeatureExtractor
    from sidlib.metrics.protocol import onestep_generator
    from sidlib.metrics.references import fetch_reference, load_reference_stats
    from sidlib.rng import inputs_for_seeds
    from sidlib.sampling import to_uint8

    device = torch.device(args.device)
    try:
        mu_ref, sigma_ref = load_reference_stats(fetch_reference(args.ref))
        net, meta = load_checkpoint(args.network)
        ours = FeatureExtractor(INCEPTION, ["fid"], cuda=device.type == "cuda")
    except (OSError, ValueError) as e:  # offline, missing files, missing Inception weights
        print(f"skipped: {' '.join(str(e).split())}")
        return 0
    detector = load_detector(args.detector, args.edm_repo).to(device).eval()
    net = net.to(device).eval().requires_grad_(False)
    fn = onestep_generator(net, float((meta or {}).get("init_sigma", 2.5)))
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    feats_a, feats_b, t0 = [], [], time.time()
    with torch.no_grad():
        for start in range(0, args.num_images, args.batch):
            seeds = range(start, min(start + args.batch, args.num_images))
            z, labels, _ = inputs_for_seeds(seeds, shape, int(net.label_dim), device)
            images = to_uint8(fn(z, labels))
            feats_a.append(ours(images)["fid"].double().numpy())
            feats_b.append(detector(images.to(device), return_features=True).double().cpu().numpy())
    report = {"network": args.network, "reference": args.ref, "device": str(device), "seconds": time.time() - t0,
              **compare(np.concatenate(feats_a), np.concatenate(feats_b), mu_ref, sigma_ref)}
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
