"""Tests for libs/dpm_solver.py, the official UniDiffuser DPM-Solver++ ("fast", order 3, time-uniform) sampler."""
from __future__ import annotations

import math

import pytest
import torch

from libs.dpm_solver import (
    N_TRAIN_STEPS,
    DiscreteVPSchedule,
    dpm_solver_sample,
    fast_orders,
    stable_diffusion_betas,
    time_grid,
)

SCHED = DiscreteVPSchedule()


# ----------------------------------------------------------------------------------------------- helpers

def _alpha_sigma(t_net: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t as [batch, 1] float64 columns for the model time t_net = 1000 t."""
    t = t_net.double() / N_TRAIN_STEPS
    return SCHED.marginal_alpha(t)[:, None], SCHED.marginal_std(t)[:, None]


class GaussianData:
    """Per-dimension data N(mu, s^2): epsilon and the probability-flow ODE solution are closed-form.

    x_t ~ N(alpha mu, v_t) with v_t = alpha^2 s^2 + sigma^2, so eps = sigma (x - alpha mu) / v_t, and the
    ODE keeps z = (x_t - alpha_t mu) / sqrt(v_t) constant along each trajectory (for any VP schedule).
    """

    def __init__(self) -> None:
        self.mu = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
        self.s = torch.tensor([0.3, 1.0, 0.05, 2.0], dtype=torch.float64)

    def eps(self, x: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
        alpha, sigma = _alpha_sigma(t_net)
        return sigma * (x - alpha * self.mu) / (alpha**2 * self.s**2 + sigma**2)

    def exact(self, x_start: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
        a0, s0 = float(SCHED.marginal_alpha(t_start)), float(SCHED.marginal_std(t_start))
        a1, s1 = float(SCHED.marginal_alpha(t_end)), float(SCHED.marginal_std(t_end))
        v0 = a0**2 * self.s**2 + s0**2
        v1 = a1**2 * self.s**2 + s1**2
        return a1 * self.mu + v1.sqrt() * (x_start - a0 * self.mu) / v0.sqrt()


def _x_start(shape=(3, 4), dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------------- schedule

def test_schedule_matches_discrete_alphas_cumprod_at_knots():
    betas = stable_diffusion_betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert math.isclose(float(betas[0]), 0.00085, rel_tol=1e-12)
    assert math.isclose(float(betas[-1]), 0.012, rel_tol=1e-12)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    knots = torch.arange(1, 1001, dtype=torch.float64) / 1000  # t_n = (n + 1) / N
    torch.testing.assert_close(SCHED.marginal_alpha(knots) ** 2, alphas_cumprod, rtol=1e-12, atol=0)
    torch.testing.assert_close(SCHED.marginal_std(knots) ** 2, 1.0 - alphas_cumprod, rtol=1e-10, atol=0)


def test_schedule_is_piecewise_linear_in_log_alpha_and_extends_linearly():
    la = 0.5 * torch.cumsum(torch.log(1.0 - stable_diffusion_betas()), dim=0)
    # midpoint between knots n=9 (t=0.010) and n=10 (t=0.011)
    assert math.isclose(float(SCHED.marginal_log_mean_coeff(0.0105)), float(0.5 * (la[9] + la[10])), rel_tol=1e-12)
    # below the first knot the first segment is extended (the official interpolation does the same)
    slope = float((la[1] - la[0]) * 1000)
    assert math.isclose(float(SCHED.marginal_log_mean_coeff(0.0005)), float(la[0]) - 0.0005 * slope, rel_tol=1e-10)


def test_schedule_identities_and_inverse_lambda():
    t = torch.linspace(1e-3, 1.0, 997, dtype=torch.float64)
    alpha, sigma, lam = SCHED.marginal_alpha(t), SCHED.marginal_std(t), SCHED.marginal_lambda(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(lam, torch.log(alpha / sigma), rtol=1e-12, atol=1e-12)
    assert bool((lam[1:] < lam[:-1]).all()), "half log-SNR must decrease with t"
    torch.testing.assert_close(SCHED.inverse_lambda(lam), t, rtol=0, atol=1e-12)
    assert SCHED.marginal_lambda(0.5).dtype == torch.float64 and SCHED.marginal_lambda(0.5).shape == ()


# ----------------------------------------------------------------------------------------------- orders

@pytest.mark.parametrize(
    "steps, expected",
    [
        (1, [1]),
        (2, [2]),
        (3, [2, 1]),
        (4, [3, 1]),
        (5, [3, 2]),
        (6, [3, 2, 1]),
        (7, [3, 3, 1]),
        (48, [3] * 15 + [2, 1]),  # steps % 3 == 0: ... 3, 2, 1
        (49, [3] * 16 + [1]),  # steps % 3 == 1: ... 3, 1
        (50, [3] * 16 + [2]),  # steps % 3 == 2: ... 3, 2 (the official 50-step default)
    ],
)
def test_fast_orders(steps, expected):
    assert fast_orders(steps) == expected


def test_fast_orders_sum_to_steps():
    for steps in range(1, 301):
        orders = fast_orders(steps)
        assert sum(orders) == steps
        assert set(orders[:-2]) <= {3}


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 8, 9, 50])
def test_number_of_model_calls_equals_steps(steps):
    calls = []

    def noise_fn(x, t_net):
        calls.append(t_net)
        return torch.zeros_like(x)

    dpm_solver_sample(noise_fn, _x_start(dtype=torch.float32), steps)
    assert len(calls) == steps


# ----------------------------------------------------------------------------------------------- model time

@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
def test_t_net_is_1000_t_on_a_uniform_grid(steps):
    seen = []

    def noise_fn(x, t_net):
        assert t_net.shape == (x.shape[0],)
        assert t_net.dtype == torch.float32
        assert bool((t_net == t_net[0]).all())
        seen.append(float(t_net[0]))
        return 0.1 * x

    dpm_solver_sample(noise_fn, _x_start(dtype=torch.float32), steps)
    assert seen[0] == 1000.0
    # one call per grid point, in order, at every grid point but the last (t_end = 1e-3)
    expected = (torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float64)[:-1] * 1000).tolist()
    assert seen == pytest.approx(expected, abs=1e-4)
    if steps > 1:
        gaps = [a - b for a, b in zip(seen, seen[1:])]
        assert gaps == pytest.approx([999.0 / steps] * (steps - 1), abs=1e-4)


def test_custom_interval_and_float64_time():
    seen = []

    def noise_fn(x, t_net):
        assert t_net.dtype == torch.float64
        seen.append(float(t_net[0]))
        return torch.zeros_like(x)

    dpm_solver_sample(noise_fn, _x_start(), 4, t_start=0.8, t_end=0.2)
    assert seen == pytest.approx([800.0, 650.0, 500.0, 350.0], abs=1e-9)
    torch.testing.assert_close(time_grid(4, 0.8, 0.2), torch.tensor([0.8, 0.65, 0.5, 0.35, 0.2], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 11])
def test_point_mass_data_is_solved_exactly(steps):
    """With x0-prediction constant the exponential integrator is exact, whatever the order or step size."""
    c = torch.tensor([0.7, -1.3, 2.0, 0.0], dtype=torch.float64)

    def noise_fn(x, t_net):
        alpha, sigma = _alpha_sigma(t_net)
        return (x - alpha * c) / sigma

    x1 = _x_start()
    out = dpm_solver_sample(noise_fn, x1, steps)
    a1, s1 = float(SCHED.marginal_alpha(1.0)), float(SCHED.marginal_std(1.0))
    a0, s0 = float(SCHED.marginal_alpha(1e-3)), float(SCHED.marginal_std(1e-3))
    exact = a0 * c + (s0 / s1) * (x1 - a1 * c)
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-11)


def test_gaussian_data_converges_at_high_order():
    """Away from t ~ 0 the time-uniform grid is fine in lambda and the error falls faster than O(h^2)."""
    data, x1, t_end = GaussianData(), _x_start(), 0.1
    exact = data.exact(x1, 1.0, t_end)
    # steps = 2 mod 3 so every run ends with the same (order-2) tail
    errs = [float((dpm_solver_sample(data.eps, x1, n, t_end=t_end) - exact).abs().max()) for n in (11, 23, 47, 95)]
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-2] < 5e-4 and errs[-1] < 1e-4, errs
    assert errs[1] / errs[2] > 4.0 and errs[2] / errs[3] > 4.0, errs  # > 2nd order when steps double


def test_gaussian_data_converges_on_the_official_interval():
    """From t=1 to t=1e-3 the last interval spans h ~ 0.5 log((1e-3 + 1/steps) / 1e-3) in lambda, so the
    official grid converges only slowly there; the error must still shrink and be small at 50 steps."""
    data, x1 = GaussianData(), _x_start()
    exact = data.exact(x1, 1.0, 1e-3)
    errs = [float((dpm_solver_sample(data.eps, x1, n) - exact).abs().max()) for n in (5, 11, 23, 50, 98)]
    assert errs == sorted(errs, reverse=True), errs
    assert errs[0] > 0.05  # 5 steps is visibly inexact: the test can tell steps apart
    assert errs[3] < 0.02 and errs[4] < 0.01, errs


# Outputs of the official thu-ml/unidiffuser `DPM_Solver(model_fn, NoiseScheduleVP('discrete', betas=<fp32 SD betas>),
# predict_x0=True, thresholding=False).sample(x, steps=steps, eps=1e-3, T=1.)` on `_GOLDEN_X` with `_golden_eps`,
# computed in float32 as released (model_fn(x, t) = _golden_eps(x, t * 1000)).
_GOLDEN = {
    1: [[9.4468575, 6.1215696, -2.9068661, -0.57859933], [-0.67859834, 10.640707, 6.0015674, -5.012486]],
    2: [[5.6730442, 6.1615758, -2.0236793, -1.0356615], [-1.4948394, 7.4127073, 6.1800103, -2.4252827]],
    3: [[4.1828384, 6.0929837, -1.9927851, -1.1023643], [-1.6099937, 6.0436954, 6.1664834, -2.7719944]],
    4: [[1.037956, 5.9443445, -1.6047342, -1.3847088], [-2.1261187, 2.4480419, 6.1782079, -2.3157461]],
    5: [[1.1173382, 5.9607353, -1.4634397, -1.6260674], [-2.4309967, 2.1629624, 6.2360654, -2.2719493]],
    6: [[1.2346514, 5.8343892, -1.504021, -1.5007293], [-2.2917609, 2.1390512, 6.1359043, -2.3495417]],
    7: [[1.2684302, 5.8355622, -1.4618565, -1.5837139], [-2.4096441, 2.1728256, 6.1535816, -2.3288865]],
    11: [[1.364514, 5.8586922, -1.3834631, -1.6811832], [-2.5377045, 2.3131511, 6.1998372, -2.3055446]],
    50: [[1.3748231, 5.8458047, -1.3972826, -1.661018], [-2.5274959, 2.3287768, 6.1938, -2.3264303]],
}


def _golden_x() -> torch.Tensor:
    return (1.5 * torch.sin(1.3 * torch.arange(8, dtype=torch.float64))).reshape(2, 4).float()


def _golden_eps(x: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
    t = (t_net / 1000.0)[:, None]
    return torch.tanh(0.8 * x + 0.3 * torch.roll(x, 1, dims=-1)) * (0.5 + t) + 0.2 * torch.cos(3.0 * t)


@pytest.mark.parametrize("steps", sorted(_GOLDEN))
def test_matches_official_sampler_outputs(steps):
    ref = torch.tensor(_GOLDEN[steps], dtype=torch.float32)
    out = dpm_solver_sample(_golden_eps, _golden_x(), steps)
    assert out.dtype == torch.float32
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-4, f"steps={steps}: max relative error {rel:.2e} vs the official sampler"


# ----------------------------------------------------------------------------------------------- dtypes, callback

@pytest.mark.parametrize(
    "dtype, out_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32),
     (torch.bfloat16, torch.float32)],
)
def test_output_dtype_is_at_least_float32(dtype, out_dtype):
    seen = []

    def noise_fn(x, t_net):
        seen.append(x.dtype)
        return torch.tanh(x)

    x = _x_start(shape=(2, 3, 5), dtype=dtype)
    out = dpm_solver_sample(noise_fn, x, 4)
    assert out.dtype == out_dtype and out.shape == x.shape
    assert set(seen) == {out_dtype}
    assert bool(torch.isfinite(out).all())


def test_callback_reports_progress():
    events = []
    out = dpm_solver_sample(lambda x, t: torch.tanh(x), _x_start(), 8, callback=lambda n, t, x: events.append((n, t, x)))
    assert [n for n, _, _ in events] == [3, 6, 8]
    grid = time_grid(8).tolist()
    assert [t for _, t, _ in events] == [grid[3], grid[6], grid[8]]
    assert events[-1][1] == pytest.approx(1e-3)
    assert events[-1][2] is out


def test_does_not_track_gradients():
    w = torch.tensor(0.5, requires_grad=True)
    out = dpm_solver_sample(lambda x, t: w * x, _x_start(), 3)
    assert not out.requires_grad


# ----------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("steps", [0, -1, -50])
def test_steps_below_one_is_rejected(steps):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        dpm_solver_sample(lambda x, t: x, _x_start(), steps)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fast_orders(steps)


@pytest.mark.parametrize("steps", [2.0, "10", True, None])
def test_non_integer_steps_is_rejected(steps):
    with pytest.raises(TypeError, match="steps must be an int"):
        dpm_solver_sample(lambda x, t: x, _x_start(), steps)


@pytest.mark.parametrize("t_start, t_end", [(1.0, 1.0), (0.5, 0.6), (1.0, 0.0), (1.0, -0.1), (1.5, 0.1), (1.0, 1e-6)])
def test_bad_interval_is_rejected(t_start, t_end):
    with pytest.raises(ValueError, match="t_end"):
        dpm_solver_sample(lambda x, t: x, _x_start(), 5, t_start=t_start, t_end=t_end)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="batch"):
        dpm_solver_sample(lambda x, t: x, torch.tensor(1.0), 5)
    with pytest.raises(TypeError, match="floating"):
        dpm_solver_sample(lambda x, t: x, torch.ones(2, 3, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="noise_fn returned shape"):
        dpm_solver_sample(lambda x, t: x[:, :1], _x_start(), 5)
    with pytest.raises(ValueError, match="betas"):
        DiscreteVPSchedule(torch.tensor([0.1, 1.5]))
