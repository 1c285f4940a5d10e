"""The core of ILQ against references that do not reuse the code under test.

1. The fused ILB target (Eq. 17-20) on fixtures where a known share of the imagined transitions continues, so
   the bootstrap gamma * min_j Q_target_j(s_img, a_img) (Eq. 19) and its termination mask are compared. The
   reference recomputes in numpy (float64) the tanh-Gaussian sample and log-probability (from the actor's mean and
   log-std), the twin critics, the dynamics ensemble, the termination functions and the diffusion reverse chain
   with each behaviour sample paired with its own state. Only the random draws are shared: they are re-derived
   from the documented key splits (exact up to float32 rounding).
2. The actor and temperature update (Eq. 21): the loss with the ONLINE critics, the direction of the actor and
   alpha steps, the target entropy -|A|, and the log-probability against a numerical tanh-Gaussian density.
5. The behaviour bank: rows belong to their states for sizes that are not multiples of the chunk, the compiled
   update reads bank[idx] of its own minibatch, and one tiny end-to-end run with --behavior-bank.
8. The JAX target meets the theory: on a finite MDP (one-hot states, discrete actions embedded in [-1, 1]) the
   iteration of the project's own `ilb_targets`, with the critics replaced by a table, converges to the fixed
   point of the exact ILB operator of benchmarks/tabular_ilb.py, the OOD cap y_lmt + delta included.
"""

import math
import os
from dataclasses import dataclass
from functools import partial

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_training_cli, tiny_config, with_params

import ilq_jax as ilq
from benchmarks.tabular_ilb import TabularMDP, ilb_fixed_point, limitation_value, one_step_backup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBS, ACT, B, N_OOD, M = 5, 2, 16, 2, 4
f64 = partial(np.asarray, dtype=np.float64)


# ==================================================================================================================
# Independent numpy references (float64)
# ==================================================================================================================


def np_dense(p, x):
    return x @ f64(p["kernel"]) + f64(p["bias"])


def np_twin_q(params, s, a):
    """Both critics of a TwinCritic (params with a leading axis of 2) as plain ReLU MLPs: (2, N)."""
    layers = params["params"]
    n_layers = len(layers)
    out = []
    for j in (0, 1):
        h = np.concatenate([f64(s), f64(a)], -1)
        for i in range(n_layers):
            p = {k: v[j] for k, v in layers[f"Dense_{i}"].items()}
            h = np_dense(p, h)
            if i < n_layers - 1:
                h = np.maximum(h, 0.0)
        out.append(h[..., 0])
    return np.stack(out)


def np_tanh_gaussian(mean, log_std, noise):
    """a = tanh(u), u = mean + std * noise, and log pi(a) = sum_d [log N(u; mean, std) - log(1 - tanh(u)^2)],
    with log(1 - tanh(u)^2) = 2 log 2 - 2 log(e^u + e^-u) (exact, and finite for any u)."""
    mean, log_std, noise = f64(mean), f64(log_std), f64(noise)
    u = mean + np.exp(log_std) * noise
    log_normal = -0.5 * noise**2 - log_std - 0.5 * np.log(2 * np.pi)
    log_jac = 2 * np.log(2.0) - 2 * np.logaddexp(u, -u)
    return np.tanh(u), np.sum(log_normal - log_jac, -1)


APPLY = {}


def jitted_apply(module):
    """module.apply, compiled once per module (eager flax costs seconds on a busy 2-core CPU)."""
    if module not in APPLY:
        APPLY[module] = jax.jit(module.apply)
    return APPLY[module]


def np_policy_sample(cfg, actor_params, obs, key):
    """pi's sample for `key`: the actor's outputs from cfg.actor.apply, the draw N(0, I) from `key` (the draw
    sample_action makes), everything else in numpy."""
    mean, log_std = jitted_apply(cfg.actor)(actor_params, jnp.asarray(obs, jnp.float32))
    noise = jax.random.normal(key, mean.shape)
    return np_tanh_gaussian(mean, log_std, noise)


def swish(x):
    return x / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def np_terminated(family, s):
    """Gymnasium v5 healthy ranges (MOPO's termination functions), typed here; a non-finite state ends."""
    finite = np.all(np.isfinite(s), -1)
    if family == "hopper":
        healthy = (s[:, 0] > 0.7) & (np.abs(s[:, 1]) < 0.2) & np.all(np.abs(s[:, 1:]) < 100, -1)
    elif family == "halfcheetah":
        healthy = np.all(np.abs(s) < 100, -1)
    else:
        raise ValueError(family)
    return ~(finite & healthy)


def np_dynamics_step(dyn, s, a, key):
    """One imagined step of the MOPO ensemble in numpy: standardised input, swish MLP per member, soft log-variance
    bounds; a random elite per row (the draw randint(k_member)) and N(0, I) noise (normal(k_noise))."""
    p = dyn.params["params"]
    x = (np.concatenate([f64(s), f64(a)], -1) - f64(dyn.input_mean)) / f64(dyn.input_std)
    h = np.broadcast_to(x, (dyn.members,) + x.shape)
    for i in range(dyn.layers):
        layer = p[f"EnsembleDense_{i}"]
        h = swish(np.einsum("eni,eio->eno", h, f64(layer["kernel"])) + f64(layer["bias"]))
    last = p[f"EnsembleDense_{dyn.layers}"]
    out = np.einsum("eni,eio->eno", h, f64(last["kernel"])) + f64(last["bias"])
    d = s.shape[1] + 1
    mean, logvar = out[..., :d], out[..., d:]
    hi, lo = f64(p["max_logvar"]), f64(p["min_logvar"])
    logvar = hi - softplus(hi - logvar)
    logvar = lo + softplus(logvar - lo)
    std = np.exp(0.5 * logvar)
    n = s.shape[0]
    k_member, k_noise = jax.random.split(key)
    member = np.asarray(dyn.elites)[np.asarray(jax.random.randint(k_member, (n,), 0, dyn.elites.shape[0]))]
    eps = f64(jax.random.normal(k_noise, (n, d)))
    sample = mean[member, np.arange(n)] + std[member, np.arange(n)] * eps
    penalty = np.sqrt((std**2).sum(-1)).max(0)  # max over ALL members of ||sigma||_2
    s_next = f64(s) + sample[:, :-1]
    return s_next, sample[:, -1], penalty, np_terminated(dyn.family, s_next)


def mish(x):
    return x * np.tanh(softplus(x))


def np_noise_net(params, x, t, obs, t_dim=16):
    """Diffusion-QL's epsilon network in numpy: sinusoidal time embedding -> 2-layer Mish MLP; then
    [x, embedding, s] -> 3 Mish layers -> epsilon."""
    p = params["params"]
    half = t_dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    emb = np.full((x.shape[0], 1), float(t)) * freqs[None]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], -1)
    emb = np_dense(p["Dense_0"], mish(np_dense(p["Dense_1"], emb)))
    h = np.concatenate([x, emb, obs], -1)
    for name in ("Dense_2", "Dense_3", "Dense_4"):
        h = mish(np_dense(p[name], h))
    return np_dense(p["Dense_5"], h)


def np_diffusion_samples(beh, obs, key, m):
    """(N, M, act) behaviour samples, sample (i, m) conditioned on state i: the reverse chain of Diffusion-QL
    (VP schedule, x0 clipped to [-1, 1], DDPM posterior, no noise at the last step) written from the formulas.
    Draws: k_init, k_chain = split(key); x_K = normal(k_init, (N*M, act)) with row i*M + m for sample (i, m);
    step keys split(k_chain, K), the i-th for the i-th reverse step."""
    k = beh.K
    t = np.arange(1, k + 1)
    alphas = np.exp(-0.1 / k - 0.5 * (10.0 - 0.1) * (2 * t - 1) / k**2)
    betas, ac = 1.0 - alphas, np.cumprod(alphas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    k_init, k_chain = jax.random.split(key)
    n, act = obs.shape[0], beh.act_dim
    x0_noise = f64(jax.random.normal(k_init, (n * m, act))).reshape(n, m, act)
    step_keys = jax.random.split(k_chain, k)
    step_noise = [f64(jax.random.normal(step_keys[i], (n * m, act))).reshape(n, m, act) for i in range(k)]
    out = np.zeros((n, m, act))
    for i in range(n):  # one state at a time: its own M chains see only its own s
        x = x0_noise[i]
        s = np.repeat(f64(obs)[i : i + 1], m, axis=0)
        for step, tt in enumerate(range(k - 1, -1, -1)):
            eps = np_noise_net(beh.params, x, tt, s)
            x0 = np.clip((x - np.sqrt(1 - ac[tt]) * eps) / np.sqrt(ac[tt]), -1.0, 1.0)
            mean = (betas[tt] * np.sqrt(ac_prev[tt]) * x0 + (1 - ac_prev[tt]) * np.sqrt(alphas[tt]) * x) / (1 - ac[tt])
            var = betas[tt] * (1 - ac_prev[tt]) / (1 - ac[tt])
            x = mean + (tt > 0) * np.sqrt(var) * step_noise[step][i]
        out[i] = np.clip(x, -1.0, 1.0)
    return out


def reference_targets(cfg, state, frozen, batch, key, k_beh):
    """Eq. 17-20 in numpy; the behaviour samples from k_beh. OOD row i*N + k belongs to dataset state i (its k-th OOD
    action)."""
    k_next, k_ood, k_img, k_img_next = jax.random.split(key, 4)
    T = state.critic.target_params
    s, r, d, s2 = (f64(x) for x in (batch.observations, batch.rewards, batch.terminals, batch.next_observations))
    alpha = float(np.exp(state.alpha.params["log_alpha"])) if (cfg.entropy and cfg.target_entropy_bonus) else 0.0
    n = cfg.num_ood_actions
    out = {}

    a2, logp2 = np_policy_sample(cfg, state.actor.params, s2, k_next)
    out["y_in"] = r + cfg.gamma * (1 - d) * (np_twin_q(T, s2, a2).min(0) - alpha * logp2)

    s_ood = np.repeat(s, n, axis=0)
    a_ood, _ = np_policy_sample(cfg, state.actor.params, s_ood, k_ood)
    out["s_ood"], out["a_ood"] = s_ood, a_ood
    # Eq. 19 with the code's own OOD action (float32) as input: compared separately above (a_ood)
    s_img, r_img, pen, done = np_dynamics_step(frozen.dynamics, s_ood, a_ood, k_img)
    a_img, logp_img = np_policy_sample(cfg, state.actor.params, s_img, k_img_next)
    boot = np_twin_q(T, s_img, a_img).min(0) - alpha * logp_img
    out["y_img"] = r_img - cfg.penalty_coef * pen + cfg.gamma * np.where(done, 0.0, boot)
    out["done_img"], out["boot_img"], out["logp_img"] = done, boot, logp_img

    a_beh = np_diffusion_samples(frozen.behavior, s, k_beh, cfg.num_behavior_samples)
    per_state = np.array(
        [np_twin_q(T, np.repeat(s[i : i + 1], cfg.num_behavior_samples, 0), a_beh[i]).max(1).min() for i in range(len(s))]
    )  # per critic the max over the M samples at s_i, then the min
    out["y_lmt"] = np.repeat(per_state, n)
    out["a_beh"] = a_beh
    out["y_ood"] = np.minimum(out["y_img"], out["y_lmt"]) + cfg.delta  # delta after the min (Eq. 18)
    return out


# ==================================================================================================================
# Fixtures: random networks; a dynamics model whose imagined states continue for the healthy dataset states
# ==================================================================================================================


def draw_params(init, *shapes_of_inputs, seed=0, kernel_scale=1.0):
    """Parameters with the structure `init` gives, drawn in numpy (kernels N(0, 1/fan_in), biases N(0, 0.1^2)):
    no compiled or eager flax init, which costs seconds per network on a 2-core CPU."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *(jnp.zeros(s, t) for s, t in shapes_of_inputs))

    def leaf(path, x):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(kernel_scale * rng.normal(size=x.shape) / np.sqrt(x.shape[-2]), jnp.float32)
        if name in ("max_logvar", "min_logvar"):
            return jnp.full(x.shape, 0.5 if name == "max_logvar" else -10.0, jnp.float32)
        return jnp.asarray(0.1 * rng.normal(size=x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def train_state(cfg, actor_params, critic_params, target_params, log_alpha):
    state = ilq.init_train_state(cfg, jax.random.PRNGKey(0))  # its Adam states: fresh, as for these parameters
    return with_params(state, actor=actor_params, critic=critic_params, target=target_params, log_alpha=log_alpha)


def make_setup(seed=0, family="hopper", **overrides):
    cfg = tiny_config(
        OBS, ACT, **{**dict(batch_size=B, num_behavior_samples=M, num_ood_actions=N_OOD, hidden_dim=16), **overrides}
    )
    rng = np.random.default_rng(seed)
    f32 = jnp.float32
    # Dynamics: random swish layers; a small output layer (|s' - s| ~ 0.05) and sigma ~ 0.03, so an imagined state
    # stays healthy exactly when its dataset state is (height 1.25 vs 0.4, angle within +-0.05).
    params = draw_params(ilq.DynamicsEnsemble(OBS + 1, 3, 16, 4).init, ((1, OBS + ACT), f32), seed=seed)
    last = params["params"]["EnsembleDense_4"]
    bias = np.zeros(last["bias"].shape, np.float32)
    bias[:, 0, OBS] = rng.normal(size=3)  # reward offsets per member
    bias[..., OBS + 1 :] = -7.0  # log-variance
    params["params"]["EnsembleDense_4"] = dict(kernel=last["kernel"] * 0.1, bias=jnp.asarray(bias))
    dyn = ilq.DynamicsModel(
        params,
        jnp.asarray(rng.normal(size=OBS + ACT), f32),
        jnp.asarray(0.5 + np.abs(rng.normal(size=OBS + ACT)), f32),
        jnp.array([0, 2], jnp.int32),
        OBS,
        3,
        16,
        4,
        family,
    )
    beh = ilq.BehaviorModel(
        draw_params(ilq.NoiseNet(ACT, 32).init, ((1, ACT), f32), ((1,), jnp.int32), ((1, OBS), f32), seed=seed + 1), ACT, 5, 32
    )
    n = 48
    obs = rng.normal(size=(n, OBS))
    obs[:, 0] = np.where(rng.random(n) < 0.6, 1.25, 0.4)  # healthy (hopper) or fallen
    obs[:, 1] = rng.uniform(-0.05, 0.05, n)
    if family == "halfcheetah":  # it never falls; a blown-up state (|obs| >= 100) ends the imagined rollout
        obs[:, 3] = np.where(obs[:, 0] < 1, 150.0, obs[:, 3])
    data = ilq.Transitions(
        jnp.asarray(obs, f32),
        jnp.asarray(rng.uniform(-1, 1, (n, ACT)), f32),
        jnp.asarray(rng.normal(size=n), f32),
        jnp.asarray(rng.normal(size=(n, OBS)), f32),
        jnp.asarray(np.arange(n) % 3 == 0, f32),
    )
    actor = draw_params(cfg.actor.init, ((1, OBS), f32), seed=seed + 2)
    critic = draw_params(cfg.critic.init, ((1, OBS), f32), ((1, ACT), f32), seed=seed + 3)
    # targets differ from the online critics, their two heads differ by an offset, and alpha != 1
    tgt = jax.tree_util.tree_map(lambda p: p + jnp.asarray(0.3 * rng.normal(size=p.shape), f32), critic)
    last = tgt["params"][f"Dense_{cfg.num_hidden}"]
    tgt["params"][f"Dense_{cfg.num_hidden}"] = dict(last, bias=last["bias"] + jnp.array([[3.0], [3.5]]))
    state = train_state(cfg, actor, critic, tgt, -0.7)
    batch = jax.tree_util.tree_map(lambda x: x[:B], data)
    return cfg, state, ilq.Frozen(data, dyn, beh), batch


FUSED = {}


def fused_targets(cfg, *args):
    if cfg not in FUSED:
        FUSED[cfg] = jax.jit(partial(ilq.ilb_targets, cfg))
    return FUSED[cfg](*args)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("hopper", dict()),
        ("halfcheetah", dict(target_entropy_bonus=True, num_ood_actions=1, delta=-0.5, penalty_coef=2.0)),
    ],
)
def test_fused_target_equals_independent_reference_with_continuing_imagined_transitions(family, overrides):
    """Exact (float32 vs float64): y_in, a_ood, y_img (with its bootstrap on the continuing transitions), y_lmt
    (diffusion samples paired with their own state), y_ood. Sampled: nothing beyond the shared draws."""
    cfg, state, frozen, batch = make_setup(seed=len(family), family=family, **overrides)
    key, k_beh = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
    a_beh = ilq.diffusion_sample(frozen.behavior, batch.observations, k_beh, cfg.num_behavior_samples)
    fused = fused_targets(cfg, state, frozen, batch, a_beh, key)
    ref = reference_targets(cfg, state, frozen, batch, key, k_beh)
    cont = ~ref["done_img"]
    n_rows = B * cfg.num_ood_actions
    # the bootstrap is exercised: a known share of the imagined transitions continues (neither none nor all)
    assert 0.25 * n_rows <= cont.sum() <= 0.85 * n_rows, cont.sum()
    np.testing.assert_array_equal(cont, np.repeat(np.asarray(batch.observations[:, 0]) > 1.0, cfg.num_ood_actions))
    assert np.abs(cfg.gamma * ref["boot_img"][cont]).mean() > 0.5  # a term far above the tolerance
    np.testing.assert_allclose(fused.a_ood, ref["a_ood"], atol=1e-5)
    np.testing.assert_allclose(fused.s_ood, ref["s_ood"], atol=1e-6)
    for name in ("y_in", "y_img", "y_lmt", "y_ood"):
        np.testing.assert_allclose(getattr(fused, name), ref[name], rtol=1e-5, atol=5e-5, err_msg=name)
    if cfg.target_entropy_bonus:  # alpha * log pi is inside both bootstraps: without it the reference would differ
        alpha = float(np.exp(state.alpha.params["log_alpha"]))
        assert np.abs(cfg.gamma * alpha * ref["logp_img"][cont]).max() > 0.05


def test_behaviour_samples_are_paired_with_their_own_state():
    """diffusion_sample (N, M, act) against the reference chain run one state at a time: sample (i, m) starts from
    noise row i*M + m and sees only s_i. Exact up to float32. The samples depend on the state (else the pairing
    would not be tested): state 0's chains conditioned on state 1 end elsewhere."""
    _, _, frozen, batch = make_setup(seed=3)
    key = jax.random.PRNGKey(11)
    ours = np.asarray(ilq.diffusion_sample(frozen.behavior, batch.observations, key, M))
    ref = np_diffusion_samples(frozen.behavior, f64(batch.observations), key, M)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    swapped = np_diffusion_samples(frozen.behavior, f64(batch.observations)[[1, 0]], key, M)
    assert np.abs(ref[0] - swapped[0]).max() > 1e-2


# ==================================================================================================================
# Item 2: actor and temperature (Eq. 21, SAC's alpha with target entropy -|A|)
# ==================================================================================================================


def set_actor_head(params, num_hidden, mean_bias=None, log_std=None):
    """An actor whose last layers are replaced: mean = mean_bias (kernel 0), log-std = log_std (through the
    Actor's tanh squashing into [LOG_STD_MIN, LOG_STD_MAX])."""
    p = dict(params["params"])
    if mean_bias is not None:
        d = p[f"Dense_{num_hidden}"]
        p[f"Dense_{num_hidden}"] = dict(kernel=jnp.zeros_like(d["kernel"]), bias=jnp.full_like(d["bias"], mean_bias))
    if log_std is not None:
        lo, hi = ilq.LOG_STD_MIN, ilq.LOG_STD_MAX
        raw = np.arctanh(np.clip(2 * (log_std - lo) / (hi - lo) - 1, -1 + 1e-7, 1 - 1e-7))
        d = p[f"Dense_{num_hidden + 1}"]
        p[f"Dense_{num_hidden + 1}"] = dict(kernel=jnp.zeros_like(d["kernel"]), bias=jnp.full_like(d["bias"], raw))
    return {"params": p}


ACTOR_STEP = {}


def actor_step(cfg, state, obs, key):
    if cfg not in ACTOR_STEP:
        ACTOR_STEP[cfg] = jax.jit(partial(ilq.actor_alpha_update, cfg))
    return ACTOR_STEP[cfg](state, obs, key)


def test_actor_loss_uses_the_online_critics_and_alpha_log_pi():
    """Exact: loss = mean(alpha log pi(a|s) - min_j Q_j(s, a)) with the ONLINE critics, log pi as returned; the first
    Adam step moves each actor weight by -lr * sign(dloss/dw) and log alpha by lr * sign(mean log pi - |A|)."""
    cfg, state, _, _ = make_setup(seed=5)
    obs = jnp.asarray(np.random.default_rng(1).normal(size=(64, OBS)), jnp.float32)
    key = jax.random.PRNGKey(9)
    new, (loss, logp) = actor_step(cfg, state, obs, key)
    alpha = float(np.exp(state.alpha.params["log_alpha"]))
    a, logp_ref = np_policy_sample(cfg, state.actor.params, obs, key)
    np.testing.assert_allclose(logp, logp_ref, rtol=1e-5, atol=1e-4)
    q_online = np_twin_q(state.critic.params, obs, a).min(0)
    q_target = np_twin_q(state.critic.target_params, obs, a).min(0)
    np.testing.assert_allclose(float(loss), np.mean(alpha * logp_ref - q_online), rtol=1e-5, atol=1e-5)
    assert abs(np.mean(q_online - q_target)) > 0.5  # the target critics would give another number

    # gradient direction, from a loss written here (log(1 - tanh^2) as 2 log 2 - 2 log(e^u + e^-u))
    noise = jax.random.normal(key, (obs.shape[0], ACT))

    def ref_loss(p):
        mean, log_std = cfg.actor.apply(p, obs)
        u = mean + jnp.exp(log_std) * noise
        lp = jnp.sum(-0.5 * noise**2 - log_std - 0.5 * jnp.log(2 * jnp.pi) - (2 * jnp.log(2.0) - 2 * jnp.logaddexp(u, -u)), -1)
        return jnp.mean(alpha * lp - cfg.critic.apply(state.critic.params, obs, jnp.tanh(u)).min(0))

    grads = jax.jit(jax.grad(ref_loss))(state.actor.params)
    checked = 0
    for g, w0, w1 in zip(*(jax.tree_util.tree_leaves(t) for t in (grads, state.actor.params, new.actor.params))):
        g, step = np.asarray(g), np.asarray(w1) - np.asarray(w0)
        big = np.abs(g) > 1e-4
        np.testing.assert_allclose(step[big], -cfg.actor_lr * np.sign(g[big]), rtol=1e-3)
        checked += big.sum()
    assert checked > 100
    step = new.alpha.params["log_alpha"] - state.alpha.params["log_alpha"]
    np.testing.assert_allclose(float(step), cfg.actor_lr * np.sign(np.mean(logp_ref) - ACT), rtol=1e-3)
    # the critics are not touched by the actor step
    for x, y in zip(jax.tree_util.tree_leaves(new.critic), jax.tree_util.tree_leaves(state.critic)):
        np.testing.assert_array_equal(x, y)


def planted_linear_critic(cfg, slopes):
    """Twin critic params with Q_j(s, a) = slopes[j] * sum(a) + 10 (through ReLUs that stay active, |a| <= 1)."""
    shapes = jax.eval_shape(cfg.critic.init, jax.random.PRNGKey(0), jnp.zeros((1, OBS)), jnp.zeros((1, ACT)))
    p = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)["params"]
    for j, slope in enumerate(slopes):
        p["Dense_0"]["kernel"][j, OBS:, 0] = 1.0  # h = relu(sum(a) + 3) = sum(a) + 3
        p["Dense_0"]["bias"][j, 0] = 3.0
        for i in range(1, cfg.num_hidden):
            p[f"Dense_{i}"]["kernel"][j, 0, 0] = 1.0
        p[f"Dense_{cfg.num_hidden}"]["kernel"][j, 0, 0] = slope
        p[f"Dense_{cfg.num_hidden}"]["bias"][j, 0] = 10.0 - 3.0 * slope
    return jax.tree_util.tree_map(jnp.asarray, {"params": p})


def test_actor_climbs_the_online_critic():
    """With online critics that prefer larger actions (both heads, different slopes) and target critics that prefer
    smaller ones, 40 actor steps move the deterministic action tanh(mean) up in every state and dimension."""
    cfg, state, _, _ = make_setup(seed=6, actor_lr=3e-3, entropy=False)
    state = with_params(state, critic=planted_linear_critic(cfg, (2.0, 3.0)), target=planted_linear_critic(cfg, (-3.0, -2.0)))
    obs = jnp.asarray(np.random.default_rng(2).normal(size=(32, OBS)), jnp.float32)
    before = np.asarray(ilq.deterministic_action(cfg.actor, state.actor.params, obs))
    for i in range(40):
        state, _ = actor_step(cfg, state, obs, jax.random.PRNGKey(i))
    after = np.asarray(ilq.deterministic_action(cfg.actor, state.actor.params, obs))
    assert np.all(after > before), (before.mean(), after.mean())
    assert np.mean(after - before) > 0.3, np.mean(after - before)


@pytest.mark.parametrize(
    "log_std,entropy_range,rises",
    [
        (-5.0, (-8.0, -6.0), True),  # entropy far below -|A| = -2: alpha rises
        (-2.67, (-2.7, -2.3), True),  # just below -|A|
        (-2.17, (-1.7, -1.3), False),  # just above -|A| (and below -|A|/2 and 0: another target entropy would rise)
        (0.0, (0.5, 2.0), False),  # far above
    ],
)
def test_alpha_rises_below_the_target_entropy_and_falls_above(log_std, entropy_range, rises):
    """Entropy estimated independently (numpy log pi of the same draws), then one update: exact direction, first
    Adam step of size actor_lr. Sampled: the entropy estimate (2048 states, s.e. ~0.03), asserted in range first."""
    cfg, state, _, _ = make_setup(seed=8)
    state = with_params(state, actor=set_actor_head(state.actor.params, cfg.num_hidden, 0.0, log_std))
    obs = jnp.asarray(np.random.default_rng(3).normal(size=(2048, OBS)), jnp.float32)
    key = jax.random.PRNGKey(4)
    _, logp = np_policy_sample(cfg, state.actor.params, obs, key)
    entropy = -logp.mean()
    assert entropy_range[0] < entropy < entropy_range[1], entropy
    new, (_, logp_code) = actor_step(cfg, state, obs, key)
    np.testing.assert_allclose(logp_code, logp, rtol=1e-4, atol=1e-3)
    step = float(new.alpha.params["log_alpha"] - state.alpha.params["log_alpha"])
    np.testing.assert_allclose(step, cfg.actor_lr * (1 if rises else -1), rtol=1e-3)


def normal_cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


@pytest.mark.parametrize("act_dim", [1, 2])
def test_log_probability_is_the_numerical_tanh_gaussian_density(act_dim):
    """log pi(a|s) from sample_action against the log of a finite difference of the CDF
    P(tanh(u) <= a) = Phi((atanh(a) - mean) / std) per dimension (float64). Exact up to the difference step."""
    actor = ilq.Actor(act_dim, 16, 2)
    params = draw_params(actor.init, ((1, OBS), jnp.float32), seed=act_dim)
    obs = jnp.asarray(np.random.default_rng(5).normal(size=(400, OBS)) * 2.0, jnp.float32)
    a, logp = ilq.sample_action(actor, params, obs, jax.random.PRNGKey(6))
    mean, log_std = (f64(x) for x in actor.apply(params, obs))
    a, logp = f64(a), f64(logp)
    assert np.ptp(log_std) > 0.05 and np.ptp(mean) > 0.1  # the states give different densities
    keep = np.all(np.abs(a) < 0.995, -1)  # float32 tanh cannot resolve atanh near +-1
    h = 1e-5
    cdf = lambda x: normal_cdf((np.arctanh(x) - mean) / np.exp(log_std))  # noqa: E731
    density = (cdf(np.clip(a + h, -1, 1 - 1e-12)) - cdf(np.clip(a - h, -1 + 1e-12, 1))) / (2 * h)
    numerical = np.log(density).sum(-1)
    assert keep.mean() > 0.9
    np.testing.assert_allclose(logp[keep], numerical[keep], atol=2e-3, rtol=1e-4)


# ==================================================================================================================
# Item 5: the behaviour bank
# ==================================================================================================================


def bank_action(obs):
    """The planted behaviour: a state-dependent point mass, distinct for every state."""
    return 0.9 * jnp.tanh(obs[:, :ACT] * 2.0 + obs[:, ACT : 2 * ACT])


class PointMassEps(nn.Module):
    """The exact noise prediction for a point mass at a0(s): eps = (x - sqrt(abar_k) a0(s)) / sqrt(1 - abar_k);
    the reverse chain then returns a0(s) exactly (x0 = a0(s) at every step, no noise at the last)."""

    K: int

    @nn.compact
    def __call__(self, x, t, obs):
        sch = ilq.vp_schedule(self.K)
        a, s = sch["sqrt_ac"][t][:, None], sch["sqrt_one_minus_ac"][t][:, None]
        return (x - a * bank_action(obs)) / s


@flax.struct.dataclass
class PointMassBehavior(ilq.BehaviorModel):
    @property
    def net(self):
        return PointMassEps(self.K)


@pytest.mark.parametrize("n,chunk", [(37, 8), (5, 8), (16, 8)])
def test_behavior_bank_rows_belong_to_their_states(n, chunk):
    """Exact: with a state-dependent point-mass behaviour, row i of the bank holds a0(s_i) M times, for sizes that
    are and are not multiples of the chunk."""
    obs = jnp.asarray(np.random.default_rng(n).normal(size=(n, OBS)), jnp.float32)
    bank = np.asarray(ilq.make_behavior_bank(PointMassBehavior({}, ACT, 5, 0), obs, 3, seed=0, chunk=chunk))
    assert bank.shape == (n, 3, ACT)
    expected = np.broadcast_to(np.asarray(bank_action(obs))[:, None], bank.shape)
    np.testing.assert_allclose(bank, expected, atol=1e-5)
    assert np.abs(np.diff(expected[:, 0], axis=0)).max() > 0.1  # rows differ: a shift would show


def test_behavior_bank_chunks_draw_fresh_noise():
    """Sampled: identical states in different chunks (of a random noise network) get different samples, all in
    [-1, 1]; the last, partial chunk too."""
    beh = ilq.BehaviorModel(
        draw_params(ilq.NoiseNet(ACT, 32).init, ((1, ACT), jnp.float32), ((1,), jnp.int32), ((1, OBS), jnp.float32)),
        ACT,
        5,
        32,
    )
    obs = jnp.ones((21, OBS))
    bank = np.asarray(ilq.make_behavior_bank(beh, obs, 3, seed=0, chunk=8))
    assert bank.shape == (21, 3, ACT) and np.all(np.isfinite(bank)) and np.all(np.abs(bank) <= 1)
    assert np.abs(bank[:8] - bank[8:16]).max() > 1e-3 and np.abs(bank[16:] - bank[:5]).max() > 1e-3
    assert np.abs(bank[0] - bank[1]).max() > 1e-3  # and the rows of one chunk differ


def planted_distance_critic(cfg, scale=10.0):
    """Twin critic params with Q(s, a) = -scale * |a_0 - s_0| (ReLU(a0 - s0) + ReLU(s0 - a0), passed through)."""
    shapes = jax.eval_shape(cfg.critic.init, jax.random.PRNGKey(0), jnp.zeros((1, OBS)), jnp.zeros((1, ACT)))
    p = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)["params"]
    for j in (0, 1):
        p["Dense_0"]["kernel"][j, OBS, 0], p["Dense_0"]["kernel"][j, 0, 0] = 1.0, -1.0
        p["Dense_0"]["kernel"][j, OBS, 1], p["Dense_0"]["kernel"][j, 0, 1] = -1.0, 1.0
        for i in range(1, cfg.num_hidden):
            p[f"Dense_{i}"]["kernel"][j, 0, 0] = p[f"Dense_{i}"]["kernel"][j, 1, 1] = 1.0
        p[f"Dense_{cfg.num_hidden}"]["kernel"][j, :2, 0] = -scale
    return jax.tree_util.tree_map(jnp.asarray, {"params": p})


def test_update_reads_the_bank_rows_of_its_own_minibatch():
    """The run's compiled update (make_learners_update) with a bank whose row i holds s_i's first coordinate once (at
    position i mod M, the other M-1 actions lower), a target critic Q(s, a) = -10 |a_0 - s_0| and tau = 0: y_lmt = 0
    exactly when the update pairs bank[idx] with its own minibatch and maxes over M, so the OOD target is delta."""
    n, m = 50, 4
    cfg, state, _, _ = make_setup(seed=9, imagination=False, tau=0.0, delta=0.3, num_behavior_samples=m, num_ood_actions=1)
    s0 = np.linspace(-0.9, 0.9, n)
    rng = np.random.default_rng(4)
    obs = rng.normal(size=(n, OBS))
    obs[:, 0] = s0
    bank = np.zeros((n, m, ACT), np.float32)
    bank[:, :, 0] = s0[:, None] - 0.3 - 0.1 * np.arange(m)
    bank[np.arange(n), np.arange(n) % m, 0] = s0
    bank[:, :, 1] = rng.uniform(-1, 1, (n, m))
    data = ilq.Transitions(
        *(
            jnp.asarray(x, jnp.float32)
            for x in (obs, rng.uniform(-1, 1, (n, ACT)), rng.normal(size=n), rng.normal(size=(n, OBS)), np.zeros(n))
        )
    )
    state = jax.tree_util.tree_map(lambda x: x[None], with_params(state, target=planted_distance_critic(cfg)))
    frozen = ilq.Frozen(data, None, None)
    update = ilq.make_learners_update(cfg, ("no-imagination",), sample_chunk=2)
    _, metrics = update(state, frozen, jnp.asarray(bank), jax.random.split(jax.random.PRNGKey(0), 5)[None])
    np.testing.assert_allclose(np.asarray(metrics["ilq/y_ood"][0]), np.full(5, cfg.delta), atol=1e-6)
    # a neighbouring row would cost at least 10 * 1.8 / 49 per state: the check above has teeth
    assert 10 * (s0[1] - s0[0]) > 0.3


def test_cli_behavior_bank_end_to_end(tmp_path):
    """One tiny run with --behavior-bank: the bank is built for every dataset state, summary.json is written with a
    finite score, and the normalised score is the return normalised with D4RL's hopper constants (typed here)."""
    flags = "--env-id ilq-local/hopper/random-v0 --random-dataset-steps 1000 --total-steps 20 --updates-per-call 10 "
    flags += "--eval-interval 20 --eval-episodes 1 --dynamics-epochs 1 --diffusion-steps 20 --batch-size 16 --hidden-dim 32 "
    flags += "--dynamics-hidden 32 --dynamics-members 3 --dynamics-elites 2 --num-behavior-samples 3 --behavior-bank"
    out, summary = run_training_cli(tmp_path, "bank", *flags.split())
    assert "behaviour bank: 1000 states x 3 actions" in out.stdout, out.stdout[-2000:]
    assert summary["args"]["behavior_bank"] is True
    score, ret = summary["final_normalized_score"], summary["final_return"]
    assert np.isfinite(score) and np.isfinite(ret)
    np.testing.assert_allclose(score, 100.0 * (ret - -20.272305) / (3234.3 - -20.272305), rtol=1e-9)


# ==================================================================================================================
# Item 8: the JAX target iterated on a finite MDP converges to the exact ILB fixed point (benchmarks/tabular_ilb.py)
# ==================================================================================================================

S_TAB, A_TAB, GAMMA_TAB = 5, 4, 0.9
X_TAB = np.array([-0.75, -0.25, 0.25, 0.75])  # action k of the finite MDP is the point X_TAB[k] of [-1, 1]


class TableCritic(nn.Module):
    """Twin tables Q_j(s, a) = onehot(s) . table_j[:, nearest action to a]: params {"table": (2, S, A)}."""

    @nn.compact
    def __call__(self, obs, act):
        table = self.param("table", nn.initializers.zeros, (2, S_TAB, A_TAB))
        near = jax.nn.one_hot(jnp.argmin(jnp.abs(act[:, :1] - jnp.asarray(X_TAB)[None]), -1), A_TAB)
        return jnp.einsum("ns,jsa,na->jn", obs, table, near)


@dataclass(frozen=True)
class TableConfig(ilq.ILQConfig):
    @property
    def critic(self):
        return TableCritic()


class ExactModel(nn.Module):
    """The finite MDP's model as a two-member 'ensemble' on [onehot(s), a] (no standardisation): member 0 (the only
    elite) predicts s' - s = onehot(next[s, a]) - onehot(s) and r(s, a) with sigma = 1e-9 (exact); member 1 is never
    sampled and has sigma = PEN_SIGMA in every output, so the MOPO penalty is exactly sqrt(S + 1) * PEN_SIGMA."""

    nxt: tuple
    rew: tuple

    @nn.compact
    def __call__(self, x):
        s, a = x[..., :S_TAB], x[..., S_TAB : S_TAB + 1]
        near = jax.nn.one_hot(jnp.argmin(jnp.abs(a - jnp.asarray(X_TAB)), -1), A_TAB)
        s_next = jnp.einsum("ns,na,sat->nt", s, near, jax.nn.one_hot(jnp.asarray(self.nxt), S_TAB))
        r = jnp.einsum("ns,na,sa->n", s, near, jnp.asarray(self.rew))
        mean = jnp.concatenate([s_next - s, r[:, None]], -1)
        logvar = jnp.stack([jnp.full(mean.shape, -41.4), jnp.full(mean.shape, 2 * np.log(PEN_SIGMA))])
        return jnp.stack([mean, mean]), logvar


PEN_SIGMA = 0.2


@flax.struct.dataclass
class ExactDynamics(ilq.DynamicsModel):
    nxt: tuple = flax.struct.field(pytree_node=False, default=())
    rew: tuple = flax.struct.field(pytree_node=False, default=())

    @property
    def net(self):
        return ExactModel(self.nxt, self.rew)


def finite_mdp(seed):
    """Deterministic transitions, 2 behaviour actions per state, pi(s) outside the support; OOD rewards high in some
    states (the cap y_lmt + delta binds there) and low in others (the imagined value is the min there)."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, S_TAB, (S_TAB, A_TAB))
    support = np.zeros((S_TAB, A_TAB), bool)
    pi = np.zeros(S_TAB, int)
    for s in range(S_TAB):
        acts = rng.permutation(A_TAB)
        support[s, acts[:2]] = True
        pi[s] = acts[2]
    r = rng.uniform(0, 1, (S_TAB, A_TAB))
    high = np.arange(S_TAB) % 2 == 0
    r[~support] = np.where(np.repeat(high[:, None], A_TAB, 1), 3.0 + r, -2.0 + r)[~support]
    return nxt, support, pi, r


@pytest.mark.parametrize("delta", [0.25, -0.4])
def test_iterated_jax_target_converges_to_the_exact_ilb_fixed_point(delta):
    """The finite MDP, exactly: one-hot states, actions X_TAB; the model is exact (P_hat = P deterministic, r_hat = r),
    its MOPO penalty c * sqrt(S + 1) * PEN_SIGMA enters the tabular r_hat; behaviour samples = the support of each
    state (the bank argument, M = 4: both support actions twice); pi(s) = the planted actor's action (log-std -5,
    pre-tanh sigma 0.0067, far inside the +-0.25 nearest-action cells, so a' ~ pi is exact after the lookup).
    Sampled but exact after the lookup: a' ~ pi, a_ood ~ pi, the imagined step (sigma 1e-9).
    Iterated: Q_{k+1}(s, a in supp) = y_in, Q_{k+1}(s, pi(s)) = y_ood, from Q_0 = 0, 300 times; compared with the
    ILB fixed point of benchmarks/tabular_ilb.py (reading (b), fixed pi) on these entries, which form a closed
    system (V(s') = Q(s', pi(s')), y_lmt(s) = max over the support at s)."""
    nxt, support, pi, r = finite_mdp(seed=1)
    c = 1.5
    penalty = math.sqrt(S_TAB + 1) * PEN_SIGMA
    P = np.eye(S_TAB)[nxt]
    mdp = TabularMDP(P, r, P.copy(), r - c * penalty, support, GAMMA_TAB)
    q_fix = ilb_fixed_point(mdp, delta, pi)
    y_img = one_step_backup(q_fix, mdp.P_hat, mdp.r_hat, GAMMA_TAB, pi)[np.arange(S_TAB), pi]
    y_lmt = limitation_value(q_fix, support)
    capped = y_lmt < y_img - 1e-6
    assert 0 < capped.sum() < S_TAB, (y_img, y_lmt)  # both branches of min{y_img, y_lmt} + delta are active

    cfg = TableConfig(
        obs_dim=S_TAB,
        act_dim=1,
        eta=0.5,
        delta=delta,
        penalty_coef=c,
        critic_lr=1e-3,
        actor_lr=1e-3,
        entropy=True,
        cosine_lr=False,
        total_steps=1,
        gamma=GAMMA_TAB,
        batch_size=2 * S_TAB,
        num_behavior_samples=4,
        num_ood_actions=1,
        hidden_dim=S_TAB,
        num_hidden=1,
    )
    actor_p = {
        "params": {
            "Dense_0": dict(kernel=jnp.eye(S_TAB), bias=jnp.zeros(S_TAB)),
            "Dense_1": dict(kernel=jnp.asarray(np.arctanh(X_TAB[pi])[:, None], jnp.float32), bias=jnp.zeros(1)),
            "Dense_2": dict(kernel=jnp.zeros((S_TAB, 1)), bias=jnp.full(1, -20.0)),
        }
    }
    dyn = ExactDynamics(
        {},
        jnp.zeros(S_TAB + 1),
        jnp.ones(S_TAB + 1),
        jnp.array([0], jnp.int32),
        S_TAB,
        2,
        0,
        0,
        "none",
        nxt=tuple(map(tuple, nxt.tolist())),
        rew=tuple(map(tuple, r.tolist())),
    )
    s_idx, a_idx = np.nonzero(support)  # every in-support pair once: the minibatch
    batch = ilq.Transitions(
        *(
            jnp.asarray(x, jnp.float32)
            for x in (
                np.eye(S_TAB)[s_idx],
                X_TAB[a_idx][:, None],
                r[s_idx, a_idx],
                np.eye(S_TAB)[nxt[s_idx, a_idx]],
                np.zeros(len(s_idx)),
            )
        )
    )
    beh = np.stack([X_TAB[np.nonzero(support[s])[0]] for s in s_idx])  # (B, 2): the support at each batch state
    beh = jnp.asarray(np.concatenate([beh, beh], 1)[..., None], jnp.float32)  # (B, M=4, 1)
    state = with_params(ilq.init_train_state(cfg, jax.random.PRNGKey(0)), actor=actor_p)
    targets = jax.jit(partial(ilq.ilb_targets, cfg))
    frozen = ilq.Frozen(None, dyn, None)

    q = np.zeros((S_TAB, A_TAB))
    for it in range(300):
        table = jnp.asarray(np.stack([q, q]), jnp.float32)
        st = with_params(state, target={"params": {"table": table}})
        t = targets(st, frozen, batch, beh, jax.random.PRNGKey(it))
        if it == 0:  # the sampled OOD actions are pi(s) after the lookup, in every state
            ood_a = np.argmin(np.abs(np.asarray(t.a_ood) - X_TAB[None]), -1)
            np.testing.assert_array_equal(ood_a, pi[s_idx])
        q_new = q.copy()
        q_new[s_idx, a_idx] = np.asarray(t.y_in)
        q_new[s_idx, pi[s_idx]] = np.asarray(t.y_ood)  # each state's two rows give the same OOD target
        q = q_new
    touched = support.copy()
    touched[np.arange(S_TAB), pi] = True
    assert np.abs(q_fix[touched]).max() > 1.0
    np.testing.assert_allclose(q[touched], q_fix[touched], atol=2e-4)
    # the last targets themselves: the capped states' OOD target is y_lmt + delta, the others' y_img + delta
    t_lmt, t_img = np.asarray(t.y_lmt), np.asarray(t.y_img)
    np.testing.assert_allclose(t_lmt, y_lmt[s_idx], atol=2e-4)
    np.testing.assert_allclose(t_img, y_img[s_idx], atol=2e-4)
    np.testing.assert_array_equal(t_lmt < t_img, capped[s_idx])
