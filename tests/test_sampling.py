"""Samplers and seeded randomness: Heun on an analytic Gaussian denoiser, NFE, one/few-step G, seeds."""

import math

import pytest
import torch

from sidlib.rng import (derive_seed, inputs_for_seeds, latents_for_seeds, rand, randn,
                        random_labels, sample_generators)
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
    lab = inputs_for_seeds(seeds, [3, 4, 4], 10).labels
    assert lab.shape == (8, 10) and torch.equal(lab.sum(1), torch.ones(8))
    assert torch.equal(lab, torch.cat([inputs_for_seeds(seeds[:5], [3, 4, 4], 10).labels,
                                       inputs_for_seeds(seeds[5:], [3, 4, 4], 10).labels]))
    assert inputs_for_seeds(seeds, [3, 4, 4], 0).labels is None


def test_a_seed_is_one_generator_drawing_latent_then_label_then_sampler_noise():
    """EDM's generate.py: torch.Generator().manual_seed(s % 2**32); randn(shape) float32; randint(label_dim)."""
    seeds, shape = [0, 7, 1, 2 ** 32 + 7], [2, 3, 3]
    z, lab, gens = inputs_for_seeds(seeds, shape, 5)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s % 2 ** 32)
        assert torch.equal(z[i], torch.randn(shape, generator=g))
        assert lab[i].argmax().item() == torch.randint(5, [], generator=g).item() and lab[i].sum() == 1
        # The returned generator continues where the label left off (the stochastic sampler's noise).
        assert torch.equal(torch.randn([4], generator=gens[i], dtype=torch.float64),
                           torch.randn([4], generator=g, dtype=torch.float64))
    assert torch.equal(z[1], z[3]) and torch.equal(lab[1], lab[3])  # seeds modulo 2**32, as EDM
    assert latents_for_seeds(seeds, shape).dtype == torch.float64
    assert torch.equal(latents_for_seeds(seeds, shape), z.double())  # an exact cast of the float32 draw
    # A fixed class replaces the label after the draw, so the latents and the later noise are unchanged.
    z3, lab3, gens3 = inputs_for_seeds(seeds, shape, 5, class_idx=3)
    assert torch.equal(z3, z) and (lab3.argmax(1) == 3).all()
    assert torch.equal(torch.randn([2], generator=gens3[0]), torch.randn([2], generator=inputs_for_seeds(
        seeds, shape, 5).generators[0]))
    with pytest.raises(ValueError, match='class 5'):
        inputs_for_seeds(seeds, shape, 5, class_idx=5)
    with pytest.raises(ValueError, match='unconditional'):
        inputs_for_seeds(seeds, shape, 0, class_idx=0)


def test_class_frequencies_shape_the_labels():
    seeds = range(3000)
    lab = inputs_for_seeds(seeds, [1], 3, probs=[0, 1, 3]).labels
    assert lab[:, 0].sum() == 0 and abs(lab[:, 2].mean().item() - 0.75) < 0.03
    assert (inputs_for_seeds(seeds, [1], 3, probs=[0, 0, 2]).labels.argmax(1) == 2).all()
    uniform = inputs_for_seeds(seeds, [1], 3).labels.sum(0)
    assert torch.all((uniform - 1000).abs() < 4 * math.sqrt(3000 * (1 / 3) * (2 / 3)))
    for bad in ([1, 2], [-1, 1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match='frequencies'):
            inputs_for_seeds([0], [1], 3, probs=bad)


def test_heun_noise_every_step_consumes_one_draw_per_step_like_edm():
    x = latents_for_seeds([0, 1], [1, 2, 2]) * 80.0
    sigmas = edm_sigmas(6)
    on = [0.05 <= float(t) <= 10.0 for t in sigmas[:-1]]
    assert 0 < sum(on) < 6
    for churn, every, draws in ((40.0, True, 6), (40.0, False, sum(on)), (0.0, True, 0)):
        g = torch.Generator().manual_seed(3)
        heun_sampler(GaussianDenoiser(), x, sigmas, S_churn=churn, S_min=0.05, S_max=10.0, generator=g,
                     noise_every_step=every)
        ref = torch.Generator().manual_seed(3)
        for _ in range(draws):
            torch.randn([2, 1, 2, 2], generator=ref, dtype=torch.float64)
        assert torch.equal(torch.rand([3], generator=g), torch.rand([3], generator=ref)), (churn, every)
    # Draws where gamma = 0 are discarded: the result equals the sampler that draws only where gamma > 0, fed the
    # same numbers at those steps.
    noise = [torch.randn([2, 1, 2, 2], generator=torch.Generator().manual_seed(5 + i), dtype=torch.float64)
             for i in range(6)]

    def run(every):
        calls = iter(noise if every else [n for n, o in zip(noise, on) if o])
        orig = torch.randn
        try:
            torch.randn = lambda *a, **k: next(calls)
            return heun_sampler(GaussianDenoiser(), x, sigmas, S_churn=40.0, S_min=0.05, S_max=10.0,
                                generator=torch.Generator(), noise_every_step=every)[0]
        finally:
            torch.randn = orig
    assert torch.equal(run(True), run(False))


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
    # The training streams keep their values (runs stay reproducible).
    assert (rng.PHASE_FAKE, rng.PHASE_G, rng.DROPOUT_STREAM, rng.RANK_STREAM, rng.STUDENT_INIT_STREAM,
            rng.G_INIT_STREAM) == (0, 1, 7, 1_000_003, 0xC0FFEE, 0x6E1)


def test_to_uint8_rounding_and_clipping():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    assert to_uint8(x).tolist() == [int(min(max(v * 127.5 + 128, 0), 255)) for v in x.tolist()]
    assert to_uint8(x).dtype == torch.uint8
    # float32 images are quantised as EDM/SiD do it (in float64, exact for float32 input): a value just below a
    # level boundary stays below it, where float32 arithmetic would round up onto the boundary.
    x = torch.tensor([(k + 1 - 2 ** -17) for k in range(0, 200, 7)], dtype=torch.float64)
    v = ((x - 128) / 127.5).float()
    exact = [int(min(max(a * 127.5 + 128, 0), 255)) for a in v.double().tolist()]
    assert to_uint8(v).tolist() == exact
    assert (v * 127.5 + 128).to(torch.uint8).tolist() != exact  # float32 arithmetic would differ somewhere
