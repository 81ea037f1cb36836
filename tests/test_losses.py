"""Losses, noise schedule, NaN guards, augmentation and EMA of the SiD method (tiny CPU tensors).

``SiDLoss`` (SiD's ``training/sid_loss.py``) is checked against computations written out here from the same seeds:
what it feeds the teacher and the fake score, its per-element losses, which rows it drops, and where gradients flow.
"""

import math

import numpy as np
import pytest
import torch

from sidlib.augment import AugmentPipe
from sidlib.ema import ema_beta, update_ema
from sidlib.losses import EDMLoss, finite_sample_mask, sample_sid_sigma, sid_generator_loss, sid_sigma
from sidlib.rng import derive_seed, sample_generators
from sidlib.sampling import generate_onestep
from sidlib.sid_loss import SiDLoss


class TinyDenoiser(torch.nn.Module):
    """Stand-in EDM-like denoiser: D(x; s) = c_skip(s) x + c_out(s) tanh(conv(x)) + optional augment term."""

    def __init__(self, channels=3, seed=0, augment_dim=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)
        self.aug = torch.nn.Linear(augment_dim, channels, bias=False) if augment_dim else None
        self.img_channels, self.img_resolution, self.label_dim = channels, 4, 0
        self.init_kwargs = {'augment_dim': augment_dim}
        self.seen_augment_labels = None

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        out = 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * torch.tanh(self.conv(x))
        self.seen_augment_labels = augment_labels
        if self.aug is not None and augment_labels is not None:
            out = out + self.aug(augment_labels)[:, :, None, None]
        return out


# ------------------------------------------------------------------------------------------------
# Noise schedule.

def test_sid_sigma_endpoints_for_tmax_800():
    assert sid_sigma(0.0) == pytest.approx(0.002, rel=1e-12)
    assert sid_sigma(1.0) == pytest.approx(80.0, rel=1e-12)
    assert sid_sigma(0.8) == pytest.approx(24.41, abs=0.005)
    s = sample_sid_sigma(20000, 800, generator=torch.Generator().manual_seed(0))
    assert s.shape == (20000, 1, 1, 1)
    assert s.min() >= 0.002 - 1e-9 and s.max() <= sid_sigma(0.8) + 1e-6
    # u ~ U(0, 0.8) has median 0.4, and sigma(u) is monotone.
    assert s.median().item() == pytest.approx(sid_sigma(0.4), rel=0.05)


def test_sid_sigma_matches_code_form():
    # SiD writes the schedule as sigma_max^(1/rho) + (1-u)(sigma_min^(1/rho) - sigma_max^(1/rho)).
    u = np.linspace(0, 1, 11)
    alt = (80 ** (1 / 7) + (1 - u) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sid_sigma(u), alt, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# SiD generator loss.

def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def test_sid_generator_loss_equals_formula():
    x_g, yr, yf = _rand([5, 3, 4, 4], 1), _rand([5, 3, 4, 4], 2), _rand([5, 3, 4, 4], 3)
    for alpha in (1.0, 1.2, -0.5):
        got = sid_generator_loss(x_g, yr, yf, alpha).double().numpy()
        a, b, c = x_g.double().numpy(), yr.double().numpy(), yf.double().numpy()
        w = np.maximum(1e-5, np.abs(a - b).mean(axis=(1, 2, 3), keepdims=True))
        want = (b - c) * ((b - a) - alpha * (b - c)) / w
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # The paper's form: (y_real - y_fake)(y_fake - x_g) + (1 - alpha)(y_real - y_fake)^2, per sample over w.
        alt = ((b - c) * (c - a) + (1 - alpha) * (b - c) ** 2) / w
        np.testing.assert_allclose(got, alt, rtol=1e-4, atol=1e-5)


def test_sid_generator_loss_gradients_match_hand_derivation():
    alpha = 1.2
    x_g = _rand([4, 2, 3, 3], 4).requires_grad_(True)
    yr = _rand([4, 2, 3, 3], 5).requires_grad_(True)
    yf = _rand([4, 2, 3, 3], 6).requires_grad_(True)
    g = _rand([4, 2, 3, 3], 7)  # random cotangent
    loss = sid_generator_loss(x_g, yr, yf, alpha)
    gx, gr, gf = torch.autograd.grad((loss * g).sum(), [x_g, yr, yf])
    with torch.no_grad():
        w = (x_g - yr).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)  # treated as a constant
        d = yr - yf
        e = (yr - x_g) - alpha * d
        want_x = -d / w * g
        want_r = (e + d * (1 - alpha)) / w * g
        want_f = (-e + alpha * d) / w * g
    torch.testing.assert_close(gx, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gr, want_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gf, want_f, rtol=1e-5, atol=1e-6)


def test_sid_generator_loss_normaliser_is_clamped():
    x = _rand([2, 1, 2, 2], 8)
    yf = _rand([2, 1, 2, 2], 9)
    loss = sid_generator_loss(x, x.clone(), yf, 1.0)  # |x_g - y_real| = 0 -> w = 1e-5
    want = (x - yf) * (-(x - yf)) / 1e-5
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-3)
    assert torch.isfinite(loss).all()


# ------------------------------------------------------------------------------------------------
# NaN guards.

def test_finite_sample_mask_flags_rows_with_nan_or_inf():
    a = torch.zeros(4, 2, 2, 2)
    b = torch.zeros(4, 2, 2, 2)
    a[1, 0, 0, 0] = float('nan')
    b[3, 1, 1, 1] = float('-inf')
    assert finite_sample_mask(a, None, b).tolist() == [True, False, True, False]


class NaNInside(torch.nn.Module):
    """Wraps a denoiser that produces NaN *inside* its computation (NaN fed into its layers, so NaN sits in the
    autograd graph) for the samples whose input equals one of those it saw at the given rows of its first call."""

    def __init__(self, net, rows):
        super().__init__()
        self.net, self.rows, self.marked = net, rows, None

    def forward(self, x, sigma, class_labels=None, **kw):
        if self.marked is None:
            self.marked = x.detach()[self.rows].clone()
        hit = (x.detach()[:, None] == self.marked[None]).flatten(2).all(2).any(1)
        poison = torch.where(hit, float('nan'), 0.0).reshape(-1, 1, 1, 1)
        return self.net(x + poison, sigma, class_labels, **kw)


class Recorder(torch.nn.Module):
    """Wraps a denoiser and keeps the inputs of its last call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, {}

    def forward(self, x, sigma, class_labels=None, **kw):
        self.seen = dict(x=x.detach().clone(), sigma=torch.as_tensor(sigma).detach().clone(), **kw)
        return self.net(x, sigma, class_labels, **kw)


SEED, ITERATION = 42, 3


def gens(rows, phase=1):
    """The per-sample generators the loop uses for sample indices ``rows``."""
    return sample_generators(rows, SEED, ITERATION, phase)


def own_generator(i, phase=1):
    """An independently seeded generator equal in state to ``gens([i])[0]``."""
    return torch.Generator().manual_seed(derive_seed(SEED, ITERATION, phase, i))


def test_generator_loss_draws_sigma_then_noise_from_each_sample_generator():
    G, teacher, fake = TinyDenoiser(seed=1), Recorder(TinyDenoiser(seed=2)), Recorder(TinyDenoiser(seed=3))
    z = _rand([4, 3, 4, 4], 21)
    with torch.no_grad():
        x_g = generate_onestep(G, z, 2.5)
        loss, keep = SiDLoss(alpha=1.2, tmax=800).generator_loss(teacher, fake, x_g, generator=gens(range(4)))
    assert keep.all() and loss.shape == x_g.shape and loss.dtype == torch.float32
    # Independently: per sample, u ~ U(0, 1) scaled to [0, tmax/1000] -> sigma(u), then a standard normal image.
    sigma = torch.empty(4, 1, 1, 1)
    noise = torch.empty_like(x_g)
    for i in range(4):
        g = own_generator(i)
        sigma[i] = sid_sigma(torch.rand([1, 1, 1], generator=g) * 0.8)
        noise[i] = torch.randn([3, 4, 4], generator=g)
    assert (sigma <= sid_sigma(0.8)).all() and (sigma >= 0.002).all()
    for net in (teacher, fake):
        torch.testing.assert_close(net.seen['sigma'].reshape(-1), sigma.reshape(-1), rtol=1e-6, atol=0)
        torch.testing.assert_close(net.seen['x'], x_g + sigma * noise, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        y_real, y_fake = teacher.net(x_g + sigma * noise, sigma), fake.net(x_g + sigma * noise, sigma)
    torch.testing.assert_close(loss, sid_generator_loss(x_g, y_real, y_fake, 1.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('augment', [False, True])
def test_fake_score_loss_is_edm_loss_on_the_same_draws(augment):
    fake = Recorder(TinyDenoiser(seed=4, augment_dim=9))
    fake.init_kwargs = fake.net.init_kwargs   # as an EDMPrecond built with augment_dim=9
    x_g = _rand([5, 3, 4, 4], 22)
    pipe = AugmentPipe.sid_default(0.5) if augment else None
    loss, keep = SiDLoss(augment_pipe=pipe).fake_score_loss(fake, x_g, generator=gens(range(5), phase=0))
    assert keep.all() and loss.shape == x_g.shape
    if augment:
        # Sigma, augmentation, noise: EDM's order, all from the sample's own generator.
        want = EDMLoss()(fake.net, x_g, augment_pipe=pipe,
                         generator=[own_generator(i, phase=0) for i in range(5)])
        assert fake.seen['augment_labels'].shape == (5, 9)
    else:
        sigma = torch.empty(5, 1, 1, 1)
        noise = torch.empty_like(x_g)
        for i in range(5):
            g = own_generator(i, phase=0)
            sigma[i] = (torch.randn([1, 1, 1], generator=g) * 1.2 - 1.2).exp()   # EDM's log-normal, P(-1.2, 1.2)
            noise[i] = torch.randn([3, 4, 4], generator=g)
        # Without augmentation the network still gets zero augment labels (it was built with augment_dim=9).
        assert torch.equal(fake.seen['augment_labels'], torch.zeros(5, 9))
        torch.testing.assert_close(fake.seen['x'], x_g + sigma * noise, rtol=1e-6, atol=1e-6)
        want = EDMLoss()(fake.net, x_g, sigma=sigma, noise=noise, augment_labels=torch.zeros(5, 9))
    torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-6)


def _param_grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.sum().backward()
    return [p.grad.clone() for p in module.parameters()]


def test_nan_inside_the_teacher_costs_only_its_own_rows_of_the_generator_loss():
    """SiD drops such rows after the networks ran: the NaN in the teacher's graph meets the dropped rows' zero
    gradient (0 * NaN) on the way back and poisons all of G's gradient. sidlib's result equals the clean subset's."""
    G, teacher, fake = TinyDenoiser(seed=1), TinyDenoiser(seed=2), TinyDenoiser(seed=3)
    for net in (teacher, fake):
        net.requires_grad_(False)
    z = _rand([6, 3, 4, 4], 10)
    sid = SiDLoss(alpha=1.2, tmax=800)
    loss, keep = sid.generator_loss(NaNInside(teacher, [1, 4]), fake, generate_onestep(G, z, 2.5),
                                    generator=gens(range(6)))
    assert keep.tolist() == [True, False, True, True, False, True]
    kept = [i for i in range(6) if keep[i]]
    clean, clean_keep = sid.generator_loss(teacher, fake, generate_onestep(G, z[keep], 2.5), generator=gens(kept))
    assert clean_keep.all() and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, clean)
    for a, b in zip(_param_grads(G, loss), _param_grads(G, clean)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_a_nan_generated_sample_costs_only_its_own_row_of_the_generator_loss():
    G, teacher, fake = TinyDenoiser(seed=1), TinyDenoiser(seed=2), TinyDenoiser(seed=3)
    z = _rand([5, 3, 4, 4], 11)
    sid = SiDLoss(alpha=1.2, tmax=800)
    x_g = generate_onestep(G, z, 2.5)
    x_bad = torch.cat([x_g[:2], torch.full_like(x_g[2:3], float('nan')), x_g[3:]])
    loss, keep = sid.generator_loss(teacher, fake, x_bad, generator=gens(range(5)))
    assert keep.tolist() == [True, True, False, True, True]
    kept = [0, 1, 3, 4]
    clean, _ = sid.generator_loss(teacher, fake, generate_onestep(G, z[kept], 2.5), generator=gens(kept))
    torch.testing.assert_close(loss, clean)
    for a, b in zip(_param_grads(G, loss), _param_grads(G, clean)):
        torch.testing.assert_close(a, b)


def test_nan_samples_cost_only_their_own_rows_of_the_fake_score_gradient():
    """A non-finite generated image (row 2) and a NaN produced inside the fake score (row 0): the loss and the fake
    score's parameter gradients equal those of the clean rows alone (SiD's loop zeroes nearly all of them)."""
    fake = TinyDenoiser(seed=5)
    x_g = _rand([5, 3, 4, 4], 23)
    x_g[2, 1, 0, 0] = float('inf')
    sid = SiDLoss()
    loss, keep = sid.fake_score_loss(NaNInside(fake, [0]), x_g, generator=gens(range(5), phase=0))
    assert keep.tolist() == [False, True, False, True, True]
    kept = [1, 3, 4]
    clean, _ = sid.fake_score_loss(fake, x_g[kept], generator=gens(kept, phase=0))
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, clean)
    for a, b in zip(_param_grads(fake, loss), _param_grads(fake, clean)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# Gradient paths of the generator step.

def _g_grad(G, teacher, fake, z):
    G.zero_grad(set_to_none=True)
    loss, _ = SiDLoss(alpha=1.2, tmax=800).generator_loss(teacher, fake, generate_onestep(G, z, 2.5),
                                                           generator=gens(range(z.shape[0])))
    loss.sum().backward()
    return torch.cat([p.grad.flatten() for p in G.parameters()])


class DetachInput(torch.nn.Module):
    """Feeds the wrapped net a detached input: cuts the gradient path through the net's input."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, *a, **kw):
        return self.net(x.detach(), *a, **kw)


def test_frozen_teacher_and_fake_get_no_parameter_gradients_but_pass_input_gradients():
    G, teacher, fake = TinyDenoiser(seed=1), TinyDenoiser(seed=2), TinyDenoiser(seed=3)
    teacher.requires_grad_(False)
    fake.requires_grad_(False)
    z = _rand([4, 3, 4, 4], 12)
    full = _g_grad(G, teacher, fake, z)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in fake.parameters())
    assert torch.isfinite(full).all() and full.abs().sum() > 0
    # Cutting either frozen network's input path changes G's gradient, so both paths carry gradient.
    no_teacher_path = _g_grad(G, DetachInput(teacher), fake, z)
    no_fake_path = _g_grad(G, teacher, DetachInput(fake), z)
    no_paths = _g_grad(G, DetachInput(teacher), DetachInput(fake), z)
    for other in (no_teacher_path, no_fake_path, no_paths):
        assert (full - other).abs().max() > 1e-4 * full.abs().max()
    # Linearity of the backward pass: the two input paths add up.
    torch.testing.assert_close(full - no_paths, (full - no_teacher_path) + (full - no_fake_path),
                               rtol=1e-4, atol=1e-6)


def test_fake_score_loss_has_no_graph_into_the_generator():
    G, fake = TinyDenoiser(seed=1), TinyDenoiser(seed=3)
    x_g = generate_onestep(G, _rand([3, 3, 4, 4], 24), 2.5)
    assert x_g.requires_grad
    loss, _ = SiDLoss().fake_score_loss(fake, x_g, generator=gens(range(3), phase=0))
    loss.sum().backward()
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())


# ------------------------------------------------------------------------------------------------
# EDM loss.

def test_edm_loss_equals_formula_with_given_sigma_and_noise():
    net = TinyDenoiser(seed=4)
    y, n = _rand([3, 3, 4, 4], 14), _rand([3, 3, 4, 4], 15)
    sigma = torch.tensor([0.1, 1.0, 10.0]).reshape(-1, 1, 1, 1)
    got = EDMLoss()(net, y, sigma=sigma, noise=n)
    with torch.no_grad():
        lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        want = lam * (net(y + sigma * n, sigma) - y) ** 2
    torch.testing.assert_close(got, want)


def test_edm_loss_sigma_is_lognormal():
    s = EDMLoss().sample_sigma(40000, torch.Generator().manual_seed(3))
    ln = s.log().flatten().double()
    se = 1.2 / math.sqrt(ln.numel())
    assert abs(ln.mean().item() + 1.2) < 4 * se
    assert ln.std().item() == pytest.approx(1.2, rel=0.02)


def test_edm_loss_per_sample_generators_make_rows_independent_of_batch_split():
    net = TinyDenoiser(seed=5, augment_dim=9)
    pipe = AugmentPipe.sid_default(0.5)
    y = _rand([6, 3, 4, 4], 16)
    gens = sample_generators(range(6), 123, 0)
    whole = EDMLoss()(net, y, augment_pipe=pipe, generator=gens)
    assert net.seen_augment_labels.shape == (6, 9)
    parts = torch.cat([EDMLoss()(net, y[i:i + 2], augment_pipe=pipe, generator=sample_generators(range(i, i + 2), 123, 0))
                       for i in (0, 2, 4)])
    torch.testing.assert_close(whole, parts)


# ------------------------------------------------------------------------------------------------
# Augmentation.

def test_augment_p0_is_identity_with_zero_labels():
    x = _rand([5, 3, 8, 8], 17)
    out, lab = AugmentPipe.sid_default(0.0)(x, generator=torch.Generator().manual_seed(0))
    assert lab.shape == (5, 9)
    assert torch.equal(out, x) and torch.count_nonzero(lab) == 0


def test_augment_xflip_flips_exactly_the_labelled_samples():
    x = _rand([64, 1, 4, 4], 18)
    out, lab = AugmentPipe(p=1.0, xflip=1e8)(x, generator=torch.Generator().manual_seed(1))
    flipped = lab[:, 0].bool()
    assert 10 < int(flipped.sum()) < 54  # fair coin
    assert torch.equal(out[flipped], x[flipped].flip(3))
    assert torch.equal(out[~flipped], x[~flipped])


def _blob(cx, cy, sigma, res=32):
    c = torch.arange(res, dtype=torch.float32) + 0.5 - res / 2   # centred pixel coordinates, x right, y down
    yy, xx = torch.meshgrid(c, c, indexing='ij')
    return torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))[None, None], xx, yy


def _moments(img, xx, yy):
    w = img[0, 0].clamp(min=0)
    w = w / w.sum()
    mx, my = (w * xx).sum(), (w * yy).sum()
    cov = torch.tensor([[(w * (xx - mx) ** 2).sum(), (w * (xx - mx) * (yy - my)).sum()],
                        [(w * (xx - mx) * (yy - my)).sum(), (w * (yy - my) ** 2).sum()]])
    return float(mx), float(my), cov


def _only(pipe_kwargs, u_set, g_set, x):
    """Run one transform with fixed draws (11 uniforms, 4 normals per sample; unset uniforms 0.99 = not applied)."""
    u, g = torch.full([1, 11], 0.99), torch.zeros(1, 4)
    for i, v in u_set.items():
        u[0, i] = v
    for i, v in g_set.items():
        g[0, i] = v
    import sidlib.augment as aug_mod
    real = aug_mod.rand, aug_mod.randn
    aug_mod.rand, aug_mod.randn = (lambda *a, **k: u.clone()), (lambda *a, **k: g.clone())
    try:
        return AugmentPipe(p=1, **pipe_kwargs)(x)
    finally:
        aug_mod.rand, aug_mod.randn = real


def test_augment_rotation_turns_content_as_edm_does():
    """EDM's training/augment.py: G_inv = G_inv @ rotate2d_inv(-w) = rotate2d(w), rotate2d(w) = [[cos w, -sin w],
    [sin w, cos w]] in centred pixel coordinates (x right, y down), and output pixel p shows input position
    G_inv p. A dot at d therefore lands at p = rotate2d(-w) d = [[cos w, sin w], [-sin w, cos w]] d: for
    w = pi/2 and d = (6, 0), at p = (0, -6), above the centre (counter-clockwise on screen)."""
    x, xx, yy = _blob(6.0, 0.0, 1.5)
    out, lab = _only(dict(rotate_frac=1), {5: 0.75, 6: 0.0}, {}, x)   # w = (0.75 * 2 - 1) pi = pi / 2
    torch.testing.assert_close(lab[0], torch.tensor([-1.0, 1.0]), atol=1e-6, rtol=0)   # cos w - 1, sin w
    mx, my, _ = _moments(out, xx, yy)
    assert abs(mx - 0.0) < 0.1 and abs(my + 6.0) < 0.1, (mx, my)


def test_augment_anisotropic_scaling_stretches_along_edms_axis():
    """EDM: G_inv = G_inv @ rotate2d_inv(r) @ scale2d_inv(s, 1/s) @ rotate2d_inv(-r) = rot(-r) diag(1/s, s) rot(r),
    so content moves by A = rot(-r) diag(s, 1/s) rot(r): a round blob of variance v gets covariance
    v rot(-r) diag(s^2, 1/s^2) rot(r), stretched by s along rot(-r) e_x = (cos r, -sin r). Here r = pi/4 and
    s = 2^(2.5 * 0.2) = sqrt(2): variance 2v along (1, -1)/sqrt(2) (up-right on screen), v/2 across it."""
    v = 2.0 ** 2
    x, xx, yy = _blob(0.0, 0.0, math.sqrt(v))
    # u7 = 0.625: r = (0.625 * 2 - 1) pi = pi / 4; u8 = 0: applied; u9 = 0 < 0.5: rotated axis; w = 2.5.
    out, lab = _only(dict(aniso=1), {7: 0.625, 8: 0.0, 9: 0.0}, {1: 2.5}, x)
    torch.testing.assert_close(lab[0], torch.tensor([2.5 * math.cos(math.pi / 4), 2.5 * math.sin(math.pi / 4)]))
    _, _, cov = _moments(out, xx, yy)
    evals, evecs = torch.linalg.eigh(cov)
    major = evecs[:, 1] * torch.sign(evecs[0, 1])
    torch.testing.assert_close(major, torch.tensor([1.0, -1.0]) / math.sqrt(2), atol=0.02, rtol=0)
    # The resampling filters blur by a fraction of a pixel; the blob itself is 2 px wide.
    assert abs(float(evals[1]) / (2 * v) - 1) < 0.1 and abs(float(evals[0]) / (v / 2) - 1) < 0.15, evals


def test_augment_all_on_gives_finite_labels_that_match_applied_transforms():
    x = _rand([32, 3, 8, 8], 20)
    out, lab = AugmentPipe.sid_default(1.0)(x, generator=torch.Generator().manual_seed(2))
    assert lab.shape == (32, 9) and torch.isfinite(lab).all() and torch.isfinite(out).all()
    # Rotation labels are (cos - 1, sin) of one angle.
    torch.testing.assert_close((lab[:, 3] + 1) ** 2 + lab[:, 4] ** 2, torch.ones(32), rtol=1e-5, atol=1e-5)
    # Samples with all-zero geometric labels and no flips are returned untouched.
    ident = (lab.abs().sum(1) == 0)
    assert torch.equal(out[ident], x[ident])


# ------------------------------------------------------------------------------------------------
# EMA.

def test_ema_beta_matches_half_life():
    batch, h_kimg = 256, 500
    nimg = 10 ** 9  # ramp-up inactive: 0.05 * nimg > h
    beta = ema_beta(batch, nimg, h_kimg, 0.05)
    # After h/batch updates the old weights are halved.
    assert beta ** (h_kimg * 1000 / batch) == pytest.approx(0.5, rel=1e-9)
    # Ramp-up: the effective half-life is 0.05 * images seen.
    nimg = 100_000
    assert ema_beta(batch, nimg, h_kimg, 0.05) == pytest.approx(0.5 ** (batch / (0.05 * nimg)), rel=1e-12)
    assert ema_beta(batch, 0, h_kimg, 0.05) == 0.0
    assert ema_beta(batch, 0, h_kimg, None) == pytest.approx(0.5 ** (batch / 5e5))


def test_update_ema_is_a_lerp_of_parameters():
    a, b = TinyDenoiser(seed=6), TinyDenoiser(seed=7)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    update_ema(a, b, 0.9)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * b.state_dict()[k])
    update_ema(a, b, 0.0)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
