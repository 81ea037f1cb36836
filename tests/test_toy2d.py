"""toy2d: the closed-form mixture denoiser and the distribution metrics."""
import math

import pytest
import torch

from sidlib import toy2d


SPEC = toy2d.MixtureSpec(num_modes=8, radius=1.0, std=0.05)


def test_denoiser_matches_self_normalised_monte_carlo():
    # E[x0 | x] = sum_i x0_i N(x; x0_i, sigma^2) / sum_i N(x; x0_i, sigma^2) over exact mixture samples x0_i.
    den = toy2d.MixtureDenoiser(8, 1.0, 0.05)
    x0 = toy2d.sample_mixture(SPEC, 400_000, seed=1).double()
    queries = torch.tensor([[0.3, -0.2], [1.1, 0.4], [-0.6, 0.7]], dtype=torch.float64)
    for sigma in (0.4, 1.0):
        logw = -0.5 * torch.cdist(queries, x0).pow(2) / sigma ** 2  # [Q, M]
        w = torch.softmax(logw, dim=1)
        mc = w @ x0
        ess = 1.0 / w.pow(2).sum(1)
        assert ess.min() > 1000  # enough effective samples for a 1e-2 check
        exact = den(queries.float().reshape(-1, 2, 1, 1), sigma).reshape(-1, 2).double()
        assert torch.allclose(exact, mc, atol=1.5e-2), (sigma, exact, mc)


def test_denoiser_satisfies_tweedie_with_autograd_score():
    # Tweedie: E[x0|x] = x + sigma^2 * grad log p_sigma(x); the score comes from the log density by autograd.
    den = toy2d.MixtureDenoiser(8, 1.0, 0.05)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in (0.01, 0.3, 5.0):
        xr = x.clone().requires_grad_(True)
        score = torch.autograd.grad(toy2d.mixture_log_density(xr, SPEC, sigma).sum(), xr)[0]
        expected = x + sigma ** 2 * score
        got = den(x.float().reshape(-1, 2, 1, 1), torch.full((64,), sigma)).reshape(-1, 2).double()
        assert torch.allclose(got, expected, atol=1e-5)


def test_denoiser_limits_and_edm_signature():
    den = toy2d.MixtureDenoiser(8, 1.0, 0.05)
    x = toy2d.points_to_images(toy2d.sample_mixture(SPEC, 16))
    out = den(x, torch.full((16, 1, 1, 1), 1e-4), class_labels=None, augment_labels=None)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out, x, atol=1e-4)  # tiny noise: the observation is already clean
    far = den(x, 1e4)
    assert far.abs().max() < 1e-3  # huge noise: the mixture mean (the origin)
    assert den.img_channels == 2 and den.img_resolution == 1 and den.label_dim == 0


def test_denoiser_is_differentiable_in_its_input():
    den = toy2d.MixtureDenoiser()
    x = torch.randn(5, 2, 1, 1, requires_grad=True)
    den(x, 0.5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_log_density_integrates_to_one():
    gx, gy, ld = toy2d.grid_log_density(SPEC, extent=1.5, steps=600)
    cell = (gx[0, 1] - gx[0, 0]) ** 2
    assert math.isclose(float((torch.from_numpy(ld).exp().sum() * cell).item()), 1.0, rel_tol=1e-3)


def test_distances_vanish_for_identical_samples_and_grow_with_shift():
    a = toy2d.sample_mixture(SPEC, 2000, seed=3)
    assert abs(toy2d.energy_distance(a, a)) < 1e-9
    assert toy2d.sliced_wasserstein(a, a) < 1e-12
    b = toy2d.sample_mixture(SPEC, 2000, seed=4)
    shifted = a + torch.tensor([0.3, 0.0])
    assert toy2d.energy_distance(a, shifted) > 10 * abs(toy2d.energy_distance(a, b))
    assert toy2d.sliced_wasserstein(a, shifted) > 5 * toy2d.sliced_wasserstein(a, b)
    # A pure shift by d: every 1-D projection moves by |d cos(theta)|; the mean over directions is 2d/pi.
    assert math.isclose(toy2d.sliced_wasserstein(a, shifted, num_projections=4096), 0.3 * 2 / math.pi, rel_tol=0.05)


def test_mode_coverage_detects_a_missing_mode():
    pts = toy2d.sample_mixture(SPEC, 8000, seed=5)
    full = toy2d.mode_coverage(pts, SPEC)
    assert full["modes_covered"] == 8 and full["on_mode_fraction"] > 0.99
    nearest = torch.cdist(pts.double(), SPEC.means).argmin(1)
    dropped = toy2d.mode_coverage(pts[nearest != 3], SPEC)
    assert dropped["modes_covered"] == 7 and dropped["mode_fractions"][3] == 0.0
    # Points between modes are off-mode and cover nothing.
    between = torch.zeros(100, 2)
    assert toy2d.mode_coverage(between, SPEC)["modes_covered"] == 0


def test_evaluate_points_true_samples_beat_a_collapsed_generator():
    true = toy2d.evaluate_points(toy2d.sample_mixture(SPEC, 5000, seed=6), SPEC)
    collapsed = toy2d.evaluate_points(toy2d.sample_mixture(toy2d.MixtureSpec(1, 1.0, 0.05), 5000, seed=6), SPEC)
    assert true["modes_covered"] == 8 and collapsed["modes_covered"] == 1
    assert collapsed["energy_distance"] > 20 * true["energy_distance"]
    # Mean log-density of exact samples is minus the entropy: -log(8) - log(2 pi e s^2) for separated modes.
    entropy = math.log(8) + math.log(2 * math.pi * math.e * 0.05 ** 2)
    assert math.isclose(true["mean_log_density"], -entropy, abs_tol=0.05)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="num_modes"):
        toy2d.MixtureSpec(0, 1.0, 0.05)
    with pytest.raises(ValueError, match="std"):
        toy2d.MixtureSpec(8, 1.0, -1.0)
