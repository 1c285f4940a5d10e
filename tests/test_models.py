"""The two pretrained models (Algorithm 1, lines 2-3) learn what they should, the imagined step and the
termination functions do what MOPO / Gymnasium do, and the artifacts round-trip and refuse mismatches."""

import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ilq_jax as ilq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
f32 = partial(jnp.asarray, dtype=jnp.float32)

# ------------------------------------------------------------------------------------------------------------------
# Dynamics ensemble on a known linear-Gaussian system
# ------------------------------------------------------------------------------------------------------------------

OBS, ACT = 3, 2
A_SYS = np.array([[0.1, -0.2, 0.0], [0.0, 0.3, 0.1], [-0.1, 0.0, 0.2]])
B_SYS = np.array([[0.5, 0.0, -0.3], [0.0, 0.4, 0.2]])
C_SYS, D_SYS = np.array([0.3, -0.2, 0.1]), np.array([0.5, -0.5])
SIGMA = np.array([0.05, 0.1, 0.2, 0.1])  # true noise std of [s' - s (3 dims), r]
FLOOR = float(np.mean(SIGMA**2))  # MSE of the true conditional mean: no model can do better


def true_mean(s, a):
    """E[s' - s, r | s, a] of  s' = s + A s + B a + eps,  r = c.s + d.a + eps_r."""
    return np.concatenate([s @ A_SYS.T + a @ B_SYS, (s @ C_SYS + a @ D_SYS)[:, None]], -1)


def linear_gaussian(n, seed=0):
    rng = np.random.default_rng(seed)
    s, a = rng.normal(size=(n, OBS)), rng.uniform(-1, 1, size=(n, ACT))
    y = true_mean(s, a) + rng.normal(size=(n, OBS + 1)) * SIGMA
    return ilq.Transitions(f32(s), f32(a), f32(y[:, -1]), f32(s + y[:, :OBS]), f32(np.zeros(n)))


@pytest.fixture(scope="module")
def fitted():
    data = linear_gaussian(4000)
    model, metrics = ilq.train_dynamics(
        data, "hopper", members=4, elites=2, hidden=32, layers=4, epochs=40, lr=3e-3, seed=0, batch_size=128
    )
    return data, model, metrics


def holdout_split(n, seed=0):
    """train_dynamics' documented split: a seeded permutation, holdout = the first min(20%, 1000)."""
    return np.random.default_rng(seed).permutation(n)[: min(int(0.2 * n), 1000)]


def test_ensemble_fits_a_linear_gaussian_system_to_its_noise_floor(fitted):
    data, model, metrics = fitted
    # holdout MSE at the noise floor of those very holdout transitions (the true mean's MSE on them)
    hold = holdout_split(4000)
    s, a = np.asarray(data.observations)[hold], np.asarray(data.actions)[hold]
    y = np.concatenate([np.asarray(data.next_observations)[hold] - s, np.asarray(data.rewards)[hold, None]], -1)
    floor_here = float(np.mean((y - true_mean(s, a)) ** 2))
    assert 0.8 * FLOOR < floor_here < 1.2 * FLOOR
    assert metrics["holdout_mse_elites"] < 1.15 * floor_here, (metrics["holdout_mse_elites"], floor_here)
    # on fresh states: the learned mean is the true mean (error far below the noise) and sigma the true sigma
    rng = np.random.default_rng(123)
    s, a = rng.normal(size=(3000, OBS)), rng.uniform(-1, 1, size=(3000, ACT))
    mean, logvar = model.net.apply(model.params, (f32(np.concatenate([s, a], -1)) - model.input_mean) / model.input_std)
    func_err = np.mean((np.asarray(mean) - true_mean(s, a)[None]) ** 2, (1, 2))  # per member
    assert np.all(func_err < 0.15 * FLOOR), func_err / FLOOR
    sigma = np.asarray(jnp.exp(0.5 * logvar)).mean(1)  # (members, out): average predicted std per dimension
    for e in np.asarray(model.elites):
        np.testing.assert_allclose(sigma[e], SIGMA, rtol=0.2, err_msg=f"elite member {e}")


def test_elites_are_the_members_with_the_lowest_holdout_error(fitted):
    data, model, metrics = fitted
    # recompute each member's holdout MSE from the returned model, independently of train_dynamics
    hold = holdout_split(4000)
    x = jnp.concatenate([data.observations, data.actions], -1)[hold]
    y = jnp.concatenate([data.next_observations - data.observations, data.rewards[:, None]], -1)[hold]
    mean, _ = model.net.apply(model.params, (x - model.input_mean) / model.input_std)
    mse = np.asarray(jnp.mean((mean - y) ** 2, (1, 2)))
    np.testing.assert_allclose(mse, metrics["holdout_mse"], rtol=1e-4)
    elites = np.asarray(model.elites)
    assert elites.tolist() == metrics["elites"] and len(elites) == 2
    others = np.setdiff1d(np.arange(4), elites)
    assert mse[elites].max() < mse[others].min()  # exactly the two lowest
    assert len(set(np.round(mse, 7))) == 4  # members differ (own bootstraps and inits): the choice means something
    np.testing.assert_allclose(metrics["holdout_mse_elites"], mse[elites].mean(), rtol=1e-4)
    # the scaler is fitted on the training split only
    train = np.setdiff1d(np.arange(4000), hold)
    xs = np.concatenate([np.asarray(data.observations), np.asarray(data.actions)], -1)[train]
    np.testing.assert_allclose(np.asarray(model.input_mean), xs.mean(0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.input_std), xs.std(0), rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# The imagined step
# ------------------------------------------------------------------------------------------------------------------

H_OBS, H_ACT, MEMBERS, N_STEP = 11, 3, 4, 2000  # hopper-sized, so the hopper termination function applies
STEP = jax.jit(ilq.dynamics_step)  # as the learner calls it: inside jit (one compile for all these models)


def ensemble_params(net, in_dim, seed=0):
    """Parameters of a DynamicsEnsemble drawn like its initialisers, without compiling net.init (slow on CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, in_dim)))

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return f32(rng.normal(size=leaf.shape) / (2.0 * np.sqrt(leaf.shape[1])))
        return f32(np.full(leaf.shape, {"bias": 0.0, "max_logvar": 0.5, "min_logvar": -10.0}[name]))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_model(elites=(1, 3), hidden=8, seed=0):
    rng = np.random.default_rng(seed + 100)
    net = ilq.DynamicsEnsemble(H_OBS + 1, MEMBERS, hidden, 4)
    return ilq.DynamicsModel(
        ensemble_params(net, H_OBS + H_ACT, seed),
        f32(rng.normal(size=H_OBS + H_ACT)),
        f32(0.5 + np.abs(rng.normal(size=H_OBS + H_ACT))),
        jnp.asarray(elites, jnp.int32),
        H_OBS,
        MEMBERS,
        hidden,
        4,
        "hopper",
    )


def planted_model():
    """Member i predicts s' - s = (0, 0, i, 0, ...) (member 3 also drops the height by 1) and r = 10 i, with a tiny
    variance: every imagined transition tells which member made it, and member 3's transitions fall over."""
    model = random_model()
    p = jax.tree_util.tree_map(lambda x: x, model.params)  # a copy to edit
    last = p["params"]["EnsembleDense_4"]
    out = H_OBS + 1
    bias = np.zeros(last["bias"].shape, np.float32)
    bias[:, 0, 2] = np.arange(MEMBERS)
    bias[3, 0, 0] = -1.0
    bias[:, 0, H_OBS] = 10.0 * np.arange(MEMBERS)
    bias[:, 0, out:] = -30.0  # log-variance, softly bounded below by min_logvar = -10: std ~ 0.007
    last["kernel"], last["bias"] = jnp.zeros_like(last["kernel"]), jnp.asarray(bias)
    return model.replace(params=p)


def test_dynamics_step_samples_a_random_elite_per_transition():
    model, n = planted_model(), N_STEP
    obs = jnp.zeros((n, H_OBS)).at[:, 0].set(1.25)
    act = jnp.zeros((n, H_ACT))
    nxt, r, penalty, done = STEP(model, obs, act, jax.random.PRNGKey(3))
    assert nxt.shape == (n, H_OBS) and r.shape == penalty.shape == done.shape == (n,) and done.dtype == jnp.bool_
    member = np.rint(np.asarray(r) / 10.0).astype(int)
    np.testing.assert_allclose(np.asarray(r), 10.0 * member, atol=0.05)  # sampled around the member's mean
    np.testing.assert_allclose(np.asarray(nxt[:, 2]), member, atol=0.05)  # s' = s + delta, same member
    counts = np.bincount(member, minlength=MEMBERS)
    assert counts[0] == counts[2] == 0  # non-elites are never sampled
    assert 0.45 * n < counts[1] < 0.55 * n and 0.45 * n < counts[3] < 0.55 * n  # uniform over the elites
    assert np.std(np.asarray(nxt[:, 1])) > 1e-3  # a draw from N(mean, sigma^2), not the mean
    # done = the hopper termination of s': exactly member 3's transitions (height 0.25) end
    np.testing.assert_array_equal(np.asarray(done), member == 3)
    np.testing.assert_array_equal(np.asarray(done), np.asarray(ilq.terminated("hopper", nxt)))
    # the same key gives the same transitions, another key other members
    np.testing.assert_array_equal(np.asarray(STEP(model, obs, act, jax.random.PRNGKey(3))[1]), np.asarray(r))
    r2 = np.asarray(STEP(model, obs, act, jax.random.PRNGKey(4))[1])
    assert 0.4 < np.mean(np.rint(r2 / 10.0).astype(int) != member) < 0.6


def test_dynamics_penalty_is_the_max_sigma_norm_over_all_members():
    model = random_model(seed=1)
    # make non-elite member 0 the most uncertain, so an elites-only max would give a different number
    p = jax.tree_util.tree_map(lambda x: x, model.params)
    b = np.asarray(p["params"]["EnsembleDense_4"]["bias"]).copy()
    b[0, 0, H_OBS + 1 :] += 1.5
    p["params"]["EnsembleDense_4"]["bias"] = jnp.asarray(b)
    model = model.replace(params=p)
    obs = jax.random.normal(jax.random.PRNGKey(5), (N_STEP, H_OBS)).at[:, 0].add(1.25)
    act = jax.random.uniform(jax.random.PRNGKey(6), (N_STEP, H_ACT), minval=-1, maxval=1)
    _, _, penalty, _ = STEP(model, obs, act, jax.random.PRNGKey(0))
    # each member as its own one-member network on hand-standardised inputs
    x = (np.concatenate([obs, act], -1) - np.asarray(model.input_mean)) / np.asarray(model.input_std)
    one = jax.jit(ilq.DynamicsEnsemble(H_OBS + 1, 1, model.hidden, 4).apply)
    norms = []
    for e in range(MEMBERS):
        pe = jax.tree_util.tree_map(lambda v: v[e : e + 1] if v.ndim == 3 else v, model.params)
        _, logvar = one(pe, f32(x))
        norms.append(np.sqrt(np.sum(np.exp(np.asarray(logvar[0], np.float64)), -1)))  # ||sigma||_2, sigma^2 = e^logvar
    norms = np.stack(norms)
    np.testing.assert_allclose(np.asarray(penalty), norms.max(0), rtol=1e-5)
    assert np.all(norms.argmax(0) == 0) and np.all(norms[[1, 3]].max(0) < 0.9 * norms.max(0))


# ------------------------------------------------------------------------------------------------------------------
# Termination functions on hand-made states (Gymnasium v5 healthy ranges; MOPO's functions)
# ------------------------------------------------------------------------------------------------------------------


def states(dim, rows, base=None):
    out = np.zeros((len(rows), dim), np.float32)
    for i, entries in enumerate(rows):
        if base:
            out[i, list(base)] = list(base.values())
        for j, v in entries.items():
            out[i, j] = v
    return jnp.asarray(out)


def done_of(family, dim, cases, base=None):
    s = states(dim, [c for c, _ in cases], base)
    np.testing.assert_array_equal(
        np.asarray(ilq.terminated(family, s)), [d for _, d in cases], err_msg=f"{family}: {[c for c, _ in cases]}"
    )


def test_hopper_termination_matches_gymnasium_hopper_v5():
    # Hopper-v5: z = obs[0] in (0.7, inf), angle = obs[1] in (-0.2, 0.2), state_vector[2:] = obs[1:] in (-100, 100)
    done_of(
        "hopper",
        11,
        [
            ({}, False),
            ({0: 0.71}, False),
            ({0: 0.7}, True),
            ({0: 0.69}, True),
            ({0: 5.0}, False),
            ({1: 0.19}, False),
            ({1: -0.19}, False),
            ({1: 0.2}, True),
            ({1: 0.21}, True),
            ({1: -0.21}, True),
            ({5: 99.0}, False),
            ({5: 100.0}, True),
            ({5: 150.0}, True),
            ({10: -99.0}, False),
            # -150 must fall too: the common port computes abs(obs < 100), a boolean, and lets it through
            ({5: -150.0}, True),
            ({10: -100.5}, True),
            ({0: np.nan}, True),
            ({3: np.inf}, True),
            ({0: np.inf}, True),
        ],
        base={0: 1.25},
    )


def test_walker2d_termination_matches_gymnasium_walker2d_v5():
    # Walker2d-v5: z = obs[0] in (0.8, 2.0), angle = obs[1] in (-1, 1); no state range
    done_of(
        "walker2d",
        17,
        [
            ({}, False),
            ({0: 0.81}, False),
            ({0: 0.8}, True),
            ({0: 0.79}, True),
            ({0: 1.99}, False),
            ({0: 2.0}, True),
            ({0: 2.01}, True),
            ({1: 0.99}, False),
            ({1: -0.99}, False),
            ({1: 1.0}, True),
            ({1: -1.0}, True),
            ({1: 1.01}, True),
            ({8: 500.0}, False),
            ({8: -500.0}, False),
            ({4: np.nan}, True),
        ],
        base={0: 1.25},
    )


def test_halfcheetah_pointmaze_and_unknown_never_terminate():
    rng = np.random.default_rng(0)
    for family, dim in (("halfcheetah", 17), ("maze2d", 6), ("none", 5)):
        s = f32(rng.normal(size=(256, dim)) * 10.0)
        assert not np.asarray(ilq.terminated(family, s)).any(), family
        assert bool(ilq.terminated(family, s.at[7, 1].set(jnp.nan))[7])  # a non-finite state can never bootstrap
    # pointmaze: even far outside the maze; halfcheetah (documented): only a blown-up imagined state, |obs| >= 100
    assert not np.asarray(ilq.terminated("maze2d", states(6, [{0: 1e6}, {1: -1e6}, {}]))).any()
    done_of("halfcheetah", 17, [({1: 3.0, 8: 99.0}, False), ({8: -99.0}, False), ({8: 150.0}, True), ({0: -150.0}, True)])


def test_pen_termination_is_the_dropped_pen():
    # D4RL pen: obs[24:27] is the pen position (after 24 hand joints); done when its height < 0.075
    done_of(
        "pen",
        45,
        [
            ({}, False),
            ({26: 0.076}, False),
            ({26: 0.075}, False),
            ({26: 0.07}, True),
            ({26: -1.0}, True),
            ({32: 0.0}, False),
            ({24: -5.0, 25: 5.0}, False),
            ({3: np.nan}, True),
        ],
        base={26: 0.2},
    )


def test_termination_is_batched_over_any_leading_shape():
    s = states(11, [{0: 1.25}, {0: 0.5}, {0: 1.25, 1: 0.3}])
    batched = jnp.stack([s, s[::-1]])  # (2, 3, 11)
    out = np.asarray(jax.jit(partial(ilq.terminated, "hopper"))(batched))
    np.testing.assert_array_equal(out, [[False, True, True], [True, True, False]])


# ------------------------------------------------------------------------------------------------------------------
# Diffusion behaviour model on a bimodal action distribution
# ------------------------------------------------------------------------------------------------------------------

MODE = 0.7


class ExactEps(nn.Module):
    """The Bayes-optimal noise prediction E[xi | a^k] for actions +-MODE (1-D, equally likely): the best any
    epsilon-network can do, so it shows what the sampler itself can reach."""

    k: int

    @nn.compact
    def __call__(self, x, t, obs):
        sch = ilq.vp_schedule(self.k)
        a, s = sch["sqrt_ac"][t][:, None], sch["sqrt_one_minus_ac"][t][:, None]
        x0 = MODE * jnp.tanh(a * MODE * x / s**2)  # posterior mean of a^0 given a^k
        return (x - a * x0) / s


@flax.struct.dataclass
class ExactBehavior(ilq.BehaviorModel):
    @property
    def net(self):
        return ExactEps(self.K)


def mode_stats(samples):
    a = np.asarray(samples).ravel()
    return np.mean(a > 0.35), np.mean(a < -0.35), np.mean(np.abs(a) < 0.35)


@pytest.fixture(scope="module")
def bimodal():
    rng = np.random.default_rng(0)
    n = 4096
    obs = rng.normal(size=(n, 3))
    act = MODE * rng.choice([-1.0, 1.0], size=(n, 1))  # every state: -0.7 or +0.7, equally likely
    data = ilq.Transitions(f32(obs), f32(act), jnp.zeros(n), f32(obs), jnp.zeros(n))
    models = {
        k: ilq.train_diffusion(data, K=k, hidden=64, steps=steps, lr=1e-3, seed=0)[0] for k, steps in ((5, 3000), (20, 2000))
    }
    return data, models


def numpy_reverse_chain(eps_fn, k, n, seed=0):
    """Diffusion-QL's sampler (Eq. 6-7 as its code has them) written out in numpy from the formulas: VP betas, x0 from
    eps clipped to [-1, 1], DDPM posterior mean and variance, no noise at the last step, final clip."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, k + 1)
    alphas = np.exp(-0.1 / k - 0.5 * (10.0 - 0.1) * (2 * t - 1) / k**2)
    betas, ac = 1.0 - alphas, np.cumprod(alphas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    x = rng.normal(size=n)
    for i in reversed(range(k)):
        x0 = np.clip((x - np.sqrt(1.0 - ac[i]) * eps_fn(x, i)) / np.sqrt(ac[i]), -1.0, 1.0)
        mean = (betas[i] * np.sqrt(ac_prev[i]) * x0 + (1.0 - ac_prev[i]) * np.sqrt(alphas[i]) * x) / (1.0 - ac[i])
        x = mean + (i > 0) * np.sqrt(betas[i] * (1.0 - ac_prev[i]) / (1.0 - ac[i])) * rng.normal(size=n)
    return np.clip(x, -1.0, 1.0)


def exact_eps_numpy(k):
    sch = {name: np.asarray(v, np.float64) for name, v in ilq.vp_schedule(k).items()}

    def eps(x, i):
        a, s = sch["sqrt_ac"][i], sch["sqrt_one_minus_ac"][i]
        return (x - a * MODE * np.tanh(a * MODE * x / s**2)) / s

    return eps


def test_one_exp_mish_equals_jax_mish_in_value_and_gradient():
    """The noise network's cheaper Mish (one exp) is jax.nn.mish: same values and gradients, also in both tails."""
    x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 2001), jnp.array([-80.0, 19.99, 20.0, 20.01, 80.0])])
    np.testing.assert_allclose(ilq.mish_one_exp(x), jax.nn.mish(x), rtol=1e-5, atol=1e-6)
    grad = lambda f: jax.vmap(jax.grad(f))(x)
    np.testing.assert_allclose(grad(ilq.mish_one_exp), grad(jax.nn.mish), rtol=1e-4, atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(grad(ilq.mish_one_exp))))


def test_sampler_matches_an_independent_numpy_chain():
    """diffusion_sample against the formulas, for a zero noise-network (x0 clipping decides everything) and for
    the exact noise of the bimodal actions: same distributions (two-sample Kolmogorov-Smirnov distance)."""
    np.testing.assert_allclose(np.asarray(ilq.vp_schedule(5)["betas"]), [0.196, 0.459, 0.636, 0.755, 0.835], atol=2e-3)
    n_obs, m = 100, 200
    obs = jnp.zeros((n_obs, 3))
    net = ilq.NoiseNet(1, 16)
    zero = ilq.BehaviorModel(
        jax.tree_util.tree_map(
            lambda leaf: jnp.zeros(leaf.shape, leaf.dtype),
            jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 1)), jnp.zeros(1, jnp.int32), obs[:1]),
        ),
        1,
        5,
        16,
    )
    grid = np.linspace(-1, 1, 401)
    for beh, eps_fn in ((zero, lambda x, i: np.zeros_like(x)), (ExactBehavior({}, 1, 5, 0), exact_eps_numpy(5))):
        ours = np.asarray(ilq.diffusion_sample(beh, obs, jax.random.PRNGKey(2), m)).ravel()
        ref = numpy_reverse_chain(eps_fn, 5, n_obs * m)
        cdf = lambda v: np.searchsorted(np.sort(v), grid, side="right") / len(v)  # noqa: E731
        ks = np.abs(cdf(ours) - cdf(ref)).max()
        assert ks < 0.03, (type(beh).__name__, ks)


def test_sampler_with_the_exact_noise_reproduces_the_mixture():
    """With the true epsilon and fine steps the reverse chain (Diffusion-QL's) lands on the two actions exactly."""
    obs = jnp.zeros((50, 3))
    a = np.asarray(ilq.diffusion_sample(ExactBehavior({}, 1, 50, 0), obs, jax.random.PRNGKey(0), 200))
    assert a.shape == (50, 200, 1)
    assert np.mean(np.abs(np.abs(a) - MODE) < 0.03) > 0.99
    assert 0.45 < np.mean(a > 0) < 0.55


def test_diffusion_learns_both_modes_and_nothing_between(bimodal):
    data, models = bimodal
    samples = np.asarray(ilq.diffusion_sample(models[20], data.observations[:200], jax.random.PRNGKey(1), 50))
    assert samples.shape == (200, 50, 1) and np.all(np.abs(samples) <= 1.0)
    pos, neg, between = mode_stats(samples)
    assert 0.3 < pos < 0.7 and 0.3 < neg < 0.7, (pos, neg)
    assert between < 0.05, between
    assert np.mean(np.abs(np.abs(samples) - MODE) < 0.15) > 0.9  # and on the modes, not merely off the middle


def test_diffusion_with_the_papers_k5_is_as_good_as_the_exact_noise_allows(bimodal):
    """K = 5 (the paper's) cannot separate +-0.7 sharply: each of its 5 coarse reverse steps is one Gaussian where the
    true reverse kernel is bimodal, and the last returns E[a^0 | a^1] itself, so even the exact epsilon puts ~21% of
    the samples at |a| < 0.35. The learned model must match that optimum (it cannot beat it)."""
    data, models = bimodal
    obs = data.observations[:200]
    learned = np.asarray(ilq.diffusion_sample(models[5], obs, jax.random.PRNGKey(1), 50))
    exact = np.asarray(ilq.diffusion_sample(ExactBehavior({}, 1, 5, 0), obs, jax.random.PRNGKey(1), 50))
    assert np.all(np.abs(learned) <= 1.0)
    (pos, neg, between), (_, _, between_exact) = mode_stats(learned), mode_stats(exact)
    assert 0.3 < pos < 0.7 and 0.3 < neg < 0.7, (pos, neg)
    assert 0.15 < between_exact < 0.28  # the sampler's own limit at K = 5 (0.212 measured on 40 000 samples)
    assert between < between_exact + 0.05, (between, between_exact)
    # the whole histogram, not only the middle: total variation distance to the exact-noise sampler's
    bins = np.linspace(-1, 1, 11)
    tv = 0.5 * np.abs(np.histogram(learned, bins)[0] - np.histogram(exact, bins)[0]).sum() / learned.size
    assert tv < 0.08, tv


def test_diffusion_sample_is_usable_inside_another_jit(bimodal):
    data, models = bimodal
    beh, obs = models[5], data.observations[:16]

    @partial(jax.jit, static_argnames="m")
    def limit(beh, obs, key, m):  # as in the ILB target: static M, traced model, states and key
        return ilq.diffusion_sample(beh, obs, key, m).max(1)

    out = limit(beh, obs, jax.random.PRNGKey(0), m=3)
    eager = ilq.diffusion_sample(beh, obs, jax.random.PRNGKey(0), 3).max(1)
    assert out.shape == (16, 1) and limit(beh, obs, jax.random.PRNGKey(0), m=10).shape == (16, 1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(eager), atol=1e-5)
    assert not np.array_equal(
        np.asarray(limit(beh, obs, jax.random.PRNGKey(1), m=10)), np.asarray(limit(beh, obs, jax.random.PRNGKey(0), m=10))
    )


# ------------------------------------------------------------------------------------------------------------------
# Artifacts: save -> load, the sidecar, the cache, refusals
# ------------------------------------------------------------------------------------------------------------------


def tiny_problem(model_dir, **kw):
    data = linear_gaussian(600)
    arrays = {k: np.asarray(v) for k, v in data._asdict().items()}
    info = ilq.DatasetInfo(
        name="tests/linear-v0",
        source="test",
        task=None,
        family="hopper",
        eval_env=ilq.EvalEnv("none", None),
        ref_min=None,
        ref_max=None,
        obs_dim=OBS,
        act_dim=ACT,
        episode_returns=np.zeros(1),
        fingerprint=ilq._fingerprint(arrays),
    )
    args = ilq.Args(
        model_dir=str(model_dir),
        dynamics_members=3,
        dynamics_elites=2,
        dynamics_hidden=16,
        dynamics_epochs=2,
        diffusion_steps=30,
        **kw,
    )
    return data, info, args


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """One load_or_pretrain() run that trains both models into a fresh cache."""
    model_dir = tmp_path_factory.mktemp("cache") / "models"
    data, info, args = tiny_problem(model_dir)
    (dyn, _, _), (beh, _, _) = ilq.load_or_pretrain(args, data, info)
    return data, info, args, dyn, beh


def copy_cache(cached, tmp_path):
    data, info, args, dyn, beh = cached
    shutil.copytree(args.model_dir, tmp_path / "models")
    args = ilq.Args(**{**args.__dict__, "model_dir": str(tmp_path / "models")})
    return data, info, args, ilq.artifact_path(args, info, "dynamics"), ilq.artifact_path(args, info, "behavior")


def test_artifacts_round_trip_to_bit_identical_predictions(cached):
    data, info, args, dyn, beh = cached
    dyn2, _ = ilq.load_artifact(ilq.artifact_path(args, info, "dynamics"), "dynamics", info)
    beh2, _ = ilq.load_artifact(ilq.artifact_path(args, info, "behavior"), "behavior", info)
    for a, b in zip(jax.tree_util.tree_leaves((dyn, beh)), jax.tree_util.tree_leaves((dyn2, beh2))):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert (dyn2.obs_dim, dyn2.members, dyn2.hidden, dyn2.layers, dyn2.family) == (OBS, 3, 16, 4, "hopper")
    assert (beh2.act_dim, beh2.K, beh2.hidden) == (ACT, 5, 256)
    key, sample = jax.random.PRNGKey(0), jax.jit(ilq.diffusion_sample, static_argnums=3)
    for a, b in zip(STEP(dyn, data.observations, data.actions, key), STEP(dyn2, data.observations, data.actions, key)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(sample(beh, data.observations, key, 4)), np.asarray(sample(beh2, data.observations, key, 4))
    )


def test_sidecar_describes_the_model_without_loading_it(cached):
    data, info, args, dyn, beh = cached
    side = json.loads(Path(os.path.splitext(ilq.artifact_path(args, info, "dynamics"))[0] + ".json").read_text())
    bside = json.loads(Path(os.path.splitext(ilq.artifact_path(args, info, "behavior"))[0] + ".json").read_text())
    for s, kind in ((side, "dynamics"), (bside, "behavior")):
        assert s["kind"] == kind and s["config"]["seed"] == args.pretrain_seed
        assert s["dataset"] == dict(name=info.name, fingerprint=info.fingerprint, obs_dim=OBS, act_dim=ACT, transitions=600)
        assert {"python", "jax", "jaxlib", "flax", "optax", "numpy"} <= set(s["versions"])
        assert s["versions"]["jax"] == jax.__version__ and s["family"] == "hopper" and s["created"]
    # architecture, training length, scaler stats, elites, final metrics
    assert side["config"] == dict(members=3, elites=2, hidden=16, layers=4, lr=args.dynamics_lr, seed=0)
    assert side["trained"] == 2 and bside["trained"] == 30
    np.testing.assert_allclose(side["input_mean"], np.asarray(dyn.input_mean), rtol=1e-6)
    np.testing.assert_allclose(side["input_std"], np.asarray(dyn.input_std), rtol=1e-6)
    assert side["elites"] == np.asarray(dyn.elites).tolist() == side["metrics"]["elites"]
    assert len(side["metrics"]["holdout_mse"]) == 3 and np.isfinite(side["metrics"]["holdout_mse_elites"])
    # the diffusion sidecar: K, width, the full schedule, the final loss
    assert bside["config"] == dict(K=5, hidden=256, lr=args.diffusion_lr, seed=0)
    sch = ilq.vp_schedule(5)
    assert set(bside["schedule"]) == set(sch)
    for name, v in sch.items():
        np.testing.assert_allclose(bside["schedule"][name], np.asarray(v), rtol=1e-6)
    np.testing.assert_allclose(bside["schedule"]["betas"], [0.196, 0.459, 0.636, 0.755, 0.835], atol=2e-3)
    assert np.isfinite(bside["metrics"]["final_loss"])


def test_a_second_call_reuses_the_cache_without_training(cached, monkeypatch, capsys):
    data, info, args, dyn, beh = cached
    monkeypatch.setattr(ilq, "train_dynamics", lambda *a, **k: pytest.fail("retrained the dynamics model"))
    monkeypatch.setattr(ilq, "train_diffusion", lambda *a, **k: pytest.fail("retrained the behaviour model"))
    capsys.readouterr()
    t0 = time.time()
    (dyn2, _, _), (beh2, _, _) = ilq.load_or_pretrain(args, data, info)
    assert time.time() - t0 < 5  # no training: two loads
    out = capsys.readouterr().out
    assert out.count("loaded") == 2 and "training" not in out
    for a, b in zip(jax.tree_util.tree_leaves((dyn, beh)), jax.tree_util.tree_leaves((dyn2, beh2))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # asking for fewer epochs / steps than cached is also served from the cache
    ilq.load_or_pretrain(ilq.Args(**{**args.__dict__, "dynamics_epochs": 1, "diffusion_steps": 10}), data, info)


def fake_trainers(monkeypatch, cached):
    """Stand-ins that record their calls and return the cached models (no compile, no training)."""
    _, _, _, dyn, beh = cached
    calls = []
    monkeypatch.setattr(
        ilq,
        "train_dynamics",
        lambda *a, **k: (
            calls.append(("dynamics", k["epochs"]))
            or (dyn, dict(train_loss=0.0, holdout_mse=[0.0] * 3, holdout_mse_elites=0.0, elites=[0, 1]))
        ),
    )
    monkeypatch.setattr(
        ilq, "train_diffusion", lambda *a, **k: calls.append(("behavior", k["steps"])) or (beh, dict(final_loss=0.0))
    )
    return calls


def test_the_cache_is_retrained_when_too_short_damaged_or_forced(cached, tmp_path, monkeypatch):
    data, info, args, d_path, b_path = copy_cache(cached, tmp_path)
    calls = fake_trainers(monkeypatch, cached)
    ilq.load_or_pretrain(ilq.Args(**{**args.__dict__, "dynamics_epochs": 3}), data, info)
    assert calls == [("dynamics", 3)]  # trained for 2 epochs, 3 asked: only the dynamics model is retrained
    assert json.loads(Path(os.path.splitext(d_path)[0] + ".json").read_text())["trained"] == 3
    calls.clear()
    blob = Path(b_path).read_bytes()
    Path(b_path).write_bytes(blob[: len(blob) // 2])  # a truncated cache entry is retrained, not fatal
    ilq.load_or_pretrain(args, data, info)
    assert calls == [("behavior", 30)]
    calls.clear()
    Path(os.path.splitext(d_path)[0] + ".json").write_text("{ not json")  # so is a damaged sidecar
    ilq.load_or_pretrain(args, data, info)
    assert calls == [("dynamics", 2)]
    calls.clear()
    ilq.load_or_pretrain(args, data, info, force=True)
    assert calls == [("dynamics", 2), ("behavior", 30)]


def test_mismatched_or_damaged_artifacts_are_refused(cached, tmp_path):
    data, info, args, d_path, b_path = copy_cache(cached, tmp_path)
    replace = lambda **kw: ilq.DatasetInfo(**{**info.__dict__, **kw})  # noqa: E731
    fp = info.fingerprint[:12]
    with pytest.raises(
        ilq.ILQError,
        match=rf"made for dataset 'tests/linear-v0' \(obs 3, act 2, fingerprint {fp}\), "
        r"not for 'other' .*pretrain_models.py --env-id other",
    ):
        ilq.load_artifact(d_path, "dynamics", replace(name="other", fingerprint="0" * 40))
    with pytest.raises(ilq.ILQError, match=r"not for 'tests/linear-v0' \(obs 4, act 2"):
        ilq.load_artifact(d_path, "dynamics", replace(obs_dim=OBS + 1))
    with pytest.raises(ilq.ILQError, match=r"not for 'tests/linear-v0' \(obs 3, act 1"):
        ilq.load_artifact(b_path, "behavior", replace(act_dim=ACT - 1))
    with pytest.raises(ilq.ILQError, match="holds a dynamics model, not a behavior model"):
        ilq.load_artifact(d_path, "behavior", info)
    with pytest.raises(ilq.ILQError, match="holds a behavior model, not a dynamics model"):
        ilq.load_artifact(b_path, "dynamics", info)
    with pytest.raises(ilq.ILQError, match="No behavior model at .*nothing.msgpack"):
        ilq.load_artifact(str(tmp_path / "nothing.msgpack"), "behavior", info)
    # weights of another architecture under a sidecar that matches the dataset
    net = ilq.DynamicsEnsemble(OBS + 1, 3, 8, 4)
    other = ilq.DynamicsModel(
        ensemble_params(net, OBS + ACT),
        jnp.zeros(OBS + ACT),
        jnp.ones(OBS + ACT),
        jnp.zeros(2, jnp.int32),
        OBS,
        3,
        8,
        4,
        "hopper",
    )
    blob = Path(d_path).read_bytes()
    Path(d_path).write_bytes(flax.serialization.to_bytes(other))
    with pytest.raises(ilq.ILQError, match="does not match its sidecar's architecture or is damaged"):
        ilq.load_artifact(d_path, "dynamics", info)
    Path(d_path).write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ilq.ILQError, match="damaged.*pretrain again"):
        ilq.load_artifact(d_path, "dynamics", info)
    Path(d_path).write_bytes(blob)
    b_side = Path(os.path.splitext(b_path)[0] + ".json")
    for damaged in ('{"kind": "behav', "[1]", json.dumps(dict(json.loads(b_side.read_text()), trained="30"))):
        b_side.write_text(damaged)
        with pytest.raises(ilq.ILQError, match="sidecar"):
            ilq.load_artifact(b_path, "behavior", info)
    # given explicitly (--dynamics-path), a wrong artifact stops the run instead of being retrained silently
    with pytest.raises(ilq.ILQError, match="made for dataset"):
        ilq.load_or_pretrain(ilq.Args(**{**args.__dict__, "dynamics_path": d_path}), data, replace(fingerprint="0" * 40))


# ------------------------------------------------------------------------------------------------------------------
# pretrain_models.py
# ------------------------------------------------------------------------------------------------------------------


def write_d4rl_file(path, n=800, seed=0):
    """A tiny D4RL-format hopper file (random numbers, healthy heights), written here."""
    import h5py

    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 11)).astype(np.float32) * 0.1
    obs[:, 0] += 1.25
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["next_observations"] = obs + rng.normal(size=(n, 11)).astype(np.float32) * 0.01
        f["actions"] = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"] = np.arange(n) % 200 == 199
        f["timeouts"] = np.zeros(n, bool)


def test_pretrain_models_cli_trains_both_then_reuses_them(tmp_path):
    write_d4rl_file(tmp_path / "tiny.hdf5")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "pretrain_models.py"),
        "--env-id",
        "hopper-medium-replay",
        "--dataset-path",
        str(tmp_path / "tiny.hdf5"),
        "--dynamics-epochs",
        "1",
        "--diffusion-steps",
        "40",
        "--dynamics-hidden",
        "16",
        "--dynamics-members",
        "3",
        "--dynamics-elites",
        "2",
        "--model-dir",
        str(tmp_path / "models"),
    ]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[models] dynamics: training (1 epochs)" in first.stdout and "[dynamics] epoch 1/1 |" in first.stdout
    assert "[models] behavior: training (40 steps)" in first.stdout and "[diffusion] step 40/40 |" in first.stdout
    (folder,) = list((tmp_path / "models").iterdir())
    assert folder.name.startswith("hopper-medium-replay-")
    files = sorted(os.listdir(folder))
    assert [f.split("-")[0] + os.path.splitext(f)[1] for f in files] == [
        "behavior.json",
        "behavior.msgpack",
        "dynamics.json",
        "dynamics.msgpack",
    ]
    side = json.loads((folder / [f for f in files if f.startswith("dynamics") and f.endswith(".json")][0]).read_text())
    assert side["dataset"]["obs_dim"] == 11 and side["dataset"]["act_dim"] == 3 and side["trained"] == 1
    assert side["config"]["members"] == 3 and side["family"] == "hopper"
    mtimes = {f: os.stat(folder / f).st_mtime_ns for f in files}
    assert any(d.startswith("pretrain__") for d in os.listdir(tmp_path / "runs"))  # TensorBoard logs

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("loaded") == 2 and "training" not in second.stdout, second.stdout
    assert {f: os.stat(folder / f).st_mtime_ns for f in os.listdir(folder)} == mtimes  # nothing rewritten


# ------------------------------------------------------------------------------------------------------------------
# Progress during pretraining
# ------------------------------------------------------------------------------------------------------------------


def test_pretraining_prints_progress_between_calls_with_time_left(monkeypatch, capsys):
    """Part I's trainers report through a plain callback(done, total, metrics); Part III's PretrainProgress prints a
    line (done, rate, time left) whenever PROGRESS_EVERY_S (30 s) has passed since the last one, the dynamics inside
    an epoch too (large datasets take minutes per epoch), every epoch's losses, and keeps the curves."""
    assert ilq.PROGRESS_EVERY_S == 30.0
    monkeypatch.setattr(ilq, "PROGRESS_EVERY_S", 0.0)  # every jitted call is 30 s long, as far as the trainers know
    monkeypatch.setattr(ilq, "DYNAMICS_BATCHES_PER_CALL", 2)
    data = linear_gaussian(1500)  # 1200 training transitions: 9 minibatches of 128, 5 calls per epoch
    heard, curves = [], []
    progress = ilq.PretrainProgress("dynamics", curves=curves)
    callback = lambda *a: heard.append(a) or progress(*a)  # noqa: E731
    ilq.train_dynamics(data, "hopper", members=2, elites=1, hidden=8, epochs=2, batch_size=128, callback=callback)
    assert [(d, t) for d, t, m in heard] == [
        (2, 18),
        (4, 18),
        (6, 18),
        (8, 18),
        (9, 18),
        (11, 18),
        (13, 18),
        (15, 18),
        (17, 18),
        (18, 18),
    ]
    assert [m.get("epoch") for _, _, m in heard] == [None] * 4 + [1] + [None] * 4 + [2]
    out = capsys.readouterr().out
    inside = [line for line in out.splitlines() if line.startswith("[dynamics] minibatch")]
    assert len(inside) == 2 * 4 and inside[0].startswith("[dynamics] minibatch 2/18 |"), out
    assert all("minibatches/s | time left" in line for line in inside)
    assert [line.split("|")[0] for line in out.splitlines() if "train loss" in line] == [
        "[dynamics] epoch 1/2 ",
        "[dynamics] epoch 2/2 ",
    ]
    assert {tag for tag, _, step in curves} == {
        "dynamics/train_loss",
        "dynamics/holdout_mse_elites",
        "dynamics/holdout_mse_member_0",
        "dynamics/holdout_mse_member_1",
    }
    assert sorted({step for _, _, step in curves}) == [1, 2]
    ilq.train_diffusion(data, hidden=16, steps=40, steps_per_call=10, batch_size=32, callback=ilq.PretrainProgress("behavior"))
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[diffusion]")]
    assert [line.split("|")[0].split()[-1] for line in steps] == ["10/40", "20/40", "30/40", "40/40"]
    assert all("steps/s | time left" in line and "| loss " in line for line in steps)
