"""The score identities SiD rests on, checked in a Gaussian world where every denoiser is closed-form.

Data x0 ~ N(MU_D, SD_D^2) per dimension, generator x_g = m + s z. At noise level sigma:
teacher f_phi(x_t) = E[x0 | x_t] = MU_D + SD_D^2 / (SD_D^2 + sigma^2) (x_t - MU_D) and
optimal fake  f*(x_t)   = E[x_g | x_t] = m + s^2 / (s^2 + sigma^2) (x_t - m).
"""

import math

import pytest
import torch

from sidlib.losses import sample_sid_sigma, sid_generator_loss

MU_D, SD_D = 1.0, 0.5


def posterior_mean(x_t, sigma, mean, std):
    return mean + std ** 2 / (std ** 2 + sigma ** 2) * (x_t - mean)


def _mc(m, s, n, seed, sigma=None, fake_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x_g = m + s * torch.randn(n, dtype=torch.float64, generator=g)
    if sigma is None:
        sigma = sample_sid_sigma(n, 800, generator=g).flatten().double()
    x_t = x_g + sigma * torch.randn(n, dtype=torch.float64, generator=g)
    f_phi = posterior_mean(x_t, sigma, MU_D, SD_D)
    f_star = posterior_mean(x_t, sigma, m, s) + fake_shift
    return x_g, f_phi, f_star


def _within_3se(values):
    mean = values.mean().item()
    se = values.std().item() / math.sqrt(values.numel())
    return abs(mean) <= 3 * se, mean, se


@pytest.mark.parametrize('sigma', [0.1, 1.0, None])  # None: sigma from SiD's schedule (tmax 800)
def test_score_identities_hold_by_monte_carlo(sigma):
    m, s = -0.3, 1.4
    x_g, f_phi, f_star = _mc(m, s, 200_000, seed=1, sigma=sigma)
    gap = f_phi - f_star
    # E[(f_phi - f*)^2] = E[(f_phi - f*)(f_phi - x_g)]
    ok, mean, se = _within_3se(gap ** 2 - gap * (f_phi - x_g))
    assert ok, (mean, se)
    # E[(f_phi - f*)(f* - x_g)] = 0, because f* = E[x_g | x_t] and f_phi - f* depends on x_t only.
    ok, mean, se = _within_3se(gap * (f_star - x_g))
    assert ok, (mean, se)
    # The first moment is far from zero, so the check above is not vacuous.
    assert (gap ** 2).mean().item() > 30 * (gap ** 2).std().item() / math.sqrt(gap.numel())


def test_identity_fails_for_a_wrong_fake_denoiser():
    # Power check: a fake score that is not E[x_g | x_t] breaks the orthogonality clearly.
    x_g, f_phi, f_star = _mc(-0.3, 1.4, 200_000, seed=2, sigma=1.0, fake_shift=0.1)
    ok, mean, se = _within_3se((f_phi - f_star) * (f_star - x_g))
    assert not ok and abs(mean) > 10 * se


@pytest.mark.parametrize('m0,s0', [(0.0, 1.5), (2.0, 0.1)])
def test_sid_steps_with_exact_scores_move_the_generator_to_the_data(m0, s0):
    dim, batch, steps = 4, 64, 300
    m = torch.tensor(float(m0), requires_grad=True)
    log_s = torch.tensor(math.log(s0), requires_grad=True)
    opt = torch.optim.Adam([m, log_s], lr=0.01, betas=(0.0, 0.999))
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        s = log_s.exp()
        x_g = m + s * torch.randn(batch, dim, 1, 1, generator=g)
        sigma = sample_sid_sigma(batch, 800, generator=g)
        x_t = x_g + sigma * torch.randn(batch, dim, 1, 1, generator=g)
        y_real = posterior_mean(x_t, sigma, MU_D, SD_D)
        # The fake denoiser is exact for the current generator but its parameters are frozen:
        # gradients reach (m, s) only through x_g, explicitly and via x_t.
        y_fake = posterior_mean(x_t, sigma, m.detach(), s.detach())
        loss = sid_generator_loss(x_g, y_real, y_fake, 1.2).sum(dim=(1, 2, 3)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m1, s1 = m.item(), log_s.exp().item()
    assert abs(m1 - MU_D) < 0.1 * abs(m0 - MU_D)
    assert abs(s1 - SD_D) < 0.1 * abs(s0 - SD_D)
