"""Samplers and seeded randomness: Heun on an analytic Gaussian denoiser, NFE, one/few-step G, seeds."""

import math

import pytest
import torch

from sidlib.rng import (derive_seed, labels_for_seeds, latents_for_seeds, rand, randn, random_labels,
                        sample_generators)
from sidlib.sampling import edm_sigmas, generate_fewstep, generate_onestep, heun_sampler, to_uint8

MU, S = 0.3, 0.4  # data N(MU, S^2) per dimension


class GaussianDenoiser:
    """Exact E[x0 | x0 + sigma n = x] for x0 ~ N(MU, S^2); counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return MU + S ** 2 / (S ** 2 + s ** 2) * (x - MU)


def test_edm_sigmas_endpoints_and_order():
    t = edm_sigmas(18)
    assert t.shape == (19,) and t.dtype == torch.float64
    assert t[0].item() == pytest.approx(80.0) and t[-2].item() == pytest.approx(0.002) and t[-1].item() == 0
    assert (t[1:] < t[:-1]).all()


@pytest.mark.parametrize('steps', [1, 2, 18])
def test_heun_nfe_is_2n_minus_1(steps):
    D = GaussianDenoiser()
    x = latents_for_seeds(range(4), [2, 1, 1]) * 80.0
    _, nfe = heun_sampler(D, x, edm_sigmas(steps))
    assert nfe == 2 * steps - 1 == D.calls


def _exact_flow(x_T, sigma_max):
    # PF-ODE of Gaussian data: (x - MU) grows like sqrt(S^2 + sigma^2), so
    # x(0) = MU + (x(sigma_max) - MU) * S / sqrt(S^2 + sigma_max^2).
    return MU + (x_T - MU) * S / math.sqrt(S ** 2 + sigma_max ** 2)


def test_heun_converges_at_second_order_to_the_exact_gaussian_flow():
    x_T = latents_for_seeds(range(64), [1, 1, 1]) * 80.0
    exact = _exact_flow(x_T, 80.0)
    errs = [(heun_sampler(GaussianDenoiser(), x_T, edm_sigmas(n))[0] - exact).abs().max().item() for n in (25, 50, 100)]
    for coarse, fine in zip(errs, errs[1:]):
        assert 3.0 < coarse / fine < 5.5  # halving the step size divides the error by ~4


def test_heun_reproduces_the_data_moments():
    D = GaussianDenoiser()
    x_T = latents_for_seeds(range(4000), [1, 1, 1]) * 80.0
    x0, _ = heun_sampler(D, x_T, edm_sigmas(100))
    exact = _exact_flow(x_T, 80.0)
    # The discretisation error is a fixed fraction of the distance travelled from MU (linear ODE).
    assert ((x0 - exact).abs() <= 3e-3 * (exact - MU).abs() + 1e-9).all()
    n = x0.numel()
    assert abs(x0.mean().item() - MU) < 4 * S / math.sqrt(n)
    assert x0.var().item() == pytest.approx(S ** 2, rel=4 * math.sqrt(2 / n))


def test_stochastic_heun_keeps_the_gaussian_moments():
    D = GaussianDenoiser()
    x_T = latents_for_seeds(range(4000), [1, 1, 1]) * 80.0
    g = torch.Generator().manual_seed(0)
    # EDM's ImageNet setting (256 steps); with few steps the churn's own discretisation bias shows.
    x0, nfe = heun_sampler(D, x_T, edm_sigmas(256), S_churn=40, S_min=0.05, S_max=50, S_noise=1.0, generator=g)
    assert nfe == 511 == D.calls
    n = x0.numel()
    assert abs(x0.mean().item() - MU) < 4 * S / math.sqrt(n)
    assert x0.var().item() == pytest.approx(S ** 2, rel=4 * math.sqrt(2 / n))


class AffineG(torch.nn.Module):
    """Stand-in generator with EDMPrecond's call signature."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.img_channels, self.img_resolution, self.label_dim = 1, 2, 0

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        s = torch.as_tensor(sigma).reshape(-1, 1, 1, 1)
        return torch.tanh(self.w * x / (1 + s)) + 0.1 * s


def test_generate_onestep_feeds_init_sigma_times_z():
    G = AffineG()
    z = latents_for_seeds([1, 2, 3], [1, 2, 2])
    x = generate_onestep(G, z, 2.5)
    want = G(2.5 * z.float(), torch.full([3], 2.5))
    torch.testing.assert_close(x, want)
    assert x.dtype == torch.float32


def test_generate_fewstep_renoises_between_steps():
    G = AffineG()
    z = latents_for_seeds([4, 5], [1, 2, 2])
    torch.testing.assert_close(generate_fewstep(G, z, [2.5]), generate_onestep(G, z, 2.5))
    out = generate_fewstep(G, z, [2.5, 0.8], generator=torch.Generator().manual_seed(9))
    x1 = G(2.5 * z.float(), torch.full([2], 2.5))
    n = torch.randn([2, 1, 2, 2], generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out, G(x1 + 0.8 * n, torch.full([2], 0.8)))
    with pytest.raises(ValueError):
        generate_fewstep(G, z, [])


def test_latents_and_labels_do_not_depend_on_how_seeds_are_split():
    seeds = list(range(10, 18))
    z = latents_for_seeds(seeds, [3, 4, 4])
    torch.testing.assert_close(z, torch.cat([latents_for_seeds(seeds[:3], [3, 4, 4]),
                                             latents_for_seeds(seeds[3:], [3, 4, 4])]), rtol=0, atol=0)
    lab = labels_for_seeds(seeds, 10)
    assert lab.shape == (8, 10) and torch.equal(lab.sum(1), torch.ones(8))
    assert torch.equal(lab, torch.cat([labels_for_seeds(seeds[:5], 10), labels_for_seeds(seeds[5:], 10)]))
    assert labels_for_seeds(seeds, 0) is None


def test_uniform_and_weighted_labels():
    lab = random_labels(6000, 3, torch.Generator().manual_seed(0))
    counts = lab.sum(0)
    assert torch.all((counts - 2000).abs() < 4 * math.sqrt(6000 * (1 / 3) * (2 / 3)))
    lab = random_labels(6000, 3, torch.Generator().manual_seed(0), probs=[0, 1, 3])
    counts = lab.sum(0)
    assert counts[0] == 0 and abs(counts[2].item() / 6000 - 0.75) < 0.03


def test_derived_seeds_and_per_sample_generators():
    assert len({derive_seed(0, it, ph, i) for it in range(5) for ph in range(2) for i in range(50)}) == 500
    a = [g.initial_seed() for g in sample_generators(range(4), 1, 2)]
    b = [g.initial_seed() for g in sample_generators(range(2, 4), 1, 2)]
    assert a[2:] == b
    assert a == [derive_seed(1, 2, i) for i in range(4)]
    assert all(0 <= derive_seed(k) < 2 ** 63 for k in (0, 1, -1, 2 ** 64 - 1))


def test_per_sample_draws_come_row_by_row_from_their_generators():
    gens = sample_generators(range(3), 5, 0)
    x = randn(3, [2, 2], gens)
    u = rand(3, [4], sample_generators(range(3), 5, 0))
    for i in range(3):
        # Row i is what a fresh generator seeded like generator i draws on its own.
        own = torch.Generator().manual_seed(derive_seed(5, 0, i))
        assert torch.equal(x[i], torch.randn([2, 2], generator=own))
        assert torch.equal(u[i], torch.rand([4], generator=torch.Generator().manual_seed(derive_seed(5, 0, i))))
    with pytest.raises(ValueError, match='per-sample generators'):
        randn(4, [2], gens)
    # One generator draws the whole batch at once.
    one = randn(3, [2], torch.Generator().manual_seed(11))
    assert torch.equal(one, torch.randn([3, 2], generator=torch.Generator().manual_seed(11)))


def test_named_streams_are_distinct_where_they_share_a_key_position():
    from sidlib import rng

    # Keys that sit in the same position of derive_seed calls must differ (see the table in sidlib.rng).
    assert rng.PHASE_FAKE != rng.PHASE_G
    assert rng.RANK_STREAM > 10 ** 6 > rng.DROPOUT_STREAM
    assert rng.STUDENT_INIT_STREAM not in (rng.PHASE_FAKE, rng.PHASE_G)
    # Evaluation streams as documented: per seed, independent of how seeds are grouped.
    assert [g.initial_seed() for g in rng.churn_generators([3, 4])] == [derive_seed(rng.CHURN_STREAM, s) for s in (3, 4)]
    own = [torch.Generator().manual_seed(derive_seed(s, rng.LABEL_STREAM)) for s in (3, 4)]
    assert torch.equal(labels_for_seeds([3, 4], 5), random_labels(2, 5, own))


def test_to_uint8_rounding_and_clipping():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    assert to_uint8(x).tolist() == [int(min(max(v * 127.5 + 128, 0), 255)) for v in x.tolist()]
    assert to_uint8(x).dtype == torch.uint8
