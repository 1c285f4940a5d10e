"""ILQ — Imagination-Limited Q-Learning for offline RL, in one JAX file.

Liu, Wu, Wang, Huang, Zhou, "Imagination-Limited Q-Learning for Offline Reinforcement Learning", IJCAI 2025,
arXiv 2505.12211 (no official code). ILQ is an offline actor-critic (SAC's actor, twin critics). Dataset actions get
the usual Bellman target. Every action of the current policy is treated as out-of-sample (OOD): its target is the value
*imagined* by a learned one-step dynamics model, *limited* by the best value of the behaviour policy at the same state
(behaviour actions drawn from a diffusion model), plus a small delta. Equation numbers below are the paper's.

    python ilq_jax.py                 # offline default: a generated random-policy Hopper dataset, 5-10 min on 2 CPU cores
    python ilq_jax.py --env-id walker2d-medium-replay   # the paper's 1e6 updates on a GPU/TPU (--budget cpu|paper)
    python ilq_jax.py --methods ilq,no-imagination,no-limitation --num-seeds 5   # the paper's protocol, one program
    python ilq_jax.py --evaluate runs/NAME --eval-episodes 100   # a trained run's policies again (--capture-video)

Part I (ILQ) imports only jax, flax, optax, chex and numpy: copy the file, or this part alone. Part II runs it (flags,
settings, frozen models, train, evaluation, summary, load_policy); Part III is plumbing (data, envs, files, logs).

    paper                                           Part I
    Eq. 5     dynamics model, maximum likelihood    DynamicsEnsemble, dynamics_loss, train_dynamics; dynamics_step
    Eq. 6-7   reverse diffusion chain               NoiseNet, vp_schedule, diffusion_sample
    Eq. 8     diffusion loss                        diffusion_loss, train_diffusion
    Eq. 16    critic loss (eta-weighted)            critic_loss
    Eq. 17    in-sample target y_in                 ilb_targets
    Eq. 18    OOD target min{y_img, y_lmt} + delta  ilb_targets
    Eq. 19    imagined value y_img                  ilb_targets with dynamics_step, terminated
    Eq. 20    limitation value y_lmt                ilb_targets with diffusion_sample (in ilq_update)
    Eq. 21    actor ("vanilla SAC") and alpha       actor_alpha_update, sample_action
    Alg. 1    line 1, initialisation                init_train_state
    Alg. 1    lines 2-3, pretraining                train_dynamics, train_diffusion
    Alg. 1    lines 4-12, training                  ilq_update (one step), make_update_fn (a jitted scan of them);
                                                    Part II's make_learners_update: every (method, seed) learner
    Sec. 5.4  ablations                             METHODS: ILQ, w/o imagination, w/o limitation

Where the paper is silent or ambiguous, this file chooses (each choice is repeated at its code):

    entropy in the targets    none: Eq. 17 and 19 have no -alpha log pi term (--target-entropy-bonus adds SAC's)
    OOD actions               1 per dataset state, a ~ pi(.|s) at s, not at s' (--num-ood-actions N)
    imagined step             one step from a random elite member per transition; s' and r are *sampled* from its
                              Gaussian (not its mean); MOPO's reward penalty coef * max_i ||sigma_i||_2 over all members
    termination of y_img      MOPO's hand-written functions per robot (hopper, walker2d, halfcheetah, pen); Maze2D and
                              unknown envs never terminate; a non-finite imagined state always does
    dynamics ensemble         MOPO: 7 members, 4x200 swish, targets [s' - s, r], standardised inputs, learned log-var
                              bounds, per-layer weight decay; 5 elites = lowest MSE on a holdout of min(20 %, 1000);
                              a fixed number of epochs (Table 3's 40), no early stopping
    diffusion sampler         Diffusion-QL's: epsilon-prediction, x0 clipped to [-1, 1], DDPM *posterior* variance
                              (Eq. 7 writes beta_k), no noise at the last step, final clip; VP schedule, K = 5;
                              M = 10 fresh samples per state in every update (--behavior-bank: sampled once)
    alpha                     SAC's automatic temperature, target entropy -|A|, learning rate = the actor's; Adroit
                              (pen): entropy off read as alpha = 0 (--fixed-alpha A: fixed), both lrs cosine to 0
    done masks                (1 - terminal) in Eq. 17 with true terminations only (a time-limit truncation bootstraps)
    gradient flow             targets under stop-gradient; OOD actions detached in Eq. 16; the models stay frozen
    min / max order (Eq. 20)  per target critic the max over the same M behaviour samples at s, then min over critics
    loss averaging (Eq. 16)   each term averaged over its own set (B dataset pairs, B*N OOD pairs), then mixed by eta;
                              summed over the two critics, which regress to the same target
    hyper-parameters          Tables 3-6 where the text disagrees (eta of medium-expert, delta != 0); datasets not in
                              the tables: eta 0.9, delta 0, no penalty, learning rates (5e-4, 3e-4)
    networks                  tanh-Gaussian actor, log-std in [-5, 2]; ReLU actor and critics; no normalisation
    evaluation                deterministic tanh(mean), 10 episodes, fresh start seeds at every evaluation; the score
                              is the mean of the last 10 evaluations (never the best), std over seeds with ddof=1;
                              every 5000 updates (paper budget); where the data were recorded: D4RL locomotion on
                              Gymnasium's -v4 with the -v2 masses restored (MuJoCo 2.1.2 changed capsule inertias),
                              maze2d and pen as D4RL-faithful wrappers, Minari data in their recorded eval env
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

# ======================================================================================================================
# Part I — ILQ
# ======================================================================================================================


class Transitions(NamedTuple):
    """A dataset or minibatch on the device (float32). `terminals` is Eq. 17's done mask: true terminations only."""

    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    terminals: jax.Array


# ---------------------------------------------------------------------------------------------------- networks
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """SAC's tanh-Gaussian policy pi_phi ("vanilla SAC", Eq. 21), input-256-256-256-output (Table 3), ReLU."""

    act_dim: int
    hidden_dim: int = 256
    num_hidden: int = 3

    @nn.compact
    def __call__(self, obs):
        h = obs
        for _ in range(self.num_hidden):
            h = nn.relu(nn.Dense(self.hidden_dim)(h))
        mean = nn.Dense(self.act_dim)(h)
        log_std = nn.Dense(self.act_dim)(h)
        return mean, LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(log_std) + 1.0)


def tanh_gaussian(mean, log_std, key):
    """a = tanh(u), u ~ N(mean, std), and log pi(a|s) (the tanh change of variables, in the stable softplus form)."""
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    logp = jnp.sum(-0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), -1)
    logp -= jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), -1)
    return jnp.tanh(u), logp


def sample_action(actor: Actor, params, obs, key):
    """a ~ pi(.|s) and log pi(a|s)."""
    return tanh_gaussian(*actor.apply(params, obs), key)


def deterministic_action(actor: Actor, params, obs):
    """The evaluation action tanh(mean) (the paper does not say; SAC's usual choice)."""
    return jnp.tanh(actor.apply(params, obs)[0])


class QNetwork(nn.Module):
    hidden_dim: int = 256
    num_hidden: int = 3

    @nn.compact
    def __call__(self, obs, act):
        h = jnp.concatenate([obs, act], -1)
        for _ in range(self.num_hidden):
            h = nn.relu(nn.Dense(self.hidden_dim)(h))
        return nn.Dense(1)(h)[..., 0]


# Q_theta1 and Q_theta2 as one module: the parameters carry a leading axis of 2 and the output is (2, batch).
TwinCritic = nn.vmap(QNetwork, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0, axis_size=2)


class EnsembleDense(nn.Module):
    """A dense layer of every ensemble member at once: one batched matmul with weights (E, in, out)."""

    features: int
    members: int
    dtype: Any = jnp.float32  # of the computation (the weights are stored in float32)

    @nn.compact
    def __call__(self, x):  # (E, N, in)
        init = nn.initializers.truncated_normal(1.0 / (2.0 * math.sqrt(x.shape[-1])))
        kernel = self.param("kernel", init, (self.members, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.members, 1, self.features))
        return jnp.einsum("eni,eio->eno", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class DynamicsEnsemble(nn.Module):
    """MOPO's probabilistic ensemble T_psi(s', r | s, a) (Eq. 5): each member a swish MLP giving a diagonal Gaussian
    over [s' - s, r], its log-variance softly bounded by learned limits."""

    out_dim: int
    members: int
    hidden: int
    layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # standardised (N, in) or (E, N, in) -> mean, logvar, each (E, N, out)
        if x.ndim == 2:
            x = jnp.broadcast_to(x, (self.members,) + x.shape)
        for _ in range(self.layers):
            x = nn.swish(EnsembleDense(self.hidden, self.members, self.dtype)(x))
        mean, logvar = jnp.split(EnsembleDense(2 * self.out_dim, self.members, self.dtype)(x), 2, axis=-1)
        max_logvar = self.param("max_logvar", nn.initializers.constant(0.5), (self.out_dim,))
        min_logvar = self.param("min_logvar", nn.initializers.constant(-10.0), (self.out_dim,))
        logvar = max_logvar - jax.nn.softplus(max_logvar - logvar)
        return mean, min_logvar + jax.nn.softplus(logvar - min_logvar)


class NoiseNet(nn.Module):
    """Diffusion-QL's epsilon-network xi_omega(a^k, s, k): [noisy action, time embedding, state] -> 3x256 Mish."""

    act_dim: int
    hidden: int = 256
    t_dim: int = 16
    dtype: Any = jnp.float32  # of the computation (the weights are stored in float32)
    mish: Callable = jax.nn.mish

    @nn.compact
    def __call__(self, x, t, obs):  # t: (N,) one step per row, or (1,) one step for all rows (the sampler)
        dense = partial(nn.Dense, dtype=self.dtype)
        half = self.t_dim // 2
        emb = t.astype(jnp.float32)[:, None] * jnp.exp(-math.log(10000.0) * jnp.arange(half) / (half - 1))[None]
        emb = dense(self.t_dim)(self.mish(dense(2 * self.t_dim)(jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], -1))))
        h = jnp.concatenate([x, jnp.broadcast_to(emb, (x.shape[0], self.t_dim)).astype(x.dtype), obs], -1)
        for _ in range(3):
            h = self.mish(dense(self.hidden)(h))
        return dense(self.act_dim)(h)


# ---------------------------------------------------------------------------------------------------- Eq. 5: dynamics model
@flax.struct.dataclass
class DynamicsModel:
    params: Any
    input_mean: jax.Array
    input_std: jax.Array
    elites: jax.Array  # indices of the elite members (lowest holdout MSE)
    obs_dim: int = flax.struct.field(pytree_node=False)
    members: int = flax.struct.field(pytree_node=False)
    hidden: int = flax.struct.field(pytree_node=False)
    layers: int = flax.struct.field(pytree_node=False)
    family: str = flax.struct.field(pytree_node=False)
    dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)  # of its forward pass

    @property
    def net(self) -> DynamicsEnsemble:
        return DynamicsEnsemble(self.obs_dim + 1, self.members, self.hidden, self.layers, self.dtype)


D4RL_PEN_DROP_Z, PEN_OBJ_Z = 0.075, 26  # D4RL pen-v0/v1: the episode ends when obs[26] (the pen's z) < 0.075


def terminated(family: str, next_obs):
    """Termination of imagined transitions (the paper has none; MOPO's hand-written functions). A non-finite state is
    always terminal, so it can never feed a bootstrap."""
    finite = jnp.all(jnp.isfinite(next_obs), -1)
    height = next_obs[..., 0]
    angle = next_obs[..., 1]
    if family == "hopper":  # |obs[1:]| < 100 elementwise (the common port applies abs to a boolean)
        healthy = jnp.all(jnp.abs(next_obs[..., 1:]) < 100, -1) & (height > 0.7) & (jnp.abs(angle) < 0.2)
    elif family == "walker2d":
        healthy = (height > 0.8) & (height < 2.0) & (angle > -1.0) & (angle < 1.0)
    elif family == "halfcheetah":  # never falls; only a blown-up imagined state ends
        healthy = jnp.all(jnp.abs(next_obs) < 100, -1)
    elif family == "pen":  # obs[24:27] is the pen's position (after 24 hand joints); dropped when its z is too low
        healthy = next_obs[..., PEN_OBJ_Z] >= D4RL_PEN_DROP_Z
    else:  # maze2d / pointmaze and unknown envs: never terminal
        healthy = jnp.ones(next_obs.shape[:-1], bool)
    return ~(finite & healthy)


def dynamics_step(dyn: DynamicsModel, obs, act, key):
    """One imagined step (s_hat', r_hat) ~ T_psi(.|s, a): a random elite per transition, a sample of its Gaussian.
    Returns next_obs, reward, MOPO's penalty max_i ||sigma_i(s, a)||_2 over all members, done."""
    n = obs.shape[0]
    mean, logvar = dyn.net.apply(dyn.params, (jnp.concatenate([obs, act], -1) - dyn.input_mean) / dyn.input_std)
    std = jnp.exp(0.5 * logvar)
    k_member, k_noise = jax.random.split(key)
    member = dyn.elites[jax.random.randint(k_member, (n,), 0, dyn.elites.shape[0])]
    noise = jax.random.normal(k_noise, (n, obs.shape[1] + 1))
    sample = mean[member, jnp.arange(n)] + std[member, jnp.arange(n)] * noise
    next_obs = obs + sample[:, :-1]
    penalty = jnp.max(jnp.linalg.norm(std, axis=-1), axis=0)
    return next_obs, sample[:, -1], penalty, terminated(dyn.family, next_obs)


# -------------------------------------------------------------------------------------------------- Eq. 6-7: diffusion sampler
def vp_schedule(K: int, beta_min: float = 0.1, beta_max: float = 10.0) -> dict:
    """Diffusion-QL's variance-preserving schedule for K steps, with the DDPM posterior coefficients."""
    t = np.arange(1, K + 1)
    alphas = np.exp(-beta_min / K - 0.5 * (beta_max - beta_min) * (2 * t - 1) / K**2)
    betas = 1.0 - alphas
    ac = np.cumprod(alphas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = dict(betas=betas, sqrt_ac=np.sqrt(ac), sqrt_one_minus_ac=np.sqrt(1.0 - ac), sqrt_recip_ac=np.sqrt(1.0 / ac))
    out.update(sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1.0), post_log_var=np.log(np.maximum(post_var, 1e-20)))
    out.update(post_coef_x0=betas * np.sqrt(ac_prev) / (1.0 - ac), post_coef_xt=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
    return {name: jnp.asarray(v, jnp.float32) for name, v in out.items()}


@flax.struct.dataclass
class BehaviorModel:
    params: Any
    act_dim: int = flax.struct.field(pytree_node=False)
    K: int = flax.struct.field(pytree_node=False)  # diffusion steps
    hidden: int = flax.struct.field(pytree_node=False)
    dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)  # of its forward pass
    mish: Callable = flax.struct.field(pytree_node=False, default=jax.nn.mish)  # or an equal, faster form (Part II)

    @property
    def net(self) -> NoiseNet:
        return NoiseNet(self.act_dim, self.hidden, dtype=self.dtype, mish=self.mish)


def diffusion_sample(beh: BehaviorModel, obs, key, num_samples: int):
    """a_hat_m ~ Diff_omega(.|s), m = 1..M (Eq. 6-7) by Diffusion-QL's sampler: the reverse chain from N(0, I) as a
    lax.scan over K steps, x0 predicted from epsilon and clipped to [-1, 1], the DDPM posterior variance (where Eq. 7
    writes beta_k), no noise at the last step, a final clip. Pure and jittable: (N, obs) -> (N, M, act)."""
    sch = vp_schedule(beh.K)
    n = obs.shape[0]
    obs_rep = jnp.repeat(obs, num_samples, axis=0)
    k_init, k_chain = jax.random.split(key)
    x = jax.random.normal(k_init, (n * num_samples, beh.act_dim))

    def reverse_step(x, inputs):
        t, k_noise = inputs
        eps = beh.net.apply(beh.params, x, t[None], obs_rep)  # the time embedding once per step, not per row
        x0 = jnp.clip(sch["sqrt_recip_ac"][t] * x - sch["sqrt_recipm1_ac"][t] * eps, -1.0, 1.0)
        mean = sch["post_coef_x0"][t] * x0 + sch["post_coef_xt"][t] * x
        noise = jnp.where(t > 0, 1.0, 0.0) * jax.random.normal(k_noise, x.shape)
        return mean + jnp.exp(0.5 * sch["post_log_var"][t]) * noise, None

    steps = (jnp.arange(beh.K - 1, -1, -1), jax.random.split(k_chain, beh.K))
    x, _ = jax.lax.scan(reverse_step, x, steps, unroll=True)  # K is small: unrolled, XLA fuses across steps
    return jnp.clip(x, -1.0, 1.0).reshape(n, num_samples, beh.act_dim)


# ---------------------------------------------------------------------------------------------------- Eq. 16-21: ILQ
@dataclass(frozen=True)
class ILQConfig:
    """Static settings of the update (hashable: part of the compiled function). ILQConfig.for_task applies the paper's
    tables for a task (PAPER_HPARAMS, after the update); Part II builds it from the command line (learner_config)."""

    obs_dim: int
    act_dim: int
    eta: float  # Eq. 16: weight of the in-sample loss
    delta: float  # Eq. 18: added after the min
    penalty_coef: float  # MOPO reward penalty inside y_img
    critic_lr: float
    actor_lr: float
    entropy: bool  # auto-tuned alpha (Table 3: off for Adroit)
    cosine_lr: bool  # cosine decay to 0 over total_steps (Table 3: Adroit)
    total_steps: int
    gamma: float = 0.99
    tau: float = 0.005
    batch_size: int = 256
    num_behavior_samples: int = 10  # M of Eq. 20
    num_ood_actions: int = 1  # OOD actions per dataset state
    imagination: bool = True  # False: the "w/o imagination" ablation (Sec. 5.4)
    limitation: bool = True  # False: the "w/o limitation" ablation
    target_entropy_bonus: bool = False  # -alpha log pi in the targets (SAC/MCQ); not in Eq. 17/19
    fixed_alpha: float = 0.0  # alpha when entropy tuning is off (Adroit): 0 = no entropy term, > 0 = a fixed temperature
    hidden_dim: int = 256
    num_hidden: int = 3

    @property
    def actor(self) -> Actor:
        return Actor(self.act_dim, self.hidden_dim, self.num_hidden)

    @property
    def critic(self):
        return TwinCritic(self.hidden_dim, self.num_hidden)

    def optimizer(self, lr: float):
        return optax.adam(optax.cosine_decay_schedule(lr, self.total_steps) if self.cosine_lr else lr)

    @classmethod
    def for_task(cls, task: Optional[str], obs_dim: int, act_dim: int, total_steps: int, **overrides) -> ILQConfig:
        """The paper's settings for a D4RL task such as "hopper-medium-replay" (Tables 3-6: eta, delta, penalty, learning
        rates; Adroit: no entropy, cosine decay; others: DEFAULT_HPARAMS), overrides: any field's value instead."""
        adroit = task in ADROIT_TASKS
        paper = dict(zip(TABLE_FIELDS, PAPER_HPARAMS.get(task, DEFAULT_HPARAMS)), entropy=not adroit, cosine_lr=adroit)
        return cls(obs_dim=obs_dim, act_dim=act_dim, total_steps=total_steps, **{**paper, **overrides})


class CriticState(TrainState):
    target_params: Any  # theta^- of the target critics (Algorithm 1, line 12)


@flax.struct.dataclass
class ILQState:
    """One learner: the actor pi_phi, the twin critics with their targets, and log alpha, each with its Adam."""

    actor: TrainState
    critic: CriticState
    alpha: TrainState  # params {"log_alpha": ...} (tuned only with entropy on)


class Frozen(NamedTuple):
    """What the update reads and never changes: the device-resident dataset and the pretrained models."""

    data: Transitions
    dynamics: DynamicsModel
    behavior: BehaviorModel


class Targets(NamedTuple):
    y_in: jax.Array  # (B,)       Eq. 17
    s_ood: jax.Array  # (B*N, obs) dataset states, each repeated for its N OOD actions
    a_ood: jax.Array  # (B*N, act) a_oos ~ pi(.|s), treated as out-of-sample (Eq. 16)
    y_ood: jax.Array  # (B*N,)     Eq. 18
    y_img: Optional[jax.Array]  # (B*N,) Eq. 19 (None without imagination)
    y_lmt: Optional[jax.Array]  # (B*N,) Eq. 20 (None without limitation)


@partial(jax.jit, static_argnums=0)  # one program, whose outputs are separate buffers (the update donates them)
def init_train_state(cfg: ILQConfig, key) -> ILQState:
    """Algorithm 1, line 1: the actor, the twin critics, the targets as copies of the critics, log alpha = 0."""
    k_actor, k_critic = jax.random.split(key)
    obs = jnp.zeros((1, cfg.obs_dim))
    act = jnp.zeros((1, cfg.act_dim))
    actor = TrainState.create(apply_fn=cfg.actor.apply, params=cfg.actor.init(k_actor, obs), tx=cfg.optimizer(cfg.actor_lr))
    theta = cfg.critic.init(k_critic, obs, act)
    critic = CriticState.create(apply_fn=cfg.critic.apply, params=theta, tx=cfg.optimizer(cfg.critic_lr), target_params=theta)
    alpha = TrainState.create(apply_fn=None, params=dict(log_alpha=jnp.zeros(())), tx=cfg.optimizer(cfg.actor_lr))
    return ILQState(actor, critic, alpha)


def one_pass(fn, axis: int, **sets) -> dict:
    """fn on the rows of every named set of inputs at once, its outputs sliced back by name (their rows along `axis`):
    the values of one call per set, in one pass of fewer, larger kernels."""
    ends = np.cumsum([len(inputs[0]) for inputs in sets.values()])
    outputs = fn(*map(jnp.concatenate, zip(*sets.values())))
    part = lambda start, end: jax.tree_util.tree_map(lambda y: jax.lax.slice_in_dim(y, start, end, axis=axis), outputs)
    return {name: part(end - len(inputs[0]), end) for (name, inputs), end in zip(sets.items(), ends)}


def ilb_targets(cfg: ILQConfig, state: ILQState, frozen: Frozen, batch: Transitions, a_beh, key) -> Targets:
    """The Imagination-Limited Bellman targets of one minibatch (Eq. 17-20), under stop-gradient. a_beh: Eq. 20's M
    behaviour actions at the batch's states, (B, M, act) (None without the limitation)."""
    b = batch.rewards.shape[0]
    n = cfg.num_ood_actions
    m = cfg.num_behavior_samples

    def value(q, logp):  # min_j Q_theta-_j(s', a'); Eq. 17 and 19 have no -alpha log pi (--target-entropy-bonus adds it)
        return q.min(0) - temperature(cfg, state) * logp if cfg.target_entropy_bonus else q.min(0)

    k_next, k_ood, k_img, k_img_next = jax.random.split(key, 4)
    s = batch.observations
    s_next = batch.next_observations
    s_ood = jnp.repeat(s, n, axis=0)  # each dataset state once per OOD action

    # a' ~ pi(.|s') (Eq. 17) and the OOD actions a_oos ~ pi(.|s): "we directly treat policy pi as the sampling
    # distribution u" (Eq. 16); one actor pass for both sets of states
    pi = one_pass(partial(cfg.actor.apply, state.actor.params), 0, next=(s_next,), ood=(s_ood,))
    a_next, logp_next = tanh_gaussian(*pi["next"], k_next)
    a_ood, _ = tanh_gaussian(*pi["ood"], k_ood)
    pairs = dict(next=(s_next, a_next))  # the (state, action) pairs whose target-critic values the targets need
    if cfg.imagination:  # Eq. 19's step: a random elite, sampled; then a' ~ pi at the imagined s'
        s_img, r_img, penalty, done_img = dynamics_step(frozen.dynamics, s_ood, a_ood, k_img)
        a_img, logp_img = sample_action(cfg.actor, state.actor.params, s_img, k_img_next)
        pairs["img"] = (s_img, a_img)
    if cfg.limitation:  # Eq. 20's M behaviour actions at s
        chex.assert_shape(a_beh, (b, m, cfg.act_dim))
        pairs["beh"] = (jnp.repeat(s, m, axis=0), a_beh.reshape(b * m, -1))
    q = one_pass(partial(cfg.critic.apply, state.critic.target_params), 1, **pairs)  # Q_theta-_j, j = 1, 2: (2, rows)

    # Eq. 17, in-sample: r + gamma * (1 - done) * min_j Q_target_j(s', a'); done = true terminations
    y_in = batch.rewards + cfg.gamma * (1.0 - batch.terminals) * value(q["next"], logp_next)
    y_img = y_lmt = None
    if cfg.imagination:  # Eq. 19: the imagined value, MOPO's reward penalty, the termination mask
        y_img = r_img - cfg.penalty_coef * penalty + cfg.gamma * jnp.where(done_img, 0.0, value(q["img"], logp_img))
    if cfg.limitation:  # Eq. 20: per target critic the max over the same M behaviour actions at s, then the min
        y_lmt = jnp.repeat(q["beh"].reshape(2, b, m).max(-1).min(0), n)

    # Eq. 18: min{y_img, y_lmt} + delta (delta after the min); an ablation keeps its one branch
    if y_img is not None and y_lmt is not None:
        y_ood = jnp.minimum(y_img, y_lmt) + cfg.delta
    else:
        y_ood = (y_img if y_img is not None else y_lmt) + cfg.delta
    chex.assert_shape([y_in], (b,))
    chex.assert_shape([y_ood, a_ood[:, 0], s_ood[:, 0]], (b * n,))
    return jax.lax.stop_gradient(Targets(y_in, s_ood, a_ood, y_ood, y_img, y_lmt))


def critic_loss(cfg: ILQConfig, critic_params, batch: Transitions, targets: Targets):
    """Eq. 16: eta * in-sample TD error + (1 - eta) * OOD error, each averaged over its own set, summed over the twin
    critics (each regresses to the same target). One critic pass over the dataset and the OOD pairs."""
    pairs = dict(data=(batch.observations, batch.actions), ood=(targets.s_ood, targets.a_ood))
    q = one_pass(partial(cfg.critic.apply, critic_params), 1, **pairs)  # (2, B), (2, B*N)
    loss_in = jnp.mean((q["data"] - targets.y_in) ** 2, axis=1).sum()
    loss_ood = jnp.mean((q["ood"] - targets.y_ood) ** 2, axis=1).sum()
    return cfg.eta * loss_in + (1.0 - cfg.eta) * loss_ood, (loss_in, loss_ood, q["data"].mean(), q["ood"].mean())


def temperature(cfg: ILQConfig, state: ILQState):
    """SAC's alpha: tuned (log alpha) with entropy on; with entropy off (Adroit) the fixed --fixed-alpha, 0 by default."""
    return jnp.exp(state.alpha.params["log_alpha"]) if cfg.entropy else jnp.asarray(cfg.fixed_alpha, jnp.float32)


def actor_alpha_update(cfg: ILQConfig, state: ILQState, observations, key):
    """Eq. 21: max E[min_j Q_theta_j(s, a) - alpha log pi(a|s)] with the state's (just updated, online) critics, then
    SAC's automatic temperature: target entropy -|A|, the actor's learning rate (the paper gives neither). Returns
    (state, (actor loss, log pi))."""
    alpha = temperature(cfg, state)

    def actor_loss(actor_params):
        a, logp = sample_action(cfg.actor, actor_params, observations, key)
        return jnp.mean(alpha * logp - cfg.critic.apply(state.critic.params, observations, a).min(0)), logp

    (loss_pi, logp), grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor.params)
    state = state.replace(actor=state.actor.apply_gradients(grads=grads))
    if cfg.entropy:
        target_entropy = -float(cfg.act_dim)
        grad = jax.grad(lambda p: -p["log_alpha"] * jnp.mean(jax.lax.stop_gradient(logp) + target_entropy))
        state = state.replace(alpha=state.alpha.apply_gradients(grads=grad(state.alpha.params)))
    return state, (loss_pi, logp)


def minibatch_draws(cfg: ILQConfig, frozen: Frozen, key):
    """Algorithm 1, line 5: the minibatch indices of the update with this key (drawn inside jit) and the keys of its
    other draws: idx, k_behavior, k_targets, k_actor."""
    k_batch, k_beh, k_targets, k_actor = jax.random.split(key, 4)
    return jax.random.randint(k_batch, (cfg.batch_size,), 0, frozen.data.rewards.shape[0]), k_beh, k_targets, k_actor


def learn(cfg: ILQConfig, state: ILQState, batch: Transitions, targets: Targets, key):
    """Algorithm 1, lines 9-12 from the targets: the critics (Eq. 16), the actor and alpha (Eq. 21), the soft target
    update."""
    loss_and_grad = jax.value_and_grad(partial(critic_loss, cfg), has_aux=True)
    (loss_q, (loss_in, loss_ood, q_data, q_ood)), grads = loss_and_grad(state.critic.params, batch, targets)
    state = state.replace(critic=state.critic.apply_gradients(grads=grads))
    state, (loss_pi, logp) = actor_alpha_update(cfg, state, batch.observations, key)
    theta_target = optax.incremental_update(state.critic.params, state.critic.target_params, cfg.tau)
    state = state.replace(critic=state.critic.replace(target_params=theta_target))
    metrics = {"losses/critic_loss": loss_q, "losses/critic_loss_in_sample": loss_in, "losses/critic_loss_ood": loss_ood}
    metrics.update({"losses/actor_loss": loss_pi, "losses/entropy": -jnp.mean(logp), "losses/q_data": q_data})
    metrics.update({"losses/alpha": temperature(cfg, state), "losses/q_ood": q_ood})
    return state, metrics


def target_metrics(targets: Targets) -> dict:
    """The targets' means and, with both branches, the paper's health check (Fig. 10a): y_img - y_lmt and the share
    of OOD targets the limit clips."""
    metrics = {"ilq/y_in": targets.y_in.mean(), "ilq/y_ood": targets.y_ood.mean()}
    if targets.y_img is not None and targets.y_lmt is not None:
        metrics["ilq/y_img_minus_y_lmt"] = jnp.mean(targets.y_img - targets.y_lmt)
        metrics["ilq/ood_clip_frac"] = jnp.mean(targets.y_lmt < targets.y_img)
    return metrics


def ilb_step(cfg: ILQConfig, state: ILQState, frozen: Frozen, key, a_beh=None):
    """Algorithm 1, lines 5-8 for one learner, every draw from `key`: the minibatch and its ILB targets. a_beh: Eq.
    20's behaviour actions at the minibatch's states when drawn beforehand (Part II draws those of many updates in one
    chain: the values drawn here), else None. Returns (batch, targets, the key of the actor's update)."""
    idx, k_beh, k_targets, k_actor = minibatch_draws(cfg, frozen, key)
    batch = jax.tree_util.tree_map(lambda x: x[idx], frozen.data)  # line 5
    if cfg.limitation and a_beh is None:  # Eq. 20's M behaviour actions at the batch's states
        a_beh = diffusion_sample(frozen.behavior, batch.observations, k_beh, cfg.num_behavior_samples)
    return batch, ilb_targets(cfg, state, frozen, batch, a_beh, k_targets), k_actor


def ilq_update(cfg: ILQConfig, state: ILQState, frozen: Frozen, key, a_beh=None):
    """One step of Algorithm 1 (lines 5-12) for one learner: the minibatch and its targets (ilb_step), then the
    critics, the actor, alpha and the targets (learn)."""
    batch, targets, k_actor = ilb_step(cfg, state, frozen, key, a_beh)
    state, metrics = learn(cfg, state, batch, targets, k_actor)
    return state, {**metrics, **target_metrics(targets)}


def make_update_fn(cfg: ILQConfig):
    """Many ilq_updates of one learner per call: one jitted lax.scan over keys (n, 2), the state donated. Returns
    (state, metrics), each metric of shape (n,)."""

    def update_many(state: ILQState, frozen: Frozen, keys):
        return jax.lax.scan(lambda state, key: ilq_update(cfg, state, frozen, key), state, keys)

    return jax.jit(update_many, donate_argnums=0)


# ------------------------------------------------------------------------------------ the paper's tables and ablations
TABLE_FIELDS = ("eta", "delta", "penalty_coef", "critic_lr", "actor_lr")  # a row of PAPER_HPARAMS
PAPER_HPARAMS = {  # Tables 3-6 and A.2: task -> (eta, delta, reward-penalty coefficient, critic lr, actor lr)
    "halfcheetah-random": (0.95, 2.0, 0.0, 5e-4, 3e-4),
    "hopper-random": (0.90, 1.0, 1.0, 3e-4, 1e-4),
    "walker2d-random": (0.70, 1.0, 0.0, 5e-4, 3e-4),
    "halfcheetah-medium": (0.95, 1.0, 0.0, 5e-4, 3e-4),
    "hopper-medium": (0.95, -2.0, 2.0, 5e-4, 3e-4),
    "walker2d-medium": (0.90, 0.5, 1.0, 5e-4, 3e-4),
    "halfcheetah-medium-replay": (0.95, 2.0, 0.0, 5e-4, 3e-4),
    "hopper-medium-replay": (0.80, -0.5, 1.0, 3e-4, 1e-4),
    "walker2d-medium-replay": (0.90, 1.0, 2.0, 3e-4, 1e-4),
    "halfcheetah-medium-expert": (0.60, 1.0, 0.0, 5e-4, 3e-4),
    "hopper-medium-expert": (0.40, -0.5, 0.0, 5e-4, 3e-4),
    "walker2d-medium-expert": (0.80, 1.0, 0.0, 5e-4, 3e-4),
    "maze2d-umaze": (0.95, -0.5, 0.0, 5e-4, 3e-4),
    "maze2d-umaze-dense": (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "maze2d-medium": (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "maze2d-medium-dense": (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "maze2d-large": (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "maze2d-large-dense": (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "pen-human": (0.80, -1.0, 0.0, 3e-4, 1e-4),
    "pen-cloned": (0.80, 0.0, 0.0, 3e-4, 1e-4),
}
# Datasets the paper does not list: eta ~0.9 "a typically safe choice", delta = 0 "a solid choice" (Sec. 5.3), the
# learning rates of "all others" (Table 3). Where the text and the tables disagree, the tables win.
DEFAULT_HPARAMS = (0.90, 0.0, 0.0, 5e-4, 3e-4)
ADROIT_TASKS = ("pen-human", "pen-cloned")  # entropy off and a cosine learning-rate schedule (Table 3)
# --methods: ILQ and its two ablations (Sec. 5.4) as (imagination, limitation)
METHODS = {"ilq": (True, True), "no-imagination": (False, True), "no-limitation": (True, False)}


# -------------------------------------------------------------------------------- Alg. 1 lines 2-3: pretraining (Eq. 5, Eq. 8)
DYNAMICS_WEIGHT_DECAY = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)  # MOPO, per layer (4 hidden layers, then the output)
DYNAMICS_BATCHES_PER_CALL = 500  # minibatches per jitted call of train_dynamics (an epoch of a large dataset is minutes)


def init_dynamics(obs_dim, act_dim, family, members=7, elites=5, hidden=200, layers=4, seed=0) -> DynamicsModel:
    """An untrained ensemble (identity scaler, elites 0..elites-1): train_dynamics' start, a saved model's template.
    The sizes are MOPO's (and the paper's 4x200)."""
    if elites > members or len(DYNAMICS_WEIGHT_DECAY) != layers + 1:
        raise ValueError(f"need elites <= members and {len(DYNAMICS_WEIGHT_DECAY) - 1} layers (MOPO's weight decays)")
    d = obs_dim + act_dim
    params = DynamicsEnsemble(obs_dim + 1, members, hidden, layers).init(jax.random.PRNGKey(seed), jnp.zeros((1, d)))
    return DynamicsModel(params, jnp.zeros(d), jnp.ones(d), jnp.arange(elites), obs_dim, members, hidden, layers, family)


def dynamics_loss(net: DynamicsEnsemble, params, x, y):
    """Eq. 5's Gaussian negative log-likelihood per member (up to constants), summed over members, with MOPO's weight
    decay and the 0.01 penalty that keeps the learned log-variance bounds tight."""
    mean, logvar = net.apply(params, x)
    nll = jnp.mean((mean - y) ** 2 * jnp.exp(-logvar), (1, 2)) + jnp.mean(logvar, (1, 2))
    p = params["params"]
    decay = sum(wd * 0.5 * jnp.sum(p[f"EnsembleDense_{i}"]["kernel"] ** 2) for i, wd in enumerate(DYNAMICS_WEIGHT_DECAY))
    return jnp.sum(nll) + decay + 0.01 * (jnp.sum(p["max_logvar"]) - jnp.sum(p["min_logvar"]))


def train_dynamics(
    data, family, *, epochs=40, lr=1e-3, seed=0, batch_size=256, callback=None, **sizes
) -> tuple[DynamicsModel, dict]:
    """Algorithm 1, line 2 (Eq. 5) by MOPO's recipe for a fixed number of epochs (Table 3): each member fits its own
    bootstrap of the training split; holdout = min(20 %, 1000) transitions; elites = the lowest holdout MSE. sizes:
    init_dynamics' members, elites, hidden, layers. callback(done, total, metrics), if given, hears the minibatches
    done of all epochs after every jitted call of DYNAMICS_BATCHES_PER_CALL, with an epoch's losses at its end.
    Returns the model and its training record."""
    model = init_dynamics(data.observations.shape[1], data.actions.shape[1], family, seed=seed, **sizes)
    obs = np.asarray(data.observations)
    x = np.concatenate([obs, np.asarray(data.actions)], -1)
    y = np.concatenate([np.asarray(data.next_observations) - obs, np.asarray(data.rewards)[:, None]], -1)
    rng = np.random.default_rng(seed)
    hold, train = np.split(rng.permutation(len(x)), [min(int(0.2 * len(x)), 1000)])
    mean = x[train].mean(0)
    std = x[train].std(0)
    std[std < 1e-12] = 1.0
    xs = jnp.asarray((x - mean) / std, jnp.float32)
    ys = jnp.asarray(y, jnp.float32)
    boot = jnp.asarray(train[rng.integers(0, len(train), size=(model.members, len(train)))])
    n_batches = max(1, len(train) // batch_size)
    model = model.replace(input_mean=jnp.asarray(mean, jnp.float32), input_std=jnp.asarray(std, jnp.float32))
    opt = optax.adam(lr)

    @jax.jit
    def shuffle(key, boot):  # (batches, members, batch_size): each member its own minibatch of its own bootstrap
        idx = jax.vmap(jax.random.permutation)(jax.random.split(key, model.members), boot)
        return idx[:, : n_batches * batch_size].reshape(model.members, n_batches, -1).transpose(1, 0, 2)

    @jax.jit
    def fit(params, opt_state, batches, xs, ys):
        def step(carry, idx):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(partial(dynamics_loss, model.net))(params, xs[idx], ys[idx])
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, losses.sum()

    holdout_mse = jax.jit(lambda p, xs, ys, h: jnp.mean((model.net.apply(p, xs[h])[0] - ys[h]) ** 2, (1, 2)))
    params = model.params
    opt_state = opt.init(params)
    key = jax.random.PRNGKey(seed + 1)
    t0 = time.time()
    for ep in range(1, epochs + 1):
        key, sub = jax.random.split(key)
        batches = shuffle(sub, boot)
        loss_sum = 0.0
        for i in range(0, n_batches, DYNAMICS_BATCHES_PER_CALL):
            params, opt_state, chunk_loss = fit(params, opt_state, batches[i : i + DYNAMICS_BATCHES_PER_CALL], xs, ys)
            loss_sum += chunk_loss
            done = min(i + DYNAMICS_BATCHES_PER_CALL, n_batches)
            if callback and done < n_batches:  # a report can follow each call
                callback((ep - 1) * n_batches + done, epochs * n_batches, {})
        mse = np.asarray(holdout_mse(params, xs, ys, hold))
        elite_idx = np.sort(np.argsort(mse)[: len(model.elites)])
        record = dict(epoch=ep, train_loss=float(loss_sum) / n_batches, holdout_mse=mse.tolist())
        record.update(holdout_mse_elites=float(mse[elite_idx].mean()), elites=elite_idx.tolist())
        if callback:
            callback(ep * n_batches, epochs * n_batches, record)
    model = model.replace(params=params, elites=jnp.asarray(elite_idx, jnp.int32))
    return model, dict(record, wall_time_s=time.time() - t0)


def init_behavior(obs_dim, act_dim, K=5, hidden=256, seed=0) -> BehaviorModel:
    """An untrained noise network: train_diffusion's start, a saved model's template."""
    inputs = jnp.zeros((1, act_dim)), jnp.zeros(1, jnp.int32), jnp.zeros((1, obs_dim))
    return BehaviorModel(NoiseNet(act_dim, hidden).init(jax.random.PRNGKey(seed), *inputs), act_dim, K, hidden)


def diffusion_loss(beh: BehaviorModel, params, obs, act, key):
    """Eq. 8: || xi - xi_omega(sqrt(abar_k) a + sqrt(1 - abar_k) xi, s, k) ||^2, k ~ U{1..K}."""
    sch = vp_schedule(beh.K)
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (obs.shape[0],), 0, beh.K)
    eps = jax.random.normal(k_eps, act.shape)
    noisy = sch["sqrt_ac"][t, None] * act + sch["sqrt_one_minus_ac"][t, None] * eps
    return jnp.mean((beh.net.apply(params, noisy, t, obs) - eps) ** 2)


def train_diffusion(
    data: Transitions, *, K=5, hidden=256, steps=300_000, lr=3e-4, seed=0, batch_size=256, steps_per_call=1000, callback=None
) -> tuple[BehaviorModel, dict]:
    """Algorithm 1, line 3: behaviour cloning with the diffusion loss (Eq. 8), minibatches sampled inside jit.
    callback(done, total, {"loss": ...}), if given, hears the steps done after every call of steps_per_call steps.
    Returns the model and its training record."""
    beh = init_behavior(data.observations.shape[1], data.actions.shape[1], K, hidden, seed)
    key = jax.random.PRNGKey(seed)
    opt = optax.adam(lr)

    @partial(jax.jit, static_argnums=3)
    def run(beh, opt_state, key, n_steps, data):
        def step(carry, key):
            beh, opt_state = carry
            k_idx, k_loss = jax.random.split(key)
            idx = jax.random.randint(k_idx, (batch_size,), 0, data.rewards.shape[0])
            loss_fn = partial(diffusion_loss, beh)
            loss, grads = jax.value_and_grad(loss_fn)(beh.params, data.observations[idx], data.actions[idx], k_loss)
            updates, opt_state = opt.update(grads, opt_state, beh.params)
            return (beh.replace(params=optax.apply_updates(beh.params, updates)), opt_state), loss

        (beh, opt_state), losses = jax.lax.scan(step, (beh, opt_state), jax.random.split(key, n_steps))
        return beh, opt_state, losses.mean()

    opt_state = opt.init(beh.params)
    done = 0
    t0 = time.time()
    while done < steps:
        n = min(steps_per_call, steps - done)
        key, sub = jax.random.split(key)
        beh, opt_state, loss = run(beh, opt_state, sub, n, data)
        done += n
        if callback:  # float(loss) waits for the call: only when someone listens
            callback(done, steps, dict(loss=float(loss)))
    return beh, dict(final_loss=float(loss), wall_time_s=time.time() - t0)


# ======================================================================================================================
# Part II — running ILQ: flags, the settings of a run, the frozen models, the training loop, evaluation, the summary
# ======================================================================================================================


import contextlib
import json
import os
import shutil
import sys
import typing
from typing import Literal

try:  # Parts II and III need gymnasium and tyro; `import ilq_jax` for Part I alone needs neither
    import gymnasium as gym
    import tyro
except ImportError:
    gym = tyro = None

RANDOM_DATASET_STEPS, RANDOM_DATASET_SEED = 50_000, 0  # the default generated dataset
PROGRESS_EVERY_S = 30.0  # pretraining and training print a progress line at least this often
FlagOrPaper = tyro.conf.DisallowNone[Optional[bool]] if tyro else Optional[bool]  # --flag / --no-flag; None: the paper's


# --------------------------------------------------------------------------------------------------------------- flags
@dataclass
class RunFlags:
    """The run: its name and seeds, the methods trained together, its length, stopping and resuming."""

    GROUP: ClassVar[str] = "run"  # its box in --help
    exp_name: str = "ilq_jax"  # name of this experiment: part of the run folder's name
    seed: int = 1  # seed of the ILQ learner (networks, minibatches, OOD actions)
    num_seeds: int = 1  # independent learners trained together in one process (jax.vmap): seeds --seed ... --seed + N - 1
    # methods trained together, each with --num-seeds seeds, in one jitted scan: comma-separated from ilq, no-imagination,
    # no-limitation (Sec. 5.4's ablations); None: one method, ilq or what --no-imagination / --no-limitation make it
    methods: Optional[str] = None
    run_name: Optional[str] = None  # runs/<run-name>, one folder name (None: <dataset>__<methods>__<exp-name>__<seed>__<time>)
    # continue the run in runs/<run-name> with its saved settings, adding only --stop-after, --time-box-min, --eval-workers
    # (None: a new run)
    resume: Optional[str] = None
    stop_after: Optional[int] = None  # stop after this many updates in this call, with a checkpoint (None: run to the end)
    # end the run at the first evaluation after this many minutes, as a finished run --resume continues (None: no box)
    time_box_min: Optional[float] = None
    # cpu: 5000 updates, 2e4 diffusion steps, 10 dynamics epochs (the default run: 5-10 min on 2 CPU cores); paper: 1e6,
    # 3e5, 40 (Table 3); None: paper on a GPU/TPU, cpu on a CPU and for the data generated here (ilq-local/...)
    budget: Optional[Literal["cpu", "paper"]] = None
    total_steps: Optional[int] = None  # gradient updates of each learner (None: from --budget, cpu 5000, paper 1e6)
    updates_per_call: int = 250  # updates fused into one jitted lax.scan call (the last call may be shorter)
    sample_chunk: int = 10  # updates whose fresh behaviour samples are drawn together in one diffusion chain (same values)
    # updates between checkpoints (None: from --budget, cpu 500, paper 50000); a first Ctrl-C or SIGTERM in training
    # checkpoints; a second exits at once, and kill -9 at any time, keeping the last checkpoint
    checkpoint_interval: Optional[int] = None


@dataclass
class DataFlags:
    """The dataset: what the models and the learners are trained on (pretrain_models.py takes the same flags)."""

    GROUP: ClassVar[str] = "data"  # its box in --help
    # the DATASET (the evaluation env follows from it): a D4RL name (hopper-medium-replay), a Minari id (D4RL/pen/human-v2)
    # or ilq-local/<hopper|walker2d|halfcheetah>/random-v0, a random-policy dataset generated here offline (the default)
    env_id: str = "ilq-local/hopper/random-v0"
    dataset_path: Optional[str] = None  # D4RL HDF5 file for a D4RL name (None: the D4RL cache folder, else a download)
    download: bool = True  # --no-download: never download a dataset that is not on disk
    random_dataset_steps: int = RANDOM_DATASET_STEPS  # size of a generated ilq-local/*/random-v0; other sizes get their own id


@dataclass
class ILQFlags:
    """ILQ's settings: None takes the paper's value for the dataset (Tables 3-6)."""

    GROUP: ClassVar[str] = "ilq"  # its box in --help
    batch_size: int = 256  # minibatch size B (the paper's 256)
    eta: Optional[float] = None  # eta of Eq. 16, the weight of the in-sample loss (None: the paper's value for this dataset)
    delta: Optional[float] = None  # delta of Eq. 18, added after the min (None: the paper's value for this dataset)
    penalty_coef: Optional[float] = None  # MOPO reward penalty in y_img (None: the paper's value for this dataset, mostly 0)
    critic_lr: Optional[float] = None  # critic learning rate (None: the paper's value for this dataset, 3e-4 or 5e-4)
    actor_lr: Optional[float] = None  # actor and alpha learning rate (None: the paper's value for this dataset, 1e-4 or 3e-4)
    entropy: FlagOrPaper = None  # auto-tuned SAC temperature (None: the paper's value for this dataset, off for Adroit only)
    cosine_lr: FlagOrPaper = None  # cosine learning-rate decay (None: the paper's value for this dataset, on for Adroit only)
    gamma: float = 0.99  # discount factor (the paper's 0.99)
    tau: float = 0.005  # soft target-update rate (the paper's 0.005)
    num_behavior_samples: int = 10  # M of Eq. 20: behaviour actions per state for the limit (the paper's 10)
    num_ood_actions: int = 1  # OOD actions drawn from pi per dataset state (the paper implies 1)
    imagination: bool = True  # --no-imagination: OOD target = y_lmt + delta (the ablation of Sec. 5.4)
    limitation: bool = True  # --no-limitation: OOD target = y_img + delta (the ablation of Sec. 5.4)
    behavior_bank: bool = False  # M behaviour actions per state sampled once (faster on CPU), not in every update (the paper)
    # the frozen models compute in bfloat16 (fewer bytes on a GPU; the targets move slightly: benchmarks/RESULTS.md)
    bf16_models: bool = False
    target_entropy_bonus: bool = False  # -alpha log pi in the critic targets as in SAC/MCQ (the paper's Eq. 17/19 have none)
    fixed_alpha: float = 0.0  # alpha when entropy tuning is off (Adroit's "Entropy: False"): 0 = none (default), >0 fixed
    hidden_dim: int = 256  # width of the actor and critic layers (the paper's 256)
    num_hidden: int = 3  # hidden layers of the actor and critic (the paper's 3)


@dataclass
class ModelFlags:
    """The frozen models (Algorithm 1, lines 2-3): their settings, training lengths and cache (shared with
    pretrain_models.py)."""

    GROUP: ClassVar[str] = "models"  # its box in --help
    model_dir: str = "~/.cache/ilq-jax/models"  # cache of pretrained models, keyed by dataset fingerprint and model settings
    pretrain_seed: int = 0  # seed of model pretraining (shared by all learner seeds)
    dynamics_members: int = 7  # dynamics ensemble members (MOPO's 7)
    dynamics_elites: int = 5  # elite members, chosen by holdout MSE (MOPO's 5)
    dynamics_hidden: int = 200  # width of the dynamics layers (the paper's 200)
    dynamics_layers: int = 4  # hidden layers of the dynamics networks (the paper's 4; MOPO's weight decays need 4)
    # dynamics training epochs (None: from --budget, cpu 10, paper 40); a cached model trained at least as long is used
    dynamics_epochs: Optional[int] = None
    dynamics_lr: float = 1e-3  # dynamics learning rate (the paper's 1e-3)
    # diffusion training steps (None: from --budget, cpu 2e4, paper 3e5); a cached model trained at least as long is used
    diffusion_steps: Optional[int] = None
    diffusion_k: int = 5  # K, the number of diffusion steps (Diffusion-QL's 5, VP schedule)
    diffusion_lr: float = 3e-4  # diffusion learning rate (the paper's 3e-4)


@dataclass
class ModelFileFlags(ModelFlags):
    """The frozen models (Algorithm 1, lines 2-3): given files, else the cache, else trained now; their settings."""

    dynamics_path: Optional[str] = None  # dynamics model to use (.msgpack beside its .json; None: the cache, else train one)
    behavior_path: Optional[str] = None  # diffusion model to use (.msgpack beside its .json; None: the cache, else train one)


@dataclass
class EvaluationFlags:
    """Evaluation: where, how often, how many episodes, in which processes; after training, a run evaluated or drawn
    again."""

    GROUP: ClassVar[str] = "evaluation"  # its box in --help
    # Gymnasium env for evaluation (None: where the data were recorded: D4RL's hopper names on Hopper-v4 with the -v2
    # masses, maze2d/pen on D4RL-faithful wrappers, Minari data on their recorded env, ilq-local/*/random-v0 on -v5)
    eval_env_id: Optional[str] = None
    eval_interval: Optional[int] = None  # updates between evaluations (None: from --budget, cpu 500, paper 5000)
    eval_episodes: int = 10  # episodes per evaluation (deterministic policy, fresh start states at every evaluation)
    eval_seed: int = 10_000  # first start-state seed of the evaluation episodes (separate from the training seed)
    # worker processes that evaluate snapshots while training goes on (0: in the training loop; None: 1 when JAX runs
    # on an accelerator, else 0); the results are the same either way
    eval_workers: Optional[int] = None
    # film one evaluation episode of each method's first seed at the end: runs/<run-name>/videos/<method>-update<step>.mp4
    capture_video: bool = False
    capture_video_every: Optional[int] = None  # also at every K-th evaluation; implies --capture-video (None: the end only)
    # evaluate every learner of this run folder again (its checkpoint), --eval-episodes from --eval-seed in its evaluation
    # env or --eval-env-id, --capture-video: writes evaluation-<time>.json there (those flags only; None: train)
    evaluate: Optional[str] = None
    plot: Optional[str] = None  # draw curves.png of the run in this folder again, from its summary.json (None: train)


@dataclass
class Args(RunFlags, DataFlags, ILQFlags, ModelFileFlags, EvaluationFlags):
    """Train ILQ (Imagination-Limited Q-Learning, IJCAI 2025) on an offline dataset and evaluate it. A flag whose
    default is None takes the paper's value for the dataset (Tables 3-6) or the --budget's value, as its help says;
    the effective values are printed at start. Boolean flags come as --flag / --no-flag. After training, --evaluate
    runs/<run-name> evaluates a run's policies again and --plot runs/<run-name> redraws its curves.png."""


# ----------------------------------------------------------------------------------------------- the settings of a run
BUDGETS = {  # the paper's Table 3 (a checkpoint of 15 learners: ~86 MiB), and one whose default run takes 5-10 min on 2 cores
    "paper": dict(
        total_steps=1_000_000, eval_interval=5_000, checkpoint_interval=50_000, diffusion_steps=300_000, dynamics_epochs=40
    ),
    "cpu": dict(total_steps=5_000, eval_interval=500, checkpoint_interval=500, diffusion_steps=20_000, dynamics_epochs=10),
}
MAX_INT = 2**31 - 1  # JAX's int32 indices and counters, and its 32-bit seeds (2**32 + 1 would be the seed 1)
RULES = (  # (flags, what each must be, the test) for resolve_args; a flag left None is the paper's or the budget's
    ("total_steps eval_interval updates_per_call eval_episodes batch_size num_seeds num_behavior_samples num_ood_actions "
     "hidden_dim num_hidden dynamics_members dynamics_elites dynamics_hidden dynamics_epochs diffusion_steps diffusion_k "
     "random_dataset_steps sample_chunk checkpoint_interval stop_after capture_video_every",
     f"be a positive integer at most {MAX_INT}", lambda v: 0 < v <= MAX_INT),
    ("seed eval_seed pretrain_seed", f"lie in 0..{MAX_INT} (JAX's seeds are 32-bit)", lambda v: 0 <= v <= MAX_INT),
    ("time_box_min critic_lr actor_lr dynamics_lr diffusion_lr", "be positive and finite", lambda v: 0 < v < math.inf),
    ("eta gamma tau", "lie in [0, 1]", lambda v: 0 <= v <= 1),
    ("penalty_coef fixed_alpha", "be >= 0 and finite", lambda v: 0 <= v < math.inf),
    ("delta", "be finite and at most 1e6 in size (the paper's lie in -2..2)", lambda v: abs(v) <= 1e6),
    ("eval_workers", "lie in 0..64", lambda v: 0 <= v <= 64),
    ("run_name exp_name", "be one folder name (no '/', not '.' or '..')", lambda v: v not in ("", ".", "..") and "/" not in v),
)  # fmt: skip


def default_budget(env_id: str) -> tuple[str, str]:
    """--budget's default and why: the paper's where it takes minutes (an accelerator), the short one elsewhere."""
    if env_id.startswith(LOCAL_NAMESPACE + "/"):
        return "cpu", "data generated here are a smoke test on any device"
    if jax.default_backend() == "cpu":
        return "cpu", "JAX runs on the CPU, where the paper's 1e6 updates take about a day"
    return "paper", f"JAX runs on {jax.default_backend()}, where the paper's 1e6 updates take minutes to hours"


def resolve_args(args: Args) -> Args:
    """Fill the budget's defaults, make the paths absolute and check every flag, before any work starts or any
    folder is made."""
    args = dataclasses.replace(args, budget=args.budget or default_budget(args.env_id)[0])
    args = dataclasses.replace(args, **{k: v for k, v in BUDGETS[args.budget].items() if getattr(args, k) is None})
    paths = ("dataset_path", "dynamics_path", "behavior_path", "model_dir")  # a resume from elsewhere finds them
    args = dataclasses.replace(
        args, **{k: os.path.abspath(os.path.expanduser(getattr(args, k))) for k in paths if getattr(args, k)}
    )
    values = [(n, getattr(args, n), must, ok) for names, must, ok in RULES for n in names.split()]
    bad = [f"{flag(n)} ({v}) must {must}" for n, v, must, ok in values if v is not None and not ok(v)]
    try:
        learner_methods(args)
    except ILQError as e:
        bad.append(str(e))
    if args.dynamics_elites > args.dynamics_members:
        bad.append(f"--dynamics-elites ({args.dynamics_elites}) cannot exceed --dynamics-members ({args.dynamics_members})")
    if args.dynamics_layers != len(DYNAMICS_WEIGHT_DECAY) - 1:
        bad.append(f"--dynamics-layers ({args.dynamics_layers}) must be 4: MOPO's weight decays are given for 4 layers")
    if not (args.imagination or args.limitation):
        bad.append("--no-imagination and --no-limitation together leave no OOD target; keep at least one")
    if args.dataset_path is not None and parse_d4rl_name(args.env_id) is None:
        bad.append(
            f"--dataset-path ({args.dataset_path}) is read only for a D4RL name, and --env-id '{args.env_id}' is none: "
            "pass the D4RL name of the file's data (it picks the paper's row and the evaluation env), or drop it"
        )
    if bad:
        raise ILQError("; ".join(bad) + ".")
    return args


def learner_methods(args: Args) -> tuple:
    """--methods as METHODS names; without it, the one method that --imagination / --limitation make."""
    if args.methods is None:
        return tuple(m for m, flags in METHODS.items() if flags == (args.imagination, args.limitation))
    names = [m.strip() for m in args.methods.split(",")]
    if not names or len(set(names)) != len(names) or any(m not in METHODS for m in names):
        raise ILQError(f"--methods ({args.methods}) must be distinct names from {', '.join(METHODS)}, comma-separated")
    if not (args.imagination and args.limitation):
        raise ILQError("--methods names the ablations itself; drop --no-imagination / --no-limitation")
    return tuple(names)


def learner_config(args: Args, info: DatasetInfo) -> ILQConfig:
    """ILQConfig.for_task of the dataset's task with every ILQ flag that is set (None: the paper's value)."""
    names = {f.name for f in dataclasses.fields(ILQConfig)} - {"obs_dim", "act_dim", "total_steps"}
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return ILQConfig.for_task(info.task, info.obs_dim, info.act_dim, args.total_steps, **given)


def effective_hparams(args: Args, info: DatasetInfo) -> dict:
    """The settings a task's row of the paper's tables gives, after the flags; where they came from; which flags
    overrode them (for the console and summary.json)."""
    cfg, paper = learner_config(args, info), (*TABLE_FIELDS, "entropy", "cosine_lr")
    known = info.task in PAPER_HPARAMS
    source = f"paper Tables 3-6 row '{info.task}'" if known else "defaults (dataset not in the paper's tables)"
    if not known and info.name.startswith("mujoco/"):  # Minari's own locomotion data: new data, no row of the paper
        source += "; Minari's mujoco/* datasets were recorded anew on Gymnasium -v5, they are not D4RL's data"
    hp = {k: getattr(cfg, k) for k in paper}
    return dict(hp, source=source, overridden=[k for k in paper if getattr(args, k) is not None])


# ------------------------------------------------- Algorithm 1, lines 2-3: the frozen models, cached or pretrained now
def mish_one_exp(x):
    """jax.nn.mish's values (to rounding) with one exp: tanh(log(1 + e)) = e(e + 2) / (e(e + 2) + 2), e = exp(x);
    cheaper on a CPU, where the diffusion sampler is dominated by mish."""
    e = jnp.exp(jnp.minimum(x, 20.0))
    n = e * (e + 2.0)
    return jnp.where(x > 20.0, x, x * n / (n + 2.0))


def make_behavior_bank(behavior: BehaviorModel, observations, m: int, seed: int, chunk: int = 8192):
    """M behaviour actions per dataset state, sampled once and kept fixed (faster on CPU; the paper samples afresh)."""
    sample = jax.jit(partial(diffusion_sample, behavior), static_argnums=2)
    key = jax.random.PRNGKey(seed)
    parts = [sample(observations[i : i + chunk], jax.random.fold_in(key, i), m) for i in range(0, len(observations), chunk)]
    return jnp.concatenate(parts)


def pretrained_models(args: Args, data: Transitions, info: DatasetInfo, methods: tuple, stop: dict, run_dir: str, saved):
    """Algorithm 1, lines 2-3 for a run, stoppable between jitted calls (a model trained before a signal stays
    cached). A run keeps its own copy of both models (runs/<run>/models/), so that no later run or pretraining can
    change what it resumes with; `saved`: a resumed run's record of them ({} for a new run). Returns the frozen inputs
    of the update (the models in the run's precision), the behaviour bank or None, each model's record and the
    pretraining curves (tag, value, step) of the models trained now."""

    def check():
        if stop["signal"]:
            raise Interrupted(stop["signal"])

    models, records, curves = [], {}, []
    for kind in MODEL_KINDS:
        own = os.path.join(run_dir, "models", f"{kind}.msgpack")
        if saved and os.path.exists(own):
            advice = "Restore it, or delete both: the resume makes the model again from the run's settings."
            model, side = load_artifact(own, kind, info, advice)
            source = saved[kind]["source"]
        else:  # a new run, or a resumed one whose own copy is gone: found in the cache or made again from its settings
            model, side, source = load_or_train(kind, args, data, info, stop=check, curves=curves)
            if saved and saved[kind]["sha256"] != sha256(flax.serialization.to_bytes(model)):  # the cache's is another
                model, side, source = load_or_train(kind, args, data, info, force=True, stop=check, curves=curves)
        sha = sha256(flax.serialization.to_bytes(model))
        if saved and saved[kind]["sha256"] != sha:
            raise ILQError(
                f"--resume {run_dir}: its {kind} model {own} is gone, and the one made again from the run's settings "
                f"differs (SHA-256 {sha[:12]}, the run started with {saved[kind]['sha256'][:12]}: trained on another "
                "device or version). Restore the file, or start a new run (nothing else was changed in the run folder)."
            )
        if not (saved and os.path.exists(own)):
            side = write_model(own, model, side)
        records[kind] = dict(sha256=sha, file=own, source=source, **{k: side[k] for k in ("config", "trained", "metrics")})
        models.append(model)
    dynamics, behavior = models
    behavior = behavior.replace(mish=mish_one_exp)  # the values of jax.nn.mish, faster on a CPU
    if args.bf16_models:  # their activations in bfloat16 (half the bytes); the learners, targets and losses stay float32
        dynamics, behavior = dynamics.replace(dtype=jnp.bfloat16), behavior.replace(dtype=jnp.bfloat16)
    bank = None
    if args.behavior_bank and any(METHODS[m][1] for m in methods):
        t0 = time.time()
        bank = make_behavior_bank(behavior, data.observations, args.num_behavior_samples, args.pretrain_seed)
        print(f"[models] behaviour bank: {bank.shape[0]} states x {bank.shape[1]} actions in {time.time() - t0:.1f}s")
    return Frozen(data, dynamics, behavior), bank, records, curves


# ------------------------------------------------------------------------------ the update of every learner of a run
def method_configs(cfg: ILQConfig, methods) -> tuple:
    """One ILQConfig per method: cfg with that method's imagination / limitation."""
    return tuple(dataclasses.replace(cfg, imagination=METHODS[m][0], limitation=METHODS[m][1]) for m in methods)


def method_rows(g: int, n_learners: int, n_methods: int) -> slice:
    """Method g's learners on the learner axis of a run: method-major, learner g * seeds + i is seed i of method g.
    The one place that says so (the update, the logs, the summary)."""
    seeds = n_learners // n_methods
    return slice(g * seeds, (g + 1) * seeds)


def make_learners_update(cfg: ILQConfig, methods: tuple, sample_chunk: int = 1):
    """The update train() runs: Part I's ilq_update for every (method, seed) learner of a run on one learner axis
    (method_rows), many updates per jitted call, the state donated: update(state, frozen, bank, keys (L, n, 2)) ->
    (state, metrics (L, n)). Two speed-ups that change no value: Eq. 20's behaviour actions of `sample_chunk` updates
    are drawn in one batched diffusion chain before them (or looked up in the behaviour bank), as ilq_update would
    draw them, from each update's key alone; and with several methods each method's block computes its own minibatches
    and targets (ilb_step), then every learner learns at once (learn), a block without a diagnostic getting NaN."""
    groups = method_configs(cfg, methods)

    def behavior_actions(c: ILQConfig, frozen: Frozen, bank, keys):  # keys (..., 2) -> (..., B, M, act), or None
        if not c.limitation or (bank is None and sample_chunk == 1):
            return None
        idx, k_beh, _, _ = jax.vmap(partial(minibatch_draws, c, frozen))(keys.reshape(-1, keys.shape[-1]))
        if bank is None:
            sample = jax.vmap(partial(diffusion_sample, frozen.behavior), in_axes=(0, 0, None))
            a_beh = sample(frozen.data.observations[idx], k_beh, c.num_behavior_samples)
        else:
            a_beh = bank[idx]
        return a_beh.reshape(keys.shape[:-1] + a_beh.shape[1:])

    def one_update(state: ILQState, frozen: Frozen, keys, a_beh: list):  # keys (L, 2): one update of every learner
        if len(groups) == 1:
            return jax.vmap(partial(ilq_update, groups[0]), in_axes=(0, None, 0, 0))(state, frozen, keys, a_beh[0])
        blocks = []
        for g, c in enumerate(groups):  # method g's targets on its block of learners only
            rows = method_rows(g, len(keys), len(groups))
            step = jax.vmap(partial(ilb_step, c), in_axes=(0, None, 0, 0))
            batch, targets, k_actor = step(jax.tree_util.tree_map(lambda x: x[rows], state), frozen, keys[rows], a_beh[g])
            blocks.append((batch, targets._replace(y_img=None, y_lmt=None), k_actor, jax.vmap(target_metrics)(targets)))
        batch, targets, k_actor = jax.tree_util.tree_map(lambda *x: jnp.concatenate(x), *[b[:3] for b in blocks])
        state, metrics = jax.vmap(partial(learn, cfg))(state, batch, targets, k_actor)
        for name in set().union(*(b[3] for b in blocks)):
            metrics[name] = jnp.concatenate([b[3].get(name, jnp.full(len(b[2]), jnp.nan)) for b in blocks])
        return state, metrics

    def chunk(state: ILQState, frozen: Frozen, bank, keys):  # keys (L, C, 2): C updates of every learner
        a_beh = [behavior_actions(c, frozen, bank, keys[method_rows(g, len(keys), len(groups))]) for g, c in enumerate(groups)]
        swap = lambda x: None if x is None else x.swapaxes(0, 1)  # noqa: E731
        return jax.lax.scan(lambda s, x: one_update(s, frozen, *x), state, (swap(keys), [swap(a) for a in a_beh]))

    def update_many(state: ILQState, frozen: Frozen, bank, keys):  # keys (L, n, 2) -> metrics (L, n)
        full, parts = keys.shape[1] // sample_chunk * sample_chunk, []
        if full:
            chunks = keys[:, :full].reshape(keys.shape[0], -1, sample_chunk, keys.shape[-1]).swapaxes(0, 1)
            state, metrics = jax.lax.scan(lambda s, k: chunk(s, frozen, bank, k), state, chunks)
            parts.append(jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), metrics))
        if full < keys.shape[1]:  # a call that is no multiple of the chunk: the rest as one shorter chunk
            state, metrics = chunk(state, frozen, bank, keys[:, full:])
            parts.append(metrics)
        return state, jax.tree_util.tree_map(lambda *x: jnp.concatenate(x).swapaxes(0, 1), *parts)

    return jax.jit(update_many, donate_argnums=0)


# -------------------------------------------------------------------------- Algorithm 1, lines 4-12: the training loop
def train(args: Args) -> dict:
    """Algorithm 1 as a run, top to bottom: settings and dataset, the frozen models (lines 2-3), then calls of fused
    updates of every (method, seed) learner (lines 4-12), each followed by its logs, an evaluation when due, a
    checkpoint when due and the stop conditions; summary.json at the end."""
    t_invocation = time.time()
    # --- settings and dataset: every check that needs no model, before minutes of pretraining ---
    budget_given = args.budget is not None or args.resume
    args = resolve_args(resume_args(args) if args.resume else args)
    if not budget_given:
        print(f"[ilq] budget '{args.budget}': {default_budget(args.env_id)[1]} (--budget cpu|paper chooses)")
    data, info = load_dataset(args)
    print(describe_dataset(data, info))
    if len(data.rewards) < max(args.batch_size, 10):
        raise ILQError(
            f"Dataset '{info.name}' has {len(data.rewards)} usable transitions, fewer than a minibatch ({args.batch_size}) "
            "or the 10 the dynamics holdout needs: ILQ cannot learn from it."
        )
    hp, cfg = effective_hparams(args, info), learner_config(args, info)
    over = f" (overridden by flags: {', '.join(hp['overridden'])})" if hp["overridden"] else ""
    print(
        f"[ilq] {hp['source']}; effective: eta {hp['eta']}, delta {hp['delta']}, penalty {hp['penalty_coef']}, lr critic "
        f"{hp['critic_lr']} / actor {hp['actor_lr']}, entropy {hp['entropy']}, cosine lr {hp['cosine_lr']}{over}"
    )
    methods, seeds = learner_methods(args), list(range(args.seed, args.seed + args.num_seeds))
    learners = [(m, s) for m in methods for s in seeds]  # the learner axis: method-major (method_rows)
    name = args.run_name or f"{slug(info.name)}__{'+'.join(methods)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or os.path.join("runs", name)
    behavior = "bank" if args.behavior_bank else f"fresh samples every update, drawn {args.sample_chunk} updates at a time"
    print(
        f"[ilq] {args.total_steps} updates, eval every {args.eval_interval} ({args.eval_episodes} episodes), checkpoint "
        f"every {args.checkpoint_interval}, M={args.num_behavior_samples}, OOD actions/state {args.num_ood_actions}, "
        f"behaviour {behavior}; method{'s' if len(methods) > 1 else ''} {', '.join(methods)} x "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; run folder {run_dir}"
    )
    make_env(info, 1).close()  # a mismatched env fails before any training
    seed_bytes = memory_check(cfg, args, info, len(data.rewards), len(learners))
    # learner (m, s) starts as the single run of method m with --seed s would: init and update keys from s alone
    seed_keys = jnp.stack([jax.random.PRNGKey(s) for _, s in learners])
    template = jax.eval_shape(jax.vmap(partial(init_train_state, cfg)), seed_keys)

    with deferred_signals() as stop, contextlib.ExitStack() as on_exit:  # closes the folder lock, logs, workers
        # --- the run folder: taken (locked) before minutes of pretraining; a new one is removed if training never starts ---
        try:
            os.makedirs(run_dir, exist_ok=bool(args.resume))
        except FileExistsError:  # an old run, or one another process just started
            raise ILQError(f"Run folder {run_dir} already exists; pick another --run-name or --resume {run_dir}.") from None
        on_exit.callback(lock_run_folder(run_dir).close)
        if not args.resume:
            on_exit.callback(remove_if_never_trained, run_dir)
        progress, state = read_checkpoint(run_dir, template) if args.resume else (new_progress(len(learners)), None)
        dataset = dict(name=info.name, fingerprint=info.fingerprint)  # what the run trains on
        if args.resume:
            if progress["updates"] >= args.total_steps:
                return finished_run(args, info, methods, seeds, run_dir, progress, seed_bytes)
            same_dataset(run_dir, progress["inputs"]["dataset"], dataset)

        # --- Algorithm 1, lines 2-3: the frozen models (cached, or pretrained now; stoppable between jitted calls) ---
        frozen, bank, models, curves = pretrained_models(args, data, info, methods, stop, run_dir, progress["inputs"])
        # --- Algorithm 1, line 1: the learners, on the devices; the update of every (method, seed) learner ---
        state = jax.vmap(partial(init_train_state, cfg))(seed_keys) if state is None else state
        run_keys = jnp.stack([jax.random.fold_in(k, 1) for k in seed_keys])
        state, frozen, run_keys = shard_learners(state, frozen, run_keys, len(learners))
        update = make_learners_update(cfg, methods, args.sample_chunk)
        # the key of update u depends on u alone, so calls of any length (and resumes) give the same learner
        update_keys = jax.jit(jax.vmap(lambda rk, us: jax.vmap(partial(jax.random.fold_in, rk))(us), in_axes=(0, None)))
        print(f"[ilq] {len(learners)} learner(s) in one jitted call; train state {seed_bytes / 2**20:.1f} MiB per learner")

        # --- the run's record (run.json, written at every start), a new run's settings, its checkpoint at update 0 (a
        # run folder always has one) and pretraining curves; then the learners' logs and the evaluator ---
        progress["invocations"].append(invocation())
        if not args.resume:
            progress.update(inputs=dict(dataset=dataset, **models), record=run_record(args, info, cfg, methods, seeds))
            _atomic_write(os.path.join(run_dir, "args.json"), json.dumps(dataclasses.asdict(args), indent=2).encode())
            save_checkpoint(run_dir, state, progress)
            tensorboard_writer(os.path.join(run_dir, "pretrain"), curves).close()
        _atomic_write(os.path.join(run_dir, "run.json"), json.dumps(run_json(progress), indent=2).encode())
        log = on_exit.enter_context(contextlib.closing(RunLog(run_dir, methods, seeds, args.total_steps)))
        workers = args.eval_workers if args.eval_workers is not None else int(jax.default_backend() != "cpu")
        evaluator = Evaluator(info, cfg, len(learners), args.eval_episodes, workers, run_dir)
        on_exit.callback(evaluator.close)
        videos = VideoRecorder(args, info, cfg, methods, len(learners), run_dir)  # --capture-video (else it does nothing)
        wall_before, start = progress["wall_time_s"], progress["updates"]
        while progress["updates"] < args.total_steps:
            # --- one call: up to --updates-per-call updates, ending at the next evaluation, checkpoint or stop ---
            u0, every = progress["updates"], (args.eval_interval, args.checkpoint_interval)
            ends = [u0 + args.updates_per_call, args.total_steps, *[(u0 // k + 1) * k for k in every]]
            n = min(ends + ([start + args.stop_after] if args.stop_after else [])) - u0
            t0 = time.time()
            state, metrics = update(state, frozen, bank, update_keys(run_keys, jnp.arange(u0, u0 + n)))
            metrics = jax.device_get(metrics)  # (learners, n) each
            seconds = time.time() - t0

            # --- log: a non-finite value stops the run; TensorBoard per learner; a progress line every 30 s ---
            check_finite(metrics, u0 + 1, run_dir, [f"{m} seed {s}" for m, s in learners])
            progress["updates"] = step = u0 + n
            progress["train_time_s"] += seconds
            # Q(data) of each update, summed in order in float64: the same curve however the updates were split into calls
            q_sums = np.add.accumulate(np.c_[progress["q_data_sum"], metrics["losses/q_data"]], axis=1, dtype=np.float64)
            progress["q_data_sum"], progress["q_data_count"] = q_sums[:, -1].tolist(), progress["q_data_count"] + n
            log.updates(step, metrics, n / seconds, progress["train_time_s"])

            # --- evaluate a snapshot when due (in worker processes with --eval-workers: training goes on) ---
            evaluated = step % args.eval_interval == 0 or step == args.total_steps
            if evaluated:
                index = len(progress["eval_steps"]) + len(evaluator.pending)
                seeds_e = evaluation_seeds(args.eval_seed, index, args.eval_episodes, len(learners))
                q_data = (np.asarray(progress["q_data_sum"]) / progress["q_data_count"]).tolist()  # since the last one
                progress.update(q_data_sum=[0.0] * len(learners), q_data_count=0)
                evaluator.submit(step, state.actor.params, seeds_e, q_data)

            # --- the stop conditions: a signal, the end, the time box (at an evaluation), --stop-after ---
            boxed = args.time_box_min and time.time() - t_invocation > 60 * args.time_box_min
            ending = "interrupted" if stop["signal"] else "done" if step == args.total_steps else None
            ending = ending or ("time box" if boxed and step % args.eval_interval == 0 else None)
            ending = ending or ("stopped (--stop-after)" if args.stop_after and step - start >= args.stop_after else None)
            if evaluated and ending != "interrupted":  # videos of the snapshot just evaluated, before the state is donated
                videos(index, step, state.actor.params, last=ending in ("done", "time box"))

            # --- finished evaluations in order; a checkpoint when due holds every evaluation up to it ---
            due = bool(ending) or step % args.checkpoint_interval == 0
            for at, returns, q_data in evaluator.ready(wait=due):
                norm = info.normalize(returns)
                progress["eval_steps"].append(at)
                progress["returns"].append(returns.tolist())
                progress["normalized_scores"].append(None if norm is None else norm.mean(1).tolist())
                progress["q_data"].append(q_data)  # the over-optimism diagnostic (Fig. 10)
                log.evaluation(at, returns, norm)
            if due:
                progress["wall_time_s"] = wall_before + time.time() - t_invocation
                save_checkpoint(run_dir, state, progress)
            if ending in ("interrupted", "stopped (--stop-after)"):
                print(f"[ilq] {ending} at update {step}; checkpoint saved. Continue: python ilq_jax.py --resume {run_dir}")
                if stop["signal"]:
                    raise Interrupted(stop["signal"])
                return {}
            if ending == "time box":
                print(f"[ilq] time box of {args.time_box_min} min reached at update {step} of {args.total_steps}")
                break
    return write_summary(args, info, methods, seeds, run_dir, progress, seed_bytes)


def run_record(args: Args, info: DatasetInfo, cfg: ILQConfig, methods: tuple, seeds: list) -> dict:
    """What a run is, fixed when it starts (run.json, summary.json): the dataset, the evaluation protocol, the
    effective hyper-parameters, the learners' ILQConfig, the methods and seeds."""
    norm = info.normalize(info.episode_returns)
    dataset = {k: getattr(info, k) for k in (*DatasetInfo.RECORDED, "fingerprint")}
    dataset.update(episodes=len(info.episode_returns), mean_return=float(info.episode_returns.mean()))
    dataset.update(mean_normalized_return=None if norm is None else float(norm.mean()))
    starts = "episode e of evaluation i (0, 1, ...) starts from eval_seed + i * episodes + e, for every learner"
    evaluation = dict(env=info.eval_env.id, env_note=info.eval_env.note, env_spec=info.eval_env.spec, start_seeds=starts)
    evaluation.update(episodes=args.eval_episodes, interval=args.eval_interval, eval_seed=args.eval_seed)
    hp = {k: v for k, v in effective_hparams(args, info).items() if k != "overridden"}
    protocol = dict(
        methods=list(methods), seeds=seeds, learner_axis="method-major: learner g * seeds + i is seed i of method g"
    )
    return dict(dataset=dataset, evaluation=evaluation, hyperparameters=hp, config=dataclasses.asdict(cfg), protocol=protocol)


def run_json(progress: dict) -> dict:
    """run.json: the record, what the run trains on (the dataset's fingerprint, each model's file, SHA-256, settings and
    training), every invocation (command, git commit, time)."""
    return dict(progress["record"], inputs=progress["inputs"], invocations=progress["invocations"])


# -------------------------------------------------------------------------------------------- evaluation of a snapshot
def evaluate(envs, policy, params, seed) -> np.ndarray:
    """One episode per vectorised env with the deterministic action tanh(mean); returns (num_envs,) returns.
    seed: an int (env i starts from seed + i) or a list with one seed per env."""
    obs, _ = envs.reset(seed=seed)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    returns, done = np.zeros(envs.num_envs), np.zeros(envs.num_envs, bool)
    while not done.all():
        obs, reward, term, trunc, _ = envs.step(np.clip(np.asarray(policy(params, jnp.asarray(flatten_obs(obs)))), low, high))
        returns += np.where(done, 0.0, reward)
        done |= term | trunc
    return returns


def evaluation_seeds(eval_seed: int, index: int, episodes: int, num_seeds: int) -> list:
    """Fresh start states at every evaluation: episode e of evaluation `index` (0, 1, ...) starts from
    eval_seed + index * episodes + e, the same states for every learner seed of the batch."""
    return [eval_seed + index * episodes + e for _ in range(num_seeds) for e in range(episodes)]


def learners_policy(cfg: ILQConfig, n_learners: int, episodes: int):
    """The deterministic policies of n learners at once: obs (n * episodes, obs) -> actions, learner-major."""
    act = jax.vmap(partial(deterministic_action, cfg.actor))
    return jax.jit(lambda p, o: act(p, o.reshape(n_learners, episodes, -1)).reshape(n_learners * episodes, -1))


# --------------------------------------------------------------------------------------------------------- the summary
def new_progress(n_learners: int = 0) -> dict:
    """The progress record of a run, saved in every checkpoint: updates done, the evaluations so far, times, each
    learner's sum of Q(data) since the last evaluation, the run's record and its invocations."""
    times = dict(train_time_s=0.0, wall_time_s=0.0, q_data_sum=[0.0] * n_learners, q_data_count=0, invocations=[], record={})
    return dict(updates=0, eval_steps=[], returns=[], normalized_scores=[], q_data=[], inputs={}, **times)


def spread(values) -> str:
    """mean +- the sample std (ddof=1) of one value per seed, as the console shows it."""
    return f"{np.mean(values):7.2f}" + (f" +- {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def summarize(progress: dict, seeds: list, rows: slice) -> dict:
    """One method's learners (rows of the learner axis, one per seed): per seed the mean of the last 10 evaluations
    (never the best); then the mean and the sample std (ddof=1) over seeds."""
    window = progress["eval_steps"][-10:]
    per_seed = []
    for i, seed in zip(range(rows.start, rows.stop), seeds):
        scores = [e[i] for e in progress["normalized_scores"] if e is not None]
        per_seed.append(dict(seed=seed, final_normalized_score=float(np.mean(scores[-10:])) if scores else None))
        per_seed[-1]["final_return"] = float(np.mean([np.mean(r[i]) for r in progress["returns"][-10:]]))
        per_seed[-1]["normalized_scores"] = [None if e is None else e[i] for e in progress["normalized_scores"]]
        per_seed[-1].update(returns=[r[i] for r in progress["returns"]], q_data=[q[i] for q in progress["q_data"]])
    out = dict(evaluation_window=dict(last=len(window), updates=window), std="sample std over seeds (ddof=1)")
    for key in ("final_normalized_score", "final_return"):
        finals = [p[key] for p in per_seed if p[key] is not None]
        out[key] = float(np.mean(finals)) if finals else None
        out[key + "_std"] = float(np.std(finals, ddof=1)) if len(finals) > 1 else None
    return dict(out, seeds=per_seed)


def write_summary(
    args: Args, info: DatasetInfo, methods: tuple, seeds: list, run_dir: str, progress: dict, state_bytes: int
) -> dict:
    """summary.json of a finished (or time-boxed) run: per method and per seed the final score (mean of the last 10
    evaluations), mean and sample std over seeds, the evaluation window; the run's record (dataset, protocol,
    hyper-parameters, models, commands and git commits), speed, wall time over every invocation, versions. A
    one-method run also has that method's numbers at the top level."""
    n = len(seeds)
    per_method = {m: summarize(progress, seeds, method_rows(g, len(methods) * n, len(methods))) for g, m in enumerate(methods)}
    summary = dict(per_method[methods[0]]) if len(methods) == 1 else {}
    summary.update(methods=per_method, num_seeds=n, learners=len(methods) * n, eval_steps=progress["eval_steps"])
    summary.update(updates=progress["updates"], ended_by_time_box=progress["updates"] < args.total_steps)
    summary.update(dataset_mean_normalized_return=progress["record"]["dataset"]["mean_normalized_return"])
    summary.update(dataset_mean_return=progress["record"]["dataset"]["mean_return"], **run_json(progress))
    summary.update(updates_per_second=progress["updates"] / progress["train_time_s"], train_time_s=progress["train_time_s"])
    summary.update(wall_time_s=progress["wall_time_s"], train_state_bytes_per_seed=int(state_bytes))
    summary.update(args=dataclasses.asdict(args), versions=package_versions(), devices=[str(d) for d in jax.devices()])
    _atomic_write(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    for m, s in per_method.items():
        if s["final_normalized_score"] is not None:
            spread_ = f" +- {s['final_normalized_score_std']:.2f} (sample std, ddof=1, over {n} seeds)" if n > 1 else ""
            print(
                f"[ilq] {m}: final normalised score (mean of the last {s['evaluation_window']['last']} evaluations) "
                f"{s['final_normalized_score']:.2f}{spread_} | dataset mean normalised return "
                f"{summary['dataset_mean_normalized_return']:.2f}"
            )
    advice = f"redraw it with python ilq_jax.py --plot {run_dir}"
    drawn = optional_output("curves.png was not drawn", advice, plot_curves, summary, os.path.join(run_dir, "curves.png"))
    print(f"[ilq] results: {run_dir}/summary.json" + (", curves.png (learning curves)" if drawn else ""))
    return summary


# ------------------------------------------------------------------------------------------- after training: a policy
class Policy:
    """The deterministic policy tanh(mean) of one learner of a run: policy(obs) -> action for one observation or a
    batch (Dict observations flattened as in training), jitted; policy.env() makes the run's evaluation env."""

    def __init__(self, cfg: ILQConfig, actor_params, eval_env: EvalEnv, method: str, seed: int, updates: int):
        self.params, self.env, self.method, self.seed, self.updates = actor_params, eval_env.make, method, seed, updates
        self.act = jax.jit(partial(deterministic_action, cfg.actor))

    def __call__(self, obs) -> np.ndarray:
        x = jnp.asarray(flatten_obs(obs))
        return np.asarray(self.act(self.params, x[None]))[0] if x.ndim == 1 else np.asarray(self.act(self.params, x))


def load_policy(run_dir: str, method: Optional[str] = None, seed: Optional[int] = None) -> Policy:
    """The policy of one learner of the run in run_dir (runs/<run-name>, finished or stopped: its checkpoint):
    method and seed name it (None: the run's first). policy(obs) -> action; policy.env() is the run's evaluation env."""
    cfg, progress, state, info = read_run(run_dir)
    methods, seeds = progress["record"]["protocol"]["methods"], progress["record"]["protocol"]["seeds"]
    method, seed = method or methods[0], seeds[0] if seed is None else seed
    if method not in methods or seed not in seeds:
        raise ILQError(f"{run_dir} trained methods {methods} with seeds {seeds}; it has no learner {method} seed {seed}.")
    row = methods.index(method) * len(seeds) + seeds.index(seed)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x[row]), state.actor.params)
    return Policy(cfg, params, info.eval_env, method, seed, progress["updates"])


def evaluate_run(args: Args, eval_seed: Optional[int]) -> dict:
    """python ilq_jax.py --evaluate RUN: every learner of the run's checkpoint for --eval-episodes episodes, episode e
    from eval_seed + e (None: the run's --eval-seed), in the run's evaluation env or --eval-env-id, filmed with
    --capture-video; RUN/evaluation-<time>.json holds it, the run's own files stay untouched."""
    cfg, progress, state, info = read_run(args.evaluate, args.eval_env_id)
    methods, seeds = progress["record"]["protocol"]["methods"], progress["record"]["protocol"]["seeds"]
    n, episodes = len(methods) * len(seeds), args.eval_episodes
    start = progress["record"]["evaluation"]["eval_seed"] if eval_seed is None else eval_seed
    print(f"[ilq] evaluating {n} learner(s) of {args.evaluate} at update {progress['updates']}: {episodes} episodes each "
          f"on {info.eval_env.id}, start seeds {start}..{start + episodes - 1}")  # fmt: skip
    with contextlib.closing(make_env(info, n * episodes)) as envs:
        returns = evaluate(
            envs, learners_policy(cfg, n, episodes), state.actor.params, evaluation_seeds(start, 0, episodes, n)
        )
    returns, stamp = returns.reshape(n, episodes), time.strftime("%Y%m%d-%H%M%S")
    norm = info.normalize(returns)
    one = dict(eval_steps=[progress["updates"]], returns=[returns.tolist()], q_data=[[None] * n])  # as one evaluation
    one.update(normalized_scores=[None if norm is None else norm.mean(1).tolist()])
    out = dict(run=args.evaluate, updates=progress["updates"], env=info.eval_env.id, env_note=info.eval_env.note)
    out.update(episodes=episodes, start_seeds=list(range(start, start + episodes)), invocation=invocation())
    out.update(versions=package_versions(), methods={})
    for g, m in enumerate(methods):
        out["methods"][m] = summarize(one, seeds, method_rows(g, n, len(methods)))
        finals = [p["final_return" if norm is None else "final_normalized_score"] for p in out["methods"][m]["seeds"]]
        print(f"[ilq] {m}: {'return' if norm is None else 'normalised score'} {spread(finals)} over {len(seeds)} seed(s)")
    videos = VideoRecorder(
        dataclasses.replace(args, capture_video_every=None, eval_seed=start), info, cfg, methods, n, args.evaluate
    )
    videos(0, progress["updates"], state.actor.params, last=True, tag=f"-evaluate-{stamp}")
    path = os.path.join(args.evaluate, f"evaluation-{stamp}.json")
    _atomic_write(path, json.dumps(out, indent=2).encode())
    print(f"[ilq] {path}")
    return out


# ---------------------------------------------------------------------------------------------------- the command line
MAY_ADD = {  # the modes that read a run folder, and the only flags that may come with each (they change no learner)
    "resume": ("stop_after", "time_box_min", "eval_workers"),
    "evaluate": ("eval_episodes", "eval_env_id", "eval_seed", "capture_video"),
    "plot": (),
}


def refuse_flags(mode: str, given: list) -> None:
    """--resume, --evaluate and --plot read a run folder: refused with any flag but the few each may take."""
    if extra := [f for f in given if f not in map(flag, (mode, *MAY_ADD[mode]))]:
        also = f"; it may take {', '.join(map(flag, MAY_ADD[mode]))}" if MAY_ADD[mode] else ""
        advice = " (to evaluate its policies again: --evaluate RUN; to train longer: a new run)" if mode == "resume" else ""
        raise ILQError(f"{flag(mode)} reads a run folder with its saved settings: drop {', '.join(extra)}{also}{advice}.")


def parse_args(argv: list) -> Args:
    """The command line as Args; --resume, --evaluate and --plot refuse every other flag but the few each may take,
    even one given its default."""
    given = sorted({a.split("=")[0] for a in argv if a.startswith("--")})
    for mode in MAY_ADD:
        if flag(mode) in given:
            refuse_flags(mode, given)
    return parse_flags(Args, argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)

    def command():
        args = parse_args(argv)
        if args.plot:
            return redraw_curves(args.plot)
        if args.evaluate:
            return evaluate_run(args, args.eval_seed if "--eval-seed" in {a.split("=")[0] for a in argv} else None)
        train(args)

    run_cli(command)


# ======================================================================================================================
# Part III — appendix: offline-RL plumbing, no ILQ inside
# ======================================================================================================================


# A reader of the algorithm may stop here: what follows reads datasets (D4RL's HDF5 files and their download, Minari,
# data generated here), builds the evaluation envs where D4RL's data were recorded, and keeps the files of models and
# runs (checkpoints, resume, the run-folder lock, signals, atomic writes), TensorBoard logs and evaluation workers.
import difflib
import hashlib
import inspect
import multiprocessing
import re
import signal
import subprocess
import urllib.request
import warnings


# -------------------------------------------------------------------------------------------------- errors and signals
class ILQError(Exception):
    """A problem the user can fix: main() prints it as one paragraph, without a traceback."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@contextlib.contextmanager
def errors_as(what: str, advice: str):
    """The one error path of the data, model and run-file layers: any library error inside (h5py, Minari, urllib,
    JSON, msgpack, Gymnasium) becomes one ILQError "<what> (<error>). <advice>" with the library's whole message;
    ILQErrors and Ctrl-C pass unchanged."""
    try:
        yield
    except ILQError:
        raise
    except Exception as e:
        raise ILQError(f"{what} ({type(e).__name__}: {e}). {advice}") from None


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (SLURM, docker stop, timeout) ended the command: after a checkpoint in training, else
    where it came. Like KeyboardInterrupt no `except Exception` (errors_as, a library's) stops it: every cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def deferred_signals():
    """Ctrl-C and SIGTERM set a flag that the loop reads between jitted calls (checkpoint, one line, exit code 128 +
    the signal). A second one ends the process at once with that exit code, without unwinding through a jitted call
    (raising inside JAX's dispatch could crash the interpreter): the last checkpoint stays the run's."""
    stop = {"signal": None}

    def handler(signum, frame):
        if stop["signal"] is not None:
            print(f"[ilq] {signal.Signals(signum).name} again: exit code {128 + signum}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
        stop["signal"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_cli(fn, *args) -> None:
    """Run fn(*args) as a command: an ILQError or an OS error (full disk, read-only folder) prints one paragraph (exit
    code 2), an interrupt one line (exit code 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM). SIGTERM raises
    Interrupted as Ctrl-C raises KeyboardInterrupt (until deferred_signals), so no half-made file stays behind."""

    def terminate(signum, frame):
        raise Interrupted(signum)

    old = signal.signal(signal.SIGTERM, terminate)
    try:
        fn(*args)
    except ILQError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(
            f"error: {e.strerror or e} ({e.filename or 'a file'}). Free disk space or use a writable folder.", file=sys.stderr
        )
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"[ilq] interrupted ({signal.Signals(signum).name}); exit code {128 + signum}", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------------------------------------------------ datasets
@dataclass
class DatasetInfo:
    name: str  # the dataset's id (a generated dataset: the id it is stored under)
    source: str  # where the data came from, in words
    task: Optional[str]  # D4RL-style task name for the paper's hyper-parameters, e.g. "hopper-medium"
    family: str  # termination-function family: hopper | walker2d | halfcheetah | maze2d | pen | none
    eval_env: EvalEnv  # where its policies are evaluated (D4RL names: where their data were recorded)
    ref_min: Optional[float]
    ref_max: Optional[float]
    obs_dim: int
    act_dim: int
    episode_returns: np.ndarray
    fingerprint: str
    RECORDED: ClassVar = ("name", "source", "task", "family", "ref_min", "ref_max", "obs_dim", "act_dim")  # in run.json

    def normalize(self, returns):
        """D4RL's normalised score 100 * (R - random) / (expert - random); None without reference scores."""
        if self.ref_min is None or self.ref_max is None:
            return None
        return 100.0 * (np.asarray(returns, dtype=np.float64) - self.ref_min) / (self.ref_max - self.ref_min)


D4RL_REF_SCORES = {  # d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE (v1/v2 reuse v0's)
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "maze2d-umaze": (23.85, 161.86),
    "maze2d-medium": (13.13, 277.39),
    "maze2d-large": (6.7, 273.99),
    "maze2d-umaze-dense": (68.537689, 193.66285642381482),
    "maze2d-medium-dense": (44.264742, 297.4552547777125),
    "maze2d-large-dense": (30.569041, 303.4857382709002),
    "pen": (96.262799, 3076.8331017826877),
}
D4RL_SIZES = {"hopper": (11, 3), "walker2d": (17, 6), "halfcheetah": (17, 6), "maze2d": (4, 2), "pen": (45, 24)}
GENERATED_DATA_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}  # random-v0
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/"
D4RL_NAMES = (
    [f"{e}-{k}" for e in GENERATED_DATA_ENVS for k in ("random", "medium", "medium-replay", "medium-expert", "expert")]
    + [f"maze2d-{m}{d}" for m in ("umaze", "medium", "large") for d in ("", "-dense")]
    + ["pen-human", "pen-cloned"]
)
LOCAL_NAMESPACE = "ilq-local"  # Minari namespace of datasets made here (never D4RL data)
LOCAL_RE = re.compile(LOCAL_NAMESPACE + r"/(hopper|walker2d|halfcheetah)/(random|medium|medium-replay)-v\d+")


def d4rl_source(task: str, version: Optional[str]) -> tuple[str, str]:
    """(download URL, cache file name) of a D4RL task, with the paper's versions as default."""
    if task.startswith("maze2d"):
        fname = f"maze2d-{task.split('-')[1]}-{'dense' if task.endswith('-dense') else 'sparse'}-{version or 'v1'}.hdf5"
        return D4RL_URL + "maze2d/" + fname, fname
    if task.startswith("pen"):
        if (version or "v0") == "v0":
            fname = {"pen-human": "pen-v0_demos_clipped.hdf5", "pen-cloned": "pen-demos-v0-bc-combined.hdf5"}[task]
            return D4RL_URL + "hand_dapg/" + fname, fname
        return D4RL_URL + f"hand_dapg_{version}/{task}-{version}.hdf5", f"{task}-{version}.hdf5"
    if version == "v0":  # D4RL's first release: gym_mujoco/<robot>_<kind>.hdf5, medium-replay named "mixed"
        robot, kind = task.split("-", 1)
        kind = "mixed" if kind == "medium-replay" else kind.replace("-", "_")
        fname = f"{'walker' if (robot, kind) == ('walker2d', 'mixed') else robot}_{kind}.hdf5"
        return D4RL_URL + "gym_mujoco/" + fname, fname
    fname = f"{task.replace('-', '_')}-{version or 'v2'}.hdf5"
    return D4RL_URL + f"gym_mujoco_{version or 'v2'}/" + fname, fname


def parse_d4rl_name(env_id: str) -> Optional[tuple[str, Optional[str]]]:
    m = re.fullmatch(r"(.+?)(?:-(v\d))?", env_id)
    return (m.group(1), m.group(2)) if m and m.group(1) in D4RL_NAMES else None


def family_of(name: str) -> str:
    keys = {"hopper": ("hopper",), "walker2d": ("walker",), "halfcheetah": ("cheetah",), "maze2d": ("maze2d", "pointmaze")}
    return next((fam for fam, ks in {**keys, "pen": ("pen",)}.items() if any(k in name.lower() for k in ks)), "none")


def _fingerprint(arrays: dict) -> str:
    h = hashlib.sha1()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def _episode_returns(rewards: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sum rewards per episode; `ends` marks the last step of each episode (the tail counts too)."""
    starts = np.r_[0, np.flatnonzero(ends[:-1]) + 1]
    return np.add.reduceat(rewards, starts) if len(rewards) else np.zeros(0)


def validate_arrays(arrays: dict, name: str) -> None:
    """Refuse data the learner would silently mis-handle."""
    for k in ("observations", "actions", "rewards", "next_observations"):
        bad = ~np.isfinite(arrays[k])
        if bad.any():
            raise ILQError(
                f"Dataset '{name}' has {int(bad.sum())} NaN/inf values in `{k}` (first at transition "
                f"{int(np.argwhere(bad)[0][0])}). Clean or drop those transitions; ILQ cannot learn from non-finite data."
            )
    amax = float(np.abs(arrays["actions"]).max(initial=0.0))
    if amax > 1.0 + 1e-4:
        raise ILQError(
            f"Dataset '{name}' has actions outside [-1, 1] (max |a| = {amax:.4g}). ILQ's tanh policy and diffusion sampler "
            "act in [-1, 1]: rescale the dataset's actions to that box (and the environment's action space with them)."
        )
    if len(arrays["rewards"]) == 0:
        raise ILQError(f"Dataset '{name}' holds no transitions.")


def read_d4rl_hdf5(path: str, advice: str = "Delete it and download it again.") -> dict:
    """Transitions of a D4RL-format HDF5 file, refused unless its arrays are numeric, one row per transition and its
    flags 0/1. Without next_observations the successor is obs[i+1], so rows whose successor is unknown (timeouts, a
    final row that is not terminal) are dropped, as D4RL's qlearning_dataset drops timeouts (without `timeouts` it
    guesses them from the env's time limit). advice: what to do with a damaged file."""
    import h5py

    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    if os.path.exists(path) and not os.path.isfile(path):  # open() of a FIFO would wait for a writer forever
        kind = "a directory" if os.path.isdir(path) else "a special file (a FIFO, a socket or a device)"
        raise ILQError(f"'{path}' is {kind}, not a regular file: give the path of the D4RL HDF5 file itself.")
    with errors_as(f"'{path}' cannot be read", "Make it readable by this user, or pass a readable copy with --dataset-path."):
        open(path, "rb").close()  # a file that cannot be opened is not called truncated or corrupt
    with errors_as(f"Could not read '{path}' as HDF5", f"The file is truncated or corrupt. {advice}"):
        with h5py.File(path, "r") as f:
            raw = {k: np.asarray(f[k]) for k in keys if k in f}
            label = f.attrs.get("ilq_local_description")  # a file benchmarks/make_datasets.py made (not D4RL data)
    if label is not None:  # made here, never downloaded: remade, not downloaded again
        advice = "It was made locally (not D4RL data): make it again with `python benchmarks/make_datasets.py`."
    unusable = f"'{path}' is not a usable D4RL-format file:"
    if missing := [k for k in keys[:4] if k not in raw]:
        raise ILQError(
            f"'{path}' is not a D4RL-format HDF5 file: it lacks {missing}. Expected: {', '.join(keys)} (the last two optional)"
        )
    if odd := [f"`{k}` has dtype {v.dtype.str}" for k, v in raw.items() if v.dtype.kind not in "biuf"]:
        raise ILQError(f"{unusable} {', '.join(odd)}; every array must hold numbers. {advice}")
    two_d = ("observations", "actions", "next_observations")
    wrong = lambda k, v: v.ndim != 2 if k in two_d else v.ndim == 0 or v.shape[1:] not in ((), (1,))  # noqa: E731
    if bad := [f"`{k}` has shape {v.shape}" for k, v in raw.items() if wrong(k, v)]:
        raise ILQError(
            f"{unusable} {', '.join(bad)}, but rewards, terminals and timeouts hold one value per transition (shape (N,)) "
            f"and the others must be 2-D (transitions x features). {advice}"
        )
    n = len(raw["observations"])
    if any(len(v) != n for v in raw.values()):
        raise ILQError(f"'{path}' is inconsistent: its arrays have lengths { {k: len(v) for k, v in raw.items()} }. {advice}")
    if n == 0 or raw.get("next_observations", raw["observations"]).shape != raw["observations"].shape:
        shapes = {k: v.shape for k, v in raw.items() if k in two_d}
        raise ILQError(
            f"{unusable} its arrays ({shapes}) must be non-empty, next_observations shaped like observations. {advice}"
        )
    if flags := [k for k in ("terminals", "timeouts") if k in raw and not np.isin(raw[k], (0, 1)).all()]:
        raise ILQError(f"{unusable} {flags} must hold 0/1 (or booleans) only. {advice}")
    obs, terminals = raw["observations"].astype(np.float32), raw["terminals"].reshape(-1).astype(bool)
    timeouts = raw.get("timeouts", np.zeros(n)).reshape(-1).astype(bool)
    keep, next_obs = np.ones(n, bool), raw.get("next_observations", obs).astype(np.float32)
    if "next_observations" not in raw:  # a terminal row's successor is masked by (1 - terminal): it keeps itself
        next_obs = np.where(terminals[:, None], obs, np.concatenate([obs[1:], obs[-1:]]))
        keep = terminals | ~timeouts
        keep[-1] = terminals[-1]
        if not keep.any():
            raise ILQError(
                f"'{path}' holds no usable transitions: all its {n} rows were dropped because their successors are "
                "unknown (the file has no next_observations, and every row is a timeout or the last row, not a "
                "termination). Use a file with next_observations, or one whose episodes are longer than one step."
            )
    rewards = raw["rewards"].reshape(-1)
    arrays = dict(observations=obs[keep], actions=raw["actions"][keep].astype(np.float32), next_observations=next_obs[keep])
    arrays.update(rewards=rewards[keep].astype(np.float32), terminals=terminals[keep].astype(np.float32))
    arrays.update(episode_returns=_episode_returns(rewards.astype(np.float64), terminals | timeouts))
    return dict(arrays, local_description=label) if label is not None else arrays


def download_d4rl(url: str, dest: str) -> None:
    """The real D4RL download, to a .part file first, in chunks with a progress line at least every PROGRESS_EVERY_S:
    a broken, short (fewer bytes than its Content-Length) or interrupted download leaves nothing behind."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    print(f"[data] downloading {url} -> {dest}")
    advice = f"Download that file by other means and pass it with --dataset-path, or place it at {dest}."
    try:
        with errors_as(f"Could not download {url}", advice):
            with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
                length = str(getattr(r, "headers", {}).get("Content-Length") or "")
                total, done, t0 = int(length) if length.isdigit() else None, 0, time.time()
                last_print = t0
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if time.time() - last_print >= PROGRESS_EVERY_S:
                        rate = done / max(time.time() - t0, 1e-9)
                        line = f"[data] downloaded {done / 2**20:.1f} MiB"
                        if total:
                            line += f" of {total / 2**20:.1f} MiB ({100 * done / total:.0f} %)"
                        line += f" | {rate / 2**20:.2f} MiB/s"
                        print(line + (f" | time left {(total - done) / max(rate, 1e-9):.0f}s" if total else ""), flush=True)
                        last_print = time.time()
            if total is not None and done != total:
                raise ConnectionError(f"the connection ended after {done} of the {total} bytes announced")
            print(f"[data] downloaded {done / 2**20:.1f} MiB in {time.time() - t0:.0f}s")
            os.replace(part, dest)
    finally:
        if os.path.exists(part):
            os.remove(part)


def load_d4rl(args: Args, task: str, version: Optional[str]) -> tuple[dict, dict]:
    url, fname = d4rl_source(task, version)
    cache = os.path.join(os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets")), fname)
    path = args.dataset_path or cache
    if args.dataset_path and not os.path.exists(path):
        raise ILQError(f"--dataset-path '{path}' does not exist.")
    if not os.path.exists(path) and not args.download:
        raise ILQError(
            f"D4RL dataset '{task}' is not on disk (looked for {cache}) and --no-download is set. Download {url} and "
            f"pass it with --dataset-path, or put it at {cache}."
        )
    if not os.path.exists(path):
        download_d4rl(url, cache)
    # a file the user named is never to be deleted: the advice for a damaged one depends on whose it is
    advice = "Pass an intact copy with --dataset-path." if args.dataset_path else "Delete it and download it again."
    arrays, family = read_d4rl_hdf5(path, advice), family_of(task)
    sizes, expected = (arrays["observations"].shape[1], arrays["actions"].shape[1]), D4RL_SIZES[family]
    if sizes != expected:
        raise ILQError(
            f"'{path}' does not hold {task} data: its observations have size {sizes[0]} and its actions {sizes[1]}, "
            f"but {family} data have {expected[0]} and {expected[1]} (another robot's data?). Give the --env-id that "
            f"names this file's data, or pass the {task} file with --dataset-path."
        )
    eval_env = d4rl_eval_env(task)
    ref_min, ref_max = D4RL_REF_SCORES[task if family == "maze2d" else family]
    label = arrays.pop("local_description", None)
    source = f"LOCALLY MADE data in D4RL's HDF5 layout, {path}: {label}" if label else f"D4RL HDF5 {path}"
    info = dict(name=args.env_id, source=source, task=task, family=family, eval_env=eval_env)
    return arrays, dict(info, ref_min=ref_min, ref_max=ref_max)


def flatten_obs(obs) -> np.ndarray:
    """Flatten (nested, batched) Dict observations along the last axis: `observation` first, then the other keys
    sorted; `achieved_goal` is dropped when `observation` exists (PointMaze: observation(4) || desired_goal(2))."""
    if not isinstance(obs, dict):
        return np.asarray(obs, dtype=np.float32)
    keys = sorted(obs)
    if "observation" in keys:
        keys = ["observation"] + [k for k in keys if k not in ("observation", "achieved_goal")]
    return np.concatenate([flatten_obs(obs[k]) for k in keys], axis=-1)


def minari_arrays(dataset) -> dict:
    """Minari episodes -> flat transitions. An episode has T+1 observations; the TD mask is `terminations` only: a
    truncation (time limit) never cuts bootstrapping."""
    parts = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "episode_returns")}
    for ep in dataset.iterate_episodes():
        obs = flatten_obs(ep.observations)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions, np.float32).reshape(len(ep.rewards), -1))
        parts["rewards"].append(np.asarray(ep.rewards, np.float32))
        parts["terminals"].append(np.asarray(ep.terminations, np.float32))
        parts["episode_returns"].append([float(np.sum(ep.rewards, dtype=np.float64))])
    return {k: np.concatenate(v) for k, v in parts.items()}


def make_random_dataset(dataset_id: str, env_id: str, n_steps: int, seed: int = RANDOM_DATASET_SEED, ref_scores=None):
    """Record a uniformly-random-policy dataset with minari.DataCollector (D4RL's "random" protocol, on Gymnasium MuJoCo
    instead of D4RL's v2 envs) under the ilq-local namespace, so it is never mistaken for D4RL or Minari-hub data. Its
    metadata records what made it (ilq_steps, ilq_seed, ilq_env); a failure leaves no half-written dataset."""
    import minari

    env = minari.DataCollector(gym.make(env_id), record_infos=False)  # it writes to a tmpXXXX folder until the end
    t0, steps, episode = time.time(), 0, 0
    meta = dict(dataset_id=dataset_id, algorithm_name="uniform random policy", author="ilq-jax", eval_env=env_id)
    meta.update(code_permalink="ilq_jax.py (make_random_dataset)")
    if ref_scores:
        meta.update(ref_min_score=ref_scores[0], ref_max_score=ref_scores[1])
    try:  # env.close() removes the tmpXXXX folder
        env.action_space.seed(seed)
        env.reset(seed=seed)
        print(f"[data] generating {dataset_id}: {n_steps} steps of a uniformly random policy on {env_id} (seed {seed})")
        while steps < n_steps:  # the policy is uniform: a fresh sample of the action space each step
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            steps += 1
            if term or trunc:
                episode += 1
                env.reset(seed=seed + episode)
        meta["description"] = (
            f"Locally generated by ilq_jax.py: {n_steps} steps of a uniformly random policy on {env_id} (seed {seed}), "
            f"the D4RL 'random' protocol. NOT a D4RL dataset. Reference scores: {'D4RL' if ref_scores else 'none'}."
        )
        with warnings.catch_warnings():  # Minari warns that no author e-mail is given; there is none to give
            warnings.filterwarnings("ignore", message=".*author_email.*")
            ds = env.create_dataset(**meta)
        ds.storage.update_metadata(dict(ilq_steps=n_steps, ilq_seed=seed, ilq_env=env_id))
    except BaseException:
        with contextlib.suppress(Exception):
            minari.delete_dataset(dataset_id)
        raise
    finally:
        env.close()
    print(f"[data] generated {dataset_id} in {time.time() - t0:.1f}s ({episode} episodes)")
    return ds


def download_minari(args: Args, dataset_id: str, root: str):
    import minari

    if dataset_id.startswith(LOCAL_NAMESPACE + "/"):
        raise ILQError(
            f"'{dataset_id}' is not in the local Minari folder. ilq_jax.py generates {LOCAL_NAMESPACE}/<robot>/random-v0 "
            "itself; the medium and medium-replay datasets come from `python benchmarks/make_datasets.py`."
        )
    if not args.download:
        raise ILQError(
            f"Minari dataset '{dataset_id}' is not in the local Minari folder and --no-download is set. Run "
            f"`minari download {dataset_id}` on a machine with network access."
        )
    what = f"Minari dataset '{dataset_id}' is not on disk and could not be downloaded"
    with errors_as(what, f"Run `minari download {dataset_id}` where the network is reachable, or copy it into {root}."):
        return minari.load_dataset(dataset_id, download=True)


def load_minari(args: Args) -> tuple[dict, dict]:
    """A Minari dataset: on disk, generated here (ilq-local/<robot>/random-vN) or downloaded from Minari's hub."""
    import minari

    local = LOCAL_RE.fullmatch(args.env_id)
    generated = local is not None and local.group(2) == "random"
    dataset_id, steps = args.env_id, args.random_dataset_steps
    if generated and steps != RANDOM_DATASET_STEPS:  # keyed by its size: a smoke test's data never serves a default run
        dataset_id = re.sub(r"-v(\d+)$", rf"-{steps}steps-v\1", args.env_id)
    root = os.path.expanduser(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets"))
    folder = os.path.join(root, dataset_id)
    try:  # Minari makes its folder on every call, and writes there what it generates or downloads
        os.makedirs(root, exist_ok=True)
        problem = None if os.path.isdir(folder) or os.access(root, os.W_OK) else "is read-only"
    except OSError as e:
        problem = f"cannot be made ({e.strerror})"
    if problem:
        raise ILQError(
            f"The Minari folder {root} {problem}, so '{dataset_id}' cannot be {'generated' if generated else 'downloaded'} "
            "there. Make it writable, or set MINARI_DATASETS_PATH to a writable folder."
        )
    advice = f"Delete its folder {folder} (or run `minari delete {dataset_id}`) and download or generate it again."
    damaged = f"The local Minari dataset '{dataset_id}' is damaged", advice
    with errors_as(*damaged):
        try:
            dataset = minari.load_dataset(dataset_id, download=False)
        except FileNotFoundError:
            dataset = None
    if dataset is None and generated:
        robot = local.group(1)
        make_random_dataset(dataset_id, GENERATED_DATA_ENVS[robot], steps, ref_scores=D4RL_REF_SCORES[robot])
        with errors_as(*damaged):
            dataset = minari.load_dataset(dataset_id, download=False)
    elif dataset is None:
        dataset = download_minari(args, dataset_id, root)
    with errors_as(*damaged):  # h5py reports a truncated or corrupt data file only when the episodes are read
        arrays, meta = minari_arrays(dataset), dataset.storage.metadata
        spec = getattr(dataset.spec, "eval_env_spec", None) or dataset.env_spec
    eval_env = gym_env(spec)
    made = {k: meta.get(f"ilq_{k}") for k in ("steps", "seed", "env")}
    if generated and made["steps"] is None:  # made by an earlier ilq_jax.py, always with seed 0: size and env on record
        made = dict(steps=meta.get("total_steps"), seed=RANDOM_DATASET_SEED, env=getattr(dataset.env_spec, "id", None))
    wanted = dict(steps=steps, seed=RANDOM_DATASET_SEED, env=GENERATED_DATA_ENVS[local.group(1)]) if generated else made
    if made != wanted:
        raise ILQError(
            f"The local dataset '{dataset_id}' was not made with this run's settings: it records {made}, this run asks "
            f"for {wanted} (--random-dataset-steps). It comes from another version of ilq_jax.py or was changed. "
            f"Delete it (`minari delete {dataset_id}`) and run again to generate it."
        )
    source = f"Minari dataset {dataset_id}"
    if local:
        source = f"generated locally ({LOCAL_NAMESPACE} namespace; not D4RL data): {meta.get('description') or ''}"
    if generated:
        source = (
            f"generated locally by ilq_jax.py ({steps} steps of a uniform random policy, seed {made['seed']}; not D4RL data)"
        )
    # a local dataset follows a D4RL protocol, so it takes that D4RL task's hyper-parameters (Tables 3-6)
    # D4RL's own data re-released by Minari take their D4RL task's row too
    d4rl = re.fullmatch(r"D4RL/(pointmaze|pen)/(umaze|medium|large|human|cloned)(-dense)?-v\d+", dataset_id)
    task = f"{'maze2d' if d4rl.group(1) == 'pointmaze' else 'pen'}-{d4rl.group(2)}{d4rl.group(3) or ''}" if d4rl else None
    if local and eval_env.id == D4RL_LOCOMOTION_V4.get(local.group(1)):  # made by make_datasets.py on D4RL's robot
        robot = d4rl_eval_env(f"{local.group(1)}-{local.group(2)}")
        eval_env = robot._replace(note=robot.note.split("; the data came")[0] + "; the data were recorded on this env")
    info = dict(name=dataset_id, source=source, task=f"{local.group(1)}-{local.group(2)}" if local else task)
    info.update(family=family_of(dataset_id), eval_env=eval_env)
    return arrays, dict(info, ref_min=meta.get("ref_min_score"), ref_max=meta.get("ref_max_score"))


def load_dataset(args: Args) -> tuple[Transitions, DatasetInfo]:
    """The one data entry point: --env-id (+ --dataset-path) -> device-resident float32 transitions."""
    if args.env_id in gym.registry or re.fullmatch(r"[A-Z]\w*-v\d+", args.env_id):
        fam = family_of(args.env_id)
        names = [n for n in D4RL_NAMES if family_of(n) == fam][:3]
        names += [f"{LOCAL_NAMESPACE}/{fam}/random-v0"] if fam in GENERATED_DATA_ENVS else []
        raise ILQError(
            f"--env-id '{args.env_id}' is a Gymnasium environment, but --env-id names a DATASET (a D4RL name, a Minari "
            f"id or {LOCAL_NAMESPACE}/<robot>/random-v0). The evaluation environment follows from the dataset, or is set "
            f"with --eval-env-id {args.env_id}." + (f" Datasets recorded on it: {', '.join(names)}." if names else "")
        )
    d4rl = parse_d4rl_name(args.env_id)
    if not d4rl and "/" not in args.env_id:
        close = difflib.get_close_matches(args.env_id, D4RL_NAMES + [f"{LOCAL_NAMESPACE}/hopper/random-v0"], n=3)
        raise ILQError(
            f"Unknown --env-id '{args.env_id}'. Use a D4RL name (e.g. hopper-medium-replay), a Minari id (namespace/"
            f"name-vN, e.g. mujoco/hopper/medium-v0) or {LOCAL_NAMESPACE}/hopper/random-v0."
            + (f" Did you mean: {', '.join(close)}?" if close else "")
        )
    arrays, meta = load_d4rl(args, *d4rl) if d4rl else load_minari(args)
    validate_arrays(arrays, args.env_id)
    returns = arrays.pop("episode_returns")
    obs_dim, act_dim = arrays["observations"].shape[1], arrays["actions"].shape[1]
    info = DatasetInfo(**meta, obs_dim=obs_dim, act_dim=act_dim, episode_returns=returns, fingerprint=_fingerprint(arrays))
    if args.eval_env_id:
        info.eval_env = gym_env(args.eval_env_id)
    return Transitions(**{k: jnp.asarray(arrays[k], jnp.float32) for k in Transitions._fields}), info


def describe_dataset(data: Transitions, info: DatasetInfo) -> str:
    r, norm = info.episode_returns, info.normalize(info.episode_returns)
    env = info.eval_env.id + (f" ({info.eval_env.note})" if info.eval_env.note else "")
    refs = "no reference scores: raw returns only"
    if norm is not None:
        refs = (
            f"reference scores min {info.ref_min:g} / max {info.ref_max:g}; dataset mean normalised return {norm.mean():.2f}"
        )
    return (
        f"[data] {info.name}: {info.source}\n[data] {len(data.rewards)} transitions, {len(r)} episodes, obs dim "
        f"{info.obs_dim}, action dim {info.act_dim}, terminals {int(np.asarray(data.terminals).sum())}\n[data] episode "
        f"return mean {r.mean():.1f} / std {r.std():.1f} / min {r.min():.1f} / max {r.max():.1f}\n[data] evaluation env "
        f"{env}; {refs}"
    )


# --------------------------------------------------------------------- evaluation envs where D4RL's data were recorded
# D4RL locomotion data come from gym's -v2 envs (mujoco-py); Gymnasium's -v4 envs reproduce their model, observation,
# reward (alive bonus on every step, the terminal one included), termination and reset noise (-v5 changes Walker2d's
# foot friction and drops the terminal step's healthy reward); restore_v2_masses undoes MuJoCo 2.1.2's capsule masses.
# D4RL maze2d (-v1) and pen (-v0/-v1) are rebuilt as thin wrappers over Gymnasium-Robotics' physics (same MJCF): D4RL's
# frame, observation, target, reward, reset and episode end.
D4RL_LOCOMOTION_V4 = {"hopper": "Hopper-v4", "walker2d": "Walker2d-v4", "halfcheetah": "HalfCheetah-v4"}
D4RL_MAZE2D = {  # D4RL's layouts ('#' wall, 'O' empty, 'G' goal), rows top to bottom, and time limits
    "umaze": dict(gym_id="PointMaze_UMaze", max_episode_steps=300, layout=("#####", "#GOO#", "###O#", "#OOO#", "#####")),
    "medium": dict(gym_id="PointMaze_Medium", max_episode_steps=600, layout=(
        "########", "#OO##OO#", "#OO#OOO#", "##OOO###", "#OO#OOO#", "#O#OO#O#", "#OOO#OG#", "########")),
    "large": dict(gym_id="PointMaze_Large", max_episode_steps=800, layout=(
        "############", "#OOOO#OOOOO#", "#O##O#O#O#O#", "#OOOOOO#OOO#", "#O####O###O#",
        "#OO#O#OOOOO#", "##O#O#O#O###", "#OO#OOO#OGO#", "############")),
}  # fmt: skip
D4RL_QPOS_OFFSET = 0.2  # D4RL's particle body sits at (1.2, 1.2) and cell (r, c) is centred at (r + 1, c + 1)
D4RL_PEN_STEPS = 100  # pen-v0/v1's time limit (its drop rule: D4RL_PEN_DROP_Z, with the termination functions)


class EvalEnv(NamedTuple):
    """An evaluation env: its name, a maker of one env (make(render_mode="rgb_array") for videos), how it differs
    from the data's env ("" if it does not), and what rebuilds it from a run's record (eval_env_from)."""

    id: str
    make: Any
    note: str = ""
    spec: Any = None  # {"d4rl": task} or {"gym": an env id or an EnvSpec's JSON}


def gym_env(spec) -> EvalEnv:
    """A registered Gymnasium env (an id or an EnvSpec) as an EvalEnv."""
    if isinstance(spec, str):
        return EvalEnv(spec, partial(gym.make, spec), spec=dict(gym=spec))
    try:  # an EnvSpec whose arguments JSON cannot hold is rebuilt from its id
        record = spec.to_json()
    except Exception:
        record = spec.id
    return EvalEnv(spec.id, partial(gym.make, spec), spec=dict(gym=record))


def eval_env_from(evaluation: dict) -> EvalEnv:
    """The evaluation env of a run's record (its evaluation.env_spec), with the note it was recorded with."""
    spec = evaluation["env_spec"]
    if "d4rl" in spec:
        return d4rl_eval_env(spec["d4rl"])._replace(note=evaluation["env_note"])
    made = gym.envs.registration.EnvSpec.from_json(spec["gym"]) if spec["gym"].startswith("{") else spec["gym"]
    return gym_env(made)._replace(note=evaluation["env_note"])


def _robotics() -> None:
    with errors_as("Maze2D and pen evaluation need Gymnasium-Robotics", "Install requirements.txt (gymnasium-robotics)."):
        import gymnasium_robotics
    gym.register_envs(gymnasium_robotics)


def maze2d_cells(maze: str) -> tuple[list, tuple]:
    """(D4RL's reset cells: the empty cells sorted, then the goal cell; the goal cell), as (row, col)."""
    layout = D4RL_MAZE2D[maze]["layout"]
    cells = lambda ch: sorted((r, c) for r, row in enumerate(layout) for c, x in enumerate(row) if x == ch)  # noqa: E731
    return cells("O") + cells("G"), cells("G")[0]


def d4rl_to_gym_pos(maze_obj, pos) -> np.ndarray:
    """D4RL qpos (row, col units, 0.2 past the cell centre) -> Gymnasium-Robotics' centred, y-up world position."""
    rc = np.asarray(pos, np.float64) + D4RL_QPOS_OFFSET
    return np.stack([rc[..., 1] + 0.5 - maze_obj.x_map_center, maze_obj.y_map_center - rc[..., 0] - 0.5], axis=-1)


def gym_to_d4rl_pos(maze_obj, xy) -> np.ndarray:
    xy = np.asarray(xy, np.float64)
    rc = np.stack([maze_obj.y_map_center - xy[..., 1] - 0.5, xy[..., 0] + maze_obj.x_map_center - 0.5], axis=-1)
    return rc - D4RL_QPOS_OFFSET


def d4rl_to_gym_vec(v) -> np.ndarray:
    """A planar vector (velocity, action) from D4RL's axes to Gymnasium-Robotics' (a rotation by -90 degrees)."""
    v = np.asarray(v, np.float64)
    return np.stack([v[..., 1], -v[..., 0]], axis=-1)


def gym_to_d4rl_vec(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return np.stack([-v[..., 1], v[..., 0]], axis=-1)


class D4RLMaze2d(gym.Wrapper if gym else object):
    """D4RL maze2d-{umaze,medium,large}[-dense]-v1 on Gymnasium-Robotics' PointMaze_*-v3 physics: observation
    [qpos(2), qvel(2)] in D4RL's frame, action Box(-1, 1, 2) on D4RL's axes, fixed target at the goal cell, reward
    1{dist <= 0.5} (dense: exp(-dist)), never terminates; reset: a cell uniform over the empty cells and the goal cell,
    qpos noise U(+-0.1), qvel N(0, 0.1^2). No time limit here (make_d4rl_maze2d adds D4RL's). The data maker's
    subclass (benchmarks/make_datasets.py) adds a movable target and given start states."""

    def __init__(self, maze: str = "umaze", dense: bool = False, render_mode: Optional[str] = None):
        _robotics()
        gym_id = D4RL_MAZE2D[maze]["gym_id"] + ("Dense" if dense else "") + "-v3"
        base = gym.make(gym_id, continuing_task=True, reset_target=False, render_mode=render_mode).unwrapped
        with contextlib.suppress(OSError):  # the library leaves the maze's MJCF in a temporary file; it is loaded now
            os.remove(base.tmp_xml_file_path)
        super().__init__(base)
        self.dense, self.maze_obj = dense, base.maze
        walls = [[ch == "#" for ch in row] for row in D4RL_MAZE2D[maze]["layout"]]
        if walls != [[c == 1 for c in r] for r in base.maze.maze_map]:
            raise ILQError(f"{gym_id}'s layout differs from D4RL's {maze} maze (another Gymnasium-Robotics version?).")
        self.cells, goal = maze2d_cells(maze)
        self.target = np.array(goal, np.float64)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def _obs(self, gym_obs) -> np.ndarray:
        return np.concatenate([gym_to_d4rl_pos(self.maze_obj, gym_obs[:2]), gym_to_d4rl_vec(gym_obs[2:4])])

    def reset(self, *, seed=None, options=None):
        self.env.reset(seed=seed)  # seeds the library's RNG; its own goal and start are replaced below
        rng = self.env.unwrapped.np_random
        qpos = np.asarray(self.cells[int(rng.integers(len(self.cells)))], np.float64) + rng.uniform(-0.1, 0.1, 2)
        return self.start(qpos, rng.standard_normal(2) * 0.1), {}

    def start(self, qpos, qvel) -> np.ndarray:
        """The particle at a D4RL-frame state (qpos, qvel), the target site at self.target; the observation."""
        self.env.unwrapped.point_env.set_state(d4rl_to_gym_pos(self.maze_obj, qpos), d4rl_to_gym_vec(qvel))
        self.env.unwrapped.goal = d4rl_to_gym_pos(self.maze_obj, self.target)
        self.env.unwrapped.update_target_site_pos()
        data = self.env.unwrapped.point_env.data
        return self._obs(np.concatenate([data.qpos, data.qvel]))

    def step(self, action):
        gym_obs, _, _, truncated, _ = self.env.step(d4rl_to_gym_vec(np.asarray(action).reshape(2)).astype(np.float32))
        obs = self._obs(gym_obs["observation"])
        dist = float(np.linalg.norm(obs[:2] - self.target))
        return obs, float(np.exp(-dist)) if self.dense else float(dist <= 0.5), False, truncated, {"distance": dist}


def make_d4rl_maze2d(maze: str, dense: bool, render_mode: Optional[str] = None) -> gym.Env:
    return gym.wrappers.TimeLimit(D4RLMaze2d(maze, dense, render_mode), D4RL_MAZE2D[maze]["max_episode_steps"])


class D4RLPen(gym.Wrapper if gym else object):
    """Gymnasium-Robotics' AdroitHandPen-v1 (D4RL's MJCF, 45-d observation, dense reward) with D4RL pen-v0/v1's end:
    terminated when the pen drops (its z, obs[26], below 0.075). make_d4rl_pen adds the 100-step limit."""

    def __init__(self, render_mode: Optional[str] = None):
        _robotics()
        super().__init__(gym.make("AdroitHandPen-v1", render_mode=render_mode).unwrapped)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        dropped = bool(obs[PEN_OBJ_Z] < D4RL_PEN_DROP_Z)
        return obs, reward, bool(terminated) or dropped, truncated, dict(info, dropped=dropped)


def make_d4rl_pen(render_mode: Optional[str] = None) -> gym.Env:
    return gym.wrappers.TimeLimit(D4RLPen(render_mode), D4RL_PEN_STEPS)


V2_MASS_FIELDS = ("body_mass", "body_inertia", "body_ipos", "body_iquat")  # what restore_v2_masses sets


def restore_v2_masses(env: gym.Env) -> None:
    """Give a Gymnasium MuJoCo env the body masses, inertias and inertial frames that MuJoCo before 2.1.2 (mujoco-py,
    where D4RL's -v2 data were recorded) compiled from the same MJCF: until 2.1.2 "capsule masses and inertias [...]
    were approximated by a cylinder [...] extended on both ends by half the capsule radius" (its changelog). A copy of
    the MJCF with every capsule replaced by that cylinder is compiled (settotalmass, as halfcheetah's, scales them as
    the old compiler did) and its mass properties are copied into the env's model; the contacts keep the capsules."""
    import xml.etree.ElementTree as ET

    import mujoco

    root = ET.parse(env.unwrapped.fullpath).getroot()
    for geom in root.iter("geom"):
        if geom.get("type") != "capsule":
            continue
        r, *half = (float(x) for x in geom.get("size").split())
        geom.set("type", "cylinder")
        if geom.get("fromto"):  # both ends moved r/2 outward along the axis
            a, b = np.array(geom.get("fromto").split(), np.float64).reshape(2, 3)
            d = (b - a) / np.linalg.norm(b - a) * r / 2
            geom.set("fromto", " ".join(map(str, [*(a - d).tolist(), *(b + d).tolist()])))
        else:
            geom.set("size", f"{r} {half[0] + r / 2}")
    old, model = mujoco.MjModel.from_xml_string(ET.tostring(root, encoding="unicode")), env.unwrapped.model
    if (old.geom_type == mujoco.mjtGeom.mjGEOM_CAPSULE).any() or old.nbody != model.nbody:
        raise ILQError(f"Could not rebuild the pre-2.1.2 masses of {env.unwrapped.fullpath}: a capsule left or a body lost.")
    for field in V2_MASS_FIELDS:
        getattr(model, field)[:] = getattr(old, field)
    mujoco.mj_setConst(model, env.unwrapped.data)


def make_d4rl_locomotion(family: str, render_mode: Optional[str] = None) -> gym.Env:
    with warnings.catch_warnings():  # "-v4 is out of date": chosen on purpose, -v4 reproduces D4RL's -v2
        warnings.filterwarnings("ignore", message=r".*is out of date.*")
        env = gym.make(D4RL_LOCOMOTION_V4[family], render_mode=render_mode)
    restore_v2_masses(env)
    return gym.wrappers.TransformAction(env, lambda a: np.clip(a, -1.0, 1.0), env.action_space)  # D4RL's clip


def d4rl_eval_env(task: str) -> EvalEnv:
    """Where a D4RL task's data were recorded, as close as Gymnasium allows, and how it still differs."""
    family, mujoco = task.split("-")[0], f"MuJoCo {package_versions().get('mujoco', '?')}"
    if family in D4RL_LOCOMOTION_V4:
        env_id = D4RL_LOCOMOTION_V4[family]
        note = f"{env_id} with -v2 masses on {mujoco} (capsule masses and inertias as MuJoCo < 2.1.2 computed them), "
        note += f"actions clipped to [-1, 1]; the data came from gym's {env_id[:-1]}2 on mujoco-py: same MJCF, "
        note += "observation, reward, termination and reset noise, another simulator version"
        return EvalEnv(env_id, partial(make_d4rl_locomotion, family), note, dict(d4rl=task))
    if family == "maze2d":
        maze, dense = task.split("-")[1], task.endswith("-dense")
        gym_id, steps = D4RL_MAZE2D[maze]["gym_id"] + ("Dense" if dense else ""), D4RL_MAZE2D[maze]["max_episode_steps"]
        note = f"D4RL's {task}-v1 (frame, [qpos, qvel] observation, goal cell, reward, start distribution, {steps} steps) "
        note += f"on Gymnasium-Robotics' {gym_id}-v3 physics ({mujoco}; D4RL: mujoco-py, walls 0.2 lower, same contacts)"
        return EvalEnv(f"D4RL-{task}", partial(make_d4rl_maze2d, maze, dense), note, dict(d4rl=task))
    note = f"AdroitHandPen-v1 with D4RL's episode end (pen z < {D4RL_PEN_DROP_Z}) and {D4RL_PEN_STEPS} steps; data: D4RL's "
    note += f"PenEnvV0 on mujoco-py, same MJCF, observation and reward ({mujoco})"
    return EvalEnv(f"D4RL-{task}", make_d4rl_pen, note, dict(d4rl=task))


def make_env(info: DatasetInfo, num_envs: int = 1):
    """A vectorised evaluation env, checked against the dataset's observation and action sizes."""
    sid = info.eval_env.id
    if any(k in sid for k in ("PointMaze", "AdroitHand")):
        _robotics()
    with errors_as(f"Could not create the evaluation env {sid}", "Pass a working one with --eval-env-id."):
        envs = gym.vector.SyncVectorEnv([info.eval_env.make for _ in range(num_envs)])
    obs_dim = flatten_obs(envs.single_observation_space.sample()).shape[-1]
    act_dim = int(np.prod(envs.single_action_space.shape))
    if (obs_dim, act_dim) != (info.obs_dim, info.act_dim):
        envs.close()
        raise ILQError(
            f"Evaluation env {sid} has observation size {obs_dim} and action size {act_dim}, but the dataset "
            f"'{info.name}' has {info.obs_dim} and {info.act_dim}: name an env that fits the data with --eval-env-id."
        )
    return envs


# --------------------------------------------------------------------------------------------------------- model files
def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for p in ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "gymnasium", "mujoco", "minari"):
        with contextlib.suppress(PackageNotFoundError):
            out[p] = version(p)
    return out


def sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _atomic_write(path: str, payload: bytes) -> None:
    """path holds the old bytes or the new ones, never a part; a failed write (a full disk) leaves no temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


MODEL_KINDS = {  # kind -> its --*-path flag, the flag and unit of its training length, the metric a reader checks
    "dynamics": ("dynamics_path", "dynamics_epochs", "epochs", "holdout_mse_elites"),
    "behavior": ("behavior_path", "diffusion_steps", "steps", "final_loss"),
}


def model_settings(args: Args, kind: str) -> dict:
    """The settings that define a model, named as train_dynamics / train_diffusion take them (its training length is
    recorded, not part of the cache key: a model trained longer serves a shorter request)."""
    if kind == "dynamics":
        sizes = dict(members=args.dynamics_members, elites=args.dynamics_elites, hidden=args.dynamics_hidden)
        return dict(sizes, layers=args.dynamics_layers, lr=args.dynamics_lr, seed=args.pretrain_seed)
    return dict(K=args.diffusion_k, hidden=256, lr=args.diffusion_lr, seed=args.pretrain_seed)


def artifact_path(args: Args, info: DatasetInfo, kind: str) -> str:
    key = hashlib.sha1(json.dumps(model_settings(args, kind), sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(
        os.path.expanduser(args.model_dir), f"{slug(info.name)}-{info.fingerprint[:12]}", f"{kind}-{key}.msgpack"
    )


def describe_model(side: dict) -> str:
    """A model's own settings and training, from its sidecar (what a run records as trained on)."""
    metric = MODEL_KINDS[side["kind"]][3]
    config = ", ".join(f"{k} {v}" for k, v in side["config"].items() if k != "lr")
    return f"{config}; trained {side['trained']} {MODEL_KINDS[side['kind']][2]}; {metric} {side['metrics'][metric]:.4f}"


def write_model(path: str, model, side: dict) -> dict:
    """A model and its sidecar (what a reader needs without loading the model, and the SHA-256 of both, which
    load_artifact checks), each written whole or not at all; returns the sidecar."""
    payload = flax.serialization.to_bytes(model)
    side = {k: v for k, v in side.items() if k != "sidecar_sha256"} | dict(versions=package_versions())
    side["msgpack_sha256"] = sha256(payload)
    side["sidecar_sha256"] = sha256(json.dumps(side, sort_keys=True).encode())  # of everything above it
    _atomic_write(path, payload)
    _atomic_write(os.path.splitext(path)[0] + ".json", json.dumps(side, indent=2).encode())
    return side


def load_artifact(path: str, kind: str, info: DatasetInfo, advice: Optional[str] = None):
    """A saved model and its sidecar, refused when made for another dataset, with other shapes, or damaged. advice:
    what to do with a damaged one (None: a cache entry's; a file the user named is never called a file to delete)."""
    side_path, advice = os.path.splitext(path)[0] + ".json", advice or "Delete both and pretrain again."
    redo = f"`python pretrain_models.py --env-id {info.name}`"
    if not (os.path.exists(path) and os.path.exists(side_path)):
        raise ILQError(
            f"No {kind} model at '{path}' (both the .msgpack and its .json sidecar are needed). Train one with {redo} "
            "or drop the path to train inline."
        )
    with errors_as(f"The sidecar '{side_path}' of '{path}' is damaged", advice):
        side = json.loads(open(side_path).read())
        ds, config = side.get("dataset", {}), dict(side["config"])
        written = {k: v for k, v in side.items() if k != "sidecar_sha256"}
        if sha256(json.dumps(written, sort_keys=True).encode()) != side["sidecar_sha256"]:
            raise ValueError("it was changed since it was written: its content does not match its sidecar_sha256")
    if side.get("kind") != kind:
        raise ILQError(f"'{path}' holds a {side.get('kind')} model, not a {kind} model.")
    made = ds.get("name"), ds.get("obs_dim"), ds.get("act_dim"), str(ds.get("fingerprint"))
    if made[1:] != (info.obs_dim, info.act_dim, info.fingerprint):
        raise ILQError(
            f"The {kind} model '{path}' was made for dataset '{made[0]}' (obs {made[1]}, act {made[2]}, fingerprint "
            f"{made[3][:12]}), not for '{info.name}' (obs {info.obs_dim}, act {info.act_dim}, fingerprint "
            f"{info.fingerprint[:12]}). Pretrain for this dataset with {redo}."
        )
    # structure and shapes from the training code's own constructor, traced by eval_shape (nothing is computed)
    config.pop("lr", None)
    init = partial(init_dynamics, family=info.family) if kind == "dynamics" else init_behavior
    with errors_as(f"'{path}' does not match its sidecar's architecture or is damaged", advice):
        template = jax.eval_shape(partial(init, info.obs_dim, info.act_dim, **config))
        raw = open(path, "rb").read()
        if sha256(raw) != side["msgpack_sha256"]:
            raise ValueError("its bytes do not match the msgpack_sha256 its sidecar records")
        model = restore(template, raw)
    return model, side


def load_or_pretrain(args: Args, data: Transitions, info: DatasetInfo, force=False, stop=None, curves=None) -> tuple:
    """Algorithm 1, lines 2-3: (model, sidecar, path) of the frozen dynamics and behaviour models (load_or_train).
    stop(), if given, runs between pretraining's jitted calls (a pending signal ends it there); curves, a list, gets
    the pretraining curves (tag, value, step)."""
    return tuple(load_or_train(kind, args, data, info, force, stop, curves) for kind in MODEL_KINDS)


def load_or_train(kind: str, args: Args, data: Transitions, info: DatasetInfo, force=False, stop=None, curves=None):
    """One frozen model, its sidecar and its file: its --*-path, else the cache when a model trained at least as long
    as asked is there (a damaged cache entry is retrained), else trained now and cached (a read-only or full cache
    costs a warning: the model is used from memory). A diverged model is never cached."""
    path_flag, length_flag, unit, metric = MODEL_KINDS[kind]
    given, wanted = getattr(args, path_flag), getattr(args, length_flag)
    path = given or artifact_path(args, info, kind)
    if given or (os.path.exists(path) and not force):
        try:
            model, side = load_artifact(
                path, kind, info, f"Pass an intact model or drop {flag(path_flag)}." if given else None
            )
            if given or side["trained"] >= wanted:
                print(f"[models] {kind}: loaded {path} ({describe_model(side)})")
                return model, side, path
        except (ILQError, KeyError, TypeError):  # a damaged cache entry, or one of another version, is trained again
            if given:
                raise
    print(f"[models] {kind}: training ({wanted} {unit}) -> {path}")
    config, progress = model_settings(args, kind), PretrainProgress(kind, stop, curves)
    if kind == "dynamics":  # the sidecar repeats what a reader needs without loading the msgpack
        model, metrics = train_dynamics(data, info.family, epochs=wanted, callback=progress, **config)
        state = {k: np.asarray(getattr(model, k)).tolist() for k in ("input_mean", "input_std", "elites")}
    else:
        model, metrics = train_diffusion(data, steps=wanted, callback=progress, **config)
        state = dict(schedule={k: np.asarray(v).tolist() for k, v in vp_schedule(model.K).items()})
    numbers = [np.asarray(v, np.float64) for v in metrics.values()] + jax.tree_util.tree_leaves(model)
    if not all(np.isfinite(x).all() for x in numbers):
        lr = "dynamics_lr" if kind == "dynamics" else "diffusion_lr"
        raise ILQError(
            f"The {kind} model's training diverged ({metric} {metrics[metric]}: not finite); it was not cached. Lower "
            f"{flag(lr)} ({getattr(args, lr)}; the paper's is {ModelFlags.__dataclass_fields__[lr].default}) and run again."
        )
    dataset = dict(name=info.name, fingerprint=info.fingerprint, obs_dim=info.obs_dim, act_dim=info.act_dim)
    side = dict(kind=kind, config=config, trained=wanted, metrics=metrics, **state, family=info.family)
    side.update(dataset=dict(dataset, transitions=int(data.rewards.shape[0])), created=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        side = write_model(path, model, side)
    except OSError as e:
        print(f"[models] warning: could not cache the {kind} model in {path} ({e.strerror or e}); it is used from memory")
    print(f"[models] {kind}: {describe_model(side)}")
    return model, side, path


# ----------------------------------------------------------------------------------------------------------- run files
def slug(name: str) -> str:
    """A name as one path component (run folders, model cache folders)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def invocation() -> dict:
    """This command as a run records it: its command line, the git commit of this file (when in a repository), the time."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        git = None
    return dict(command=" ".join(["python", *sys.argv]), git_commit=git, time=time.strftime("%Y-%m-%d %H:%M:%S"))


def remove_if_never_trained(run_dir: str) -> None:
    """A new run folder without a checkpoint never started training (stopped or failed while pretraining): it goes;
    nothing outside it is touched."""
    if not os.path.exists(os.path.join(run_dir, CHECKPOINT)):
        shutil.rmtree(run_dir, ignore_errors=True)


def lock_run_folder(run_dir: str):
    """An exclusive lock on the run folder for this process's lifetime: a second run on it is refused."""
    import fcntl

    handle = open(os.path.join(run_dir, ".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ILQError(f"Run folder {run_dir} is in use by another ilq_jax.py process; wait for it to end.") from None
    return handle


def of_type(value, hint) -> bool:
    """Whether a value read back from JSON has the type of a flag's annotation (a bool is no int; an int is a float)."""
    origin, options = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in options
    if origin is typing.Union:
        return any(of_type(value, option) for option in options)
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if hint is float else hint)


def resume_args(args: Args) -> Args:
    """The saved settings of the run in --resume, each checked against its flag's type; refused when other flags are
    set or the saved file lacks a setting of this version or has one it does not know."""
    fields = dataclasses.fields(Args)
    refuse_flags("resume", [flag(f.name) for f in fields if getattr(args, f.name) != f.default])
    saved = _read_run_file(args.resume, "args.json", "no run of ilq_jax.py")
    where = f"--resume {args.resume}: {os.path.join(args.resume, 'args.json')}"
    what = f"a JSON {type(saved).__name__}, not an object of settings"
    if isinstance(saved, dict):
        hints = typing.get_type_hints(Args)
        problems = dict(missing=[flag(f.name) for f in fields if f.name not in saved])
        problems["unknown"] = [k for k in saved if k not in {f.name for f in fields}]
        problems["mistyped"] = [f"{flag(k)} = {v!r}" for k, v in saved.items() if k in hints and not of_type(v, hints[k])]
        what = "; ".join(f"{problem} {', '.join(keys)}" for problem, keys in problems.items() if keys)
    if what:
        raise ILQError(
            f"{where} does not hold this version's settings ({what}). It was written by another version of ilq_jax.py "
            "or edited; start a new run (nothing was changed in the run folder)."
        )
    given = {k: getattr(args, k) for k in ("resume", *MAY_ADD["resume"]) if getattr(args, k) is not None}
    return dataclasses.replace(Args(**saved), **{"stop_after": None, "time_box_min": None, **given})


def _read_run_file(run_dir: str, name: str, what: str):
    """A file of a run folder, or one clear error naming it (never a traceback, never a deletion)."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise ILQError(f"{run_dir}: {path} is missing, so there is {what} to continue or evaluate.")
    with errors_as(f"{run_dir}: {path} is damaged", "Nothing was changed in the run folder."):
        raw = open(path, "rb").read()
        return raw if name.endswith(".msgpack") else json.loads(raw)


CHECKPOINT = "checkpoint.msgpack"


def save_checkpoint(run_dir: str, state: ILQState, progress: dict) -> None:
    """The run's one checkpoint: every learner's train state and the progress record in one file with the state's
    SHA-256, written by rename, so the previous checkpoint stays whole until the new one is (a full disk, kill -9)."""
    state_bytes = flax.serialization.to_bytes(jax.device_get(state))
    record = dict(progress=json.dumps(progress), sha256=sha256(state_bytes), state=state_bytes)
    with errors_as(f"Could not write a checkpoint into {run_dir}", "Free disk space and --resume the run."):
        _atomic_write(os.path.join(run_dir, CHECKPOINT), flax.serialization.msgpack_serialize(record))


def restore(template, raw: bytes):
    """flax's from_bytes into template, refused (ValueError) when its arrays have other shapes (flax does not check)."""
    tree = flax.serialization.from_bytes(template, raw)
    if [x.shape for x in jax.tree_util.tree_leaves(tree)] != [x.shape for x in jax.tree_util.tree_leaves(template)]:
        raise ValueError("its arrays have other shapes than the networks they are loaded into")
    return tree


def read_checkpoint(run_dir: str, template=None) -> tuple:
    """(progress record, the learners' state restored into template; None: its bytes) of a run's checkpoint, refused
    unless whole: its state matches its SHA-256 (and the template's shapes)."""
    raw = _read_run_file(run_dir, CHECKPOINT, "no checkpoint")
    with errors_as(f"{run_dir}: {os.path.join(run_dir, CHECKPOINT)} is damaged", "Nothing was changed in the run folder."):
        record = flax.serialization.msgpack_restore(raw)
        progress, state = json.loads(record["progress"]), record["state"]
        if sha256(state) != record["sha256"]:
            raise ValueError("its train state does not match its SHA-256")
        if not (isinstance(progress, dict) and set(new_progress()) <= set(progress)):
            raise ValueError(f"its progress record lacks {sorted(set(new_progress()) - set(progress))} (another version?)")
        return progress, state if template is None else restore(template, state)


def same_dataset(run_dir: str, saved: dict, dataset: dict) -> None:
    """--resume trains on what the run started with: refused when the dataset changed since (its fingerprint)."""
    if saved != dataset:
        raise ILQError(
            f"--resume {run_dir}: the dataset changed since the run started ({saved} then, {dataset} now). A resumed run "
            "trains on what it started with: restore it, or start a new run (nothing was changed in the run folder)."
        )


def finished_run(args: Args, info: DatasetInfo, methods, seeds, run_dir: str, progress: dict, state_bytes: int) -> dict:
    """--resume of a run whose checkpoint holds every update: refused while its summary.json is whole; a missing or
    damaged summary (it is only a record) is written again from the checkpoint."""
    if progress["updates"] > args.total_steps:
        raise ILQError(
            f"--resume {run_dir}: its args.json asks for {args.total_steps} updates, fewer than the {progress['updates']} "
            "its checkpoint has done (edited?); nothing was changed in the run folder."
        )
    path = os.path.join(run_dir, "summary.json")
    try:
        json.load(open(path))["updates"]
    except Exception as e:
        print(f"[ilq] the run has finished; its summary.json could not be read ({type(e).__name__}): written again")
        return write_summary(args, info, methods, seeds, run_dir, progress, state_bytes)
    raise ILQError(
        f"--resume {run_dir}: the run has finished; its results are in {path}. To evaluate its policies again: python "
        f"ilq_jax.py --evaluate {run_dir} --eval-episodes N."
    )


def read_run(run_dir: str, eval_env_id: Optional[str] = None):
    """A run folder's learners from its checkpoint (finished or stopped), refused in one paragraph unless it is a
    whole run of this version: (ILQConfig, progress record, every learner's state, the DatasetInfo of its record)."""
    progress, state = read_checkpoint(run_dir)
    record = progress["record"]
    if not {"config", "dataset", "evaluation", "protocol"} <= set(record):
        raise ILQError(f"{run_dir}: its checkpoint holds no run record of this version of ilq_jax.py.")
    cfg = ILQConfig(**record["config"])
    keys = jnp.stack([jax.random.PRNGKey(0)] * len(record["protocol"]["methods"]) * len(record["protocol"]["seeds"]))
    with errors_as(f"{run_dir}: {os.path.join(run_dir, CHECKPOINT)} is damaged", "Nothing was changed in the run folder."):
        state = restore(jax.eval_shape(jax.vmap(partial(init_train_state, cfg)), keys), state)
    env = gym_env(eval_env_id) if eval_env_id else eval_env_from(record["evaluation"])
    fields = {k: record["dataset"][k] for k in (*DatasetInfo.RECORDED, "fingerprint")}
    info = DatasetInfo(**fields, eval_env=env, episode_returns=np.zeros(0))
    return cfg, progress, state, info


def check_finite(metrics: dict, first_update: int, run_dir: str, learners=None) -> None:
    """Stop on a non-finite loss or Q value, naming the update (and learner) and the last good checkpoint.
    metrics: arrays of shape (updates,) or (learners, updates)."""
    keys = ("losses/critic_loss", "losses/actor_loss", "losses/q_data", "losses/q_ood")
    bad = np.any([~np.isfinite(np.asarray(metrics[k])) for k in keys], axis=0)
    if bad.any():
        bad = bad.reshape(-1, bad.shape[-1])
        which, offset = np.unravel_index(int(np.argmax(bad)), bad.shape)
        where = f"update {first_update + offset}" + (f" of {learners[which]}" if learners is not None else "")
        advice = (
            f"The last good checkpoint is in {run_dir} (python ilq_jax.py --evaluate {run_dir} evaluates its policies); to "
            "train on, start a new run with a smaller --delta or learning rate (--resume would repeat the same updates)"
        )
        raise ILQError(f"Non-finite loss or Q value at {where}. {advice}.")


def memory_check(cfg: ILQConfig, args: Args, info: DatasetInfo, transitions: int, n_learners: int) -> int:
    """Bytes of one learner's train state, after refusing a run whose learners, data and models cannot fit in the
    memory JAX can use (estimated from shapes alone: nothing is allocated), with the flag that lowers the most."""
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    state = nbytes(jax.eval_shape(partial(init_train_state, cfg), jax.random.PRNGKey(0)))
    dyn = {k: v for k, v in model_settings(args, "dynamics").items() if k != "lr"}
    models = nbytes(jax.eval_shape(lambda: init_dynamics(info.obs_dim, info.act_dim, info.family, **dyn).params))
    models += nbytes(jax.eval_shape(lambda: init_behavior(info.obs_dim, info.act_dim, args.diffusion_k).params))
    n, fewer = n_learners, "fewer --num-seeds / --methods or " if n_learners > 1 else ""
    rows = n * cfg.batch_size * max(cfg.hidden_dim, args.dynamics_hidden, 256) * 4 * 8  # a few live activations a row
    chunk = 1 if args.behavior_bank else min(args.sample_chunk, args.updates_per_call)  # make_update_fn's, at most a call
    lower = f"a smaller --sample-chunk ({args.sample_chunk})" if chunk > 1 else "a smaller --num-behavior-samples"
    shares = {  # bytes, and what lowers them
        "train state": (n * state, f"{fewer}a smaller --hidden-dim"),
        "work space": (rows * (2 + 2 * cfg.num_ood_actions), f"{fewer}a smaller --batch-size"),
        f"behaviour samples of {chunk} update(s) drawn at once": (rows * cfg.num_behavior_samples * chunk, fewer + lower),
        "data": ((2 * info.obs_dim + info.act_dim + 2) * 4 * transitions, "a smaller dataset"),
        "models": (models, "a smaller --dynamics-hidden or --dynamics-members"),
    }
    need, top = sum(v for v, _ in shares.values()), max(shares, key=lambda k: shares[k][0])
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
    limit = limit or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if need > 0.9 * limit:
        parts = ", ".join(f"{v / 2**20:.0f} MiB of {k}" for k, (v, _) in shares.items())
        raise ILQError(
            f"{n} learner(s) need about {need / 2**30:.1f} GiB ({parts}), but {device.platform} has {limit / 2**30:.1f} "
            f"GiB available: the largest share is the {top}; use {shares[top][1]}."
        )
    return state


def shard_learners(state: TrainState, frozen: Frozen, run_keys, n_learners: int):
    """With several local devices (an 8-GPU node; XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU), the
    learner axis is split over as many of them as divide it evenly, and the data and frozen models are copied to each;
    the jitted update then runs each device's learners there. The same learners as on one device."""
    devices = jax.local_devices()
    d = max(k for k in range(1, len(devices) + 1) if n_learners % k == 0)
    if d == 1:
        return state, frozen, run_keys
    mesh = jax.sharding.Mesh(np.array(devices[:d]), ("learners",))
    split, copy = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(p)) for p in ("learners", None))
    print(f"[ilq] learners split over {d} devices ({n_learners // d} each)")
    return jax.device_put(state, split), jax.device_put(frozen, copy), jax.device_put(run_keys, split)


# ----------------------------------------------------------------- logs: TensorBoard, progress lines; evaluation workers
def tensorboard_writer(logdir: str, curves=()):
    """TensorBoard's own framework-free writer (no TensorFlow or torch), with these (tag, value, step) written:
    writer.add_scalar(tag, value, step)."""
    from tensorboard.summary import Writer

    writer = Writer(logdir)
    for curve in curves:
        writer.add_scalar(*curve)
    return writer


def rate_and_time_left(done: int, total: int, seconds: float, unit: str) -> str:
    rate = done / max(seconds, 1e-9)
    return f"{rate:7.1f} {unit}/s | time left {(total - done) / max(rate, 1e-9):5.0f}s"


class RunLog:
    """A run's logs: TensorBoard per learner (runs/<run>/seed_<s>, or runs/<run>/<method>/seed_<s>) and the console's
    progress line (at least every PROGRESS_EVERY_S) and evaluation lines (per method: mean +- sample std over seeds)."""

    def __init__(self, run_dir: str, methods: tuple, seeds: list, total_steps: int):
        self.methods, self.total_steps, self.last = methods, total_steps, time.time()
        folders = [f"{m}/seed_{s}" if len(methods) > 1 else f"seed_{s}" for m in methods for s in seeds]
        self.writers = [tensorboard_writer(os.path.join(run_dir, folder)) for folder in folders]

    def updates(self, step: int, metrics: dict, updates_per_s: float, train_time_s: float) -> None:
        for i, w in enumerate(self.writers):
            for name, values in metrics.items():
                if np.isfinite(values[i]).all():  # an ablation has no y_img - y_lmt (NaN)
                    w.add_scalar(name, float(np.mean(values[i])), step)
            w.add_scalar("charts/SPS", updates_per_s, step)
        if time.time() - self.last >= PROGRESS_EVERY_S:
            line = f"[ilq] update {step:8d}/{self.total_steps} | Q(data) {float(np.mean(metrics['losses/q_data'])):8.2f} | "
            line += f"alpha {float(np.mean(metrics['losses/alpha'])):.3f} | {len(self.writers)} learner(s) at "
            print(line + rate_and_time_left(step, self.total_steps, train_time_s, "updates"), flush=True)
            self.last = time.time()

    def evaluation(self, step: int, returns, norm) -> None:
        for i, w in enumerate(self.writers):
            w.add_scalar("eval/episodic_return", returns[i].mean(), step)
            if norm is not None:
                w.add_scalar("eval/normalized_score", norm[i].mean(), step)
        values, n = (returns if norm is None else norm).mean(1), len(self.writers)
        parts = [f"{m} {spread(values[method_rows(g, n, len(self.methods))])}" for g, m in enumerate(self.methods)]
        print(f"[ilq] evaluation at update {step:8d} | {'return' if norm is None else 'normalised'} {' | '.join(parts)}")

    def close(self) -> None:
        for w in self.writers:
            w.close()


class PretrainProgress:
    """Part I's pretraining callback(done, total, metrics) for one model: a console line at every dynamics epoch and
    the last diffusion call, and at least every PROGRESS_EVERY_S between; the curves (tag, value, step) appended to
    `curves`; and first stop(), if given: a pending Ctrl-C or SIGTERM ends pretraining there, between jitted calls."""

    def __init__(self, kind: str, stop=None, curves=None):
        self.name = {"dynamics": "dynamics", "behavior": "diffusion"}[kind]
        self.stop, self.curves, self.t0, self.last = stop, curves, time.time(), time.time()

    def __call__(self, done: int, total: int, metrics: dict) -> None:
        if self.stop:
            self.stop()
        step = metrics.get("epoch", done)  # the dynamics' curves per epoch, the diffusion's per step
        scalars = {k: v for k, v in metrics.items() if k not in ("epoch", "elites", "holdout_mse")}
        scalars.update({f"holdout_mse_member_{i}": v for i, v in enumerate(metrics.get("holdout_mse", []))})
        if self.curves is not None:
            self.curves += [(f"{self.name}/{k}", float(v), step) for k, v in scalars.items()]
        if not ("epoch" in metrics or done == total or time.time() - self.last >= PROGRESS_EVERY_S):
            return
        unit, units = ("minibatch", "minibatches") if self.name == "dynamics" else ("step", "steps")
        line = f"[{self.name}] {unit} {done}/{total}" + (f" | loss {metrics['loss']:.4f}" if "loss" in metrics else "")
        if "epoch" in metrics:
            mse = np.array2string(np.asarray(metrics["holdout_mse"]), precision=4, separator=" ")
            line = f"[dynamics] epoch {step}/{round(total * step / done)} | train loss {metrics['train_loss']:9.4f} | "
            line += f"holdout MSE per member {mse} | elites {metrics['holdout_mse_elites']:.4f}"
        print(f"{line} | {rate_and_time_left(done, total, time.time() - self.t0, units)}", flush=True)
        self.last = time.time()


def _evaluation_worker(info, cfg, n_learners: int, episodes: int, conn) -> None:
    """An evaluation worker process: its own envs and CPU policy; (params, seeds) in through its pipe, returns (or an
    error) out. It ends when the pipe's other end closes: the evaluator closed, or its training process ended (kill
    -9 too)."""
    jax.config.update("jax_platforms", "cpu")  # the workers leave the accelerator to training
    envs, policy = make_env(info, n_learners * episodes), learners_policy(cfg, n_learners, episodes)
    with contextlib.suppress(EOFError, OSError), contextlib.closing(envs):
        while True:
            params, seeds = conn.recv()
            try:
                conn.send(evaluate(envs, policy, params, seeds).reshape(n_learners, episodes))
            except Exception as e:  # reported by the training process as one paragraph
                conn.send(f"{type(e).__name__}: {e}")


class Evaluator:
    """Evaluations of parameter snapshots: in the training loop (workers = 0) or in worker processes while training
    goes on; either way the same envs, start seeds and deterministic policy, so the same returns; results come back in
    the order they were asked for. Each worker has its own pipe (no queue, so no semaphore that a killed resource
    tracker would leave unaccounted for), and a dead worker is seen at once (its pipe ends)."""

    def __init__(self, info: DatasetInfo, cfg: ILQConfig, n_learners: int, episodes: int, workers: int, run_dir="runs/RUN"):
        self.shape, self.pending, self.run_dir, self.workers, self.sent = (n_learners, episodes), [], run_dir, [], 0
        if workers == 0:
            self.envs, self.policy = make_env(info, n_learners * episodes), learners_policy(cfg, n_learners, episodes)
        ctx = multiprocessing.get_context("spawn")  # a forked child would inherit JAX's threads
        for _ in range(workers):
            here, there = ctx.Pipe()
            worker = ctx.Process(target=_evaluation_worker, args=(info, cfg, *self.shape, there), daemon=True)
            worker.start()
            there.close()  # only the worker holds that end: its pipe ends with it
            self.workers.append((worker, here))

    def submit(self, step: int, actor_params, seeds: list, extra) -> None:
        """Evaluate a snapshot of the actors at `step` (worker by worker, in turn); `extra` comes back with its result."""
        params = jax.device_get(actor_params)
        if not self.workers:
            self.pending.append((step, evaluate(self.envs, self.policy, params, seeds).reshape(self.shape), extra))
            return
        conn = self.workers[self.sent % len(self.workers)][1]
        with self.worker_died():
            conn.send((params, seeds))
        self.pending.append((step, conn, extra))
        self.sent += 1

    def ready(self, wait: bool = False) -> list:
        """[(step, returns (learners, episodes), extra)] of the finished evaluations, in order; wait: all of them."""
        out = []
        while self.pending and (wait or not self.workers or self.pending[0][1].poll()):
            step, returns, extra = self.pending.pop(0)
            if self.workers:
                with self.worker_died():
                    returns = returns.recv()
                if isinstance(returns, str):
                    raise ILQError(f"Evaluation at update {step} failed in a worker process ({returns}).")
            out.append((step, returns, extra))
        return out

    @contextlib.contextmanager
    def worker_died(self):
        try:
            yield
        except (EOFError, OSError):  # its pipe ended
            raise ILQError(
                "An evaluation worker process died (killed, or out of memory?). The run's last checkpoint holds every "
                f"evaluation up to it: continue with `python ilq_jax.py --resume {self.run_dir} --eval-workers 0` "
                "(evaluation inside the training process)."
            ) from None

    def close(self) -> None:
        if not self.workers:
            self.envs.close()
        for worker, conn in self.workers:
            conn.close()  # an idle worker ends at once; one still evaluating is stopped
            worker.join(timeout=5)
            worker.terminate()


# -------------------------------------------------------------------------------------------------- figures and videos
def optional_output(what: str, advice: str, fn, *args) -> bool:
    """fn(*args) for an extra of a run (a figure, a video): a failure is said in one sentence and the run goes on."""
    try:
        fn(*args)
        return True
    except Exception as e:
        print(f"[ilq] {what} ({type(e).__name__}: {str(e)[:200]}); {advice}.", flush=True)
        return False


def plot_curves(summary: dict, path: str) -> dict:
    """The learning curves of a run, from its summary.json, as a PNG: per method the mean over its seeds against
    updates with a band of +- one sample std (ddof=1; none for one seed) and the dataset's own mean dashed; beside it
    Q(data), the mean Q on dataset actions since the previous evaluation (the over-optimism check of Fig. 10).
    Normalised scores, or raw returns where the dataset has no reference scores. Returns what it drew: {method: {steps,
    mean, std, q_mean, q_std}}, over seeds."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display

    normalized, steps, n = summary["dataset_mean_normalized_return"] is not None, summary["eval_steps"], summary["num_seeds"]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_s, ax_q = fig.subplots(1, 2)
    drawn = {}
    for color, (m, result) in enumerate(summary["methods"].items()):
        scores = [s["normalized_scores"] if normalized else np.mean(s["returns"], -1) for s in result["seeds"]]
        drawn[m] = dict(steps=steps)
        for ax, key, values in ((ax_s, "", scores), (ax_q, "q_", [s["q_data"] for s in result["seeds"]])):
            mean, std = np.mean(values, 0), np.std(values, 0, ddof=1) if n > 1 else np.zeros(len(steps))
            ax.plot(steps, mean, marker="os^Dv"[color % 5], ms=5, fillstyle="none", color=f"C{color}", label=m)  # may coincide
            if n > 1:
                ax.fill_between(steps, mean - std, mean + std, color=f"C{color}", alpha=0.2, lw=0)
            drawn[m].update({key + "mean": mean.tolist(), key + "std": std.tolist()})
    dataset = summary["dataset_mean_normalized_return" if normalized else "dataset_mean_return"]
    ax_s.axhline(dataset, color="gray", ls="--", label="dataset mean")
    spread = f"mean ± sample std (ddof=1) over {n} seeds" if n > 1 else "1 seed"
    ylabel = f"normalised score ({spread})" if normalized else f"return, no reference scores ({spread})"
    ax_s.set(xlabel="updates", ylabel=ylabel)
    ax_q.set(xlabel="updates", ylabel=f"Q(data) ({spread})", title="Q(data): mean Q on dataset actions (over-optimism)")
    reached, total = summary["updates"], summary["args"]["total_steps"]
    budget = f"{total} updates" if reached == total else f"{reached} of {total} updates (time box)"
    fig.suptitle(f"{summary['dataset']['name']}, {budget}")
    ax_s.legend()
    fig.savefig(path, dpi=100)
    return drawn


def redraw_curves(run_dir: str) -> None:
    """python ilq_jax.py --plot runs/<run-name>: the run's curves.png again, from its summary.json."""
    path = os.path.join(run_dir, "summary.json")
    with errors_as(f"Could not read {path}", "--plot takes the folder of a finished run (runs/<run-name>)."):
        summary = json.load(open(path))
    with errors_as("--plot needs matplotlib", "Install it: pip install -r requirements.txt."):
        import matplotlib  # noqa: F401
    with errors_as(f"Could not draw {run_dir}/curves.png from {path}", "It is not a summary.json of this version."):
        plot_curves(summary, os.path.join(run_dir, "curves.png"))
    print(f"[ilq] {run_dir}/curves.png")


VIDEO_ADVICE = (
    "videos need imageio and imageio-ffmpeg (pip install -r requirements.txt) and an OpenGL renderer for MuJoCo (without "
    "a display: MUJOCO_GL=egl with libEGL, from apt install libegl1, or MUJOCO_GL=osmesa); this run goes on without them"
)


class VideoRecorder:
    """--capture-video: one evaluation episode (the first start state of that evaluation) of the deterministic policy
    of each method's first seed, in the evaluation env, at the end of training and every --capture-video-every
    evaluations: videos/<method>-update<step>.mp4, the reset frame then one frame per step. In the training process,
    between jitted calls. The encoder and a first frame are checked before training; a failure is said once."""

    def __init__(self, args: Args, info: DatasetInfo, cfg: ILQConfig, methods: tuple, n_learners: int, run_dir: str):
        self.args, self.info, self.methods, self.n = args, info, methods, n_learners
        self.folder, self.every = os.path.join(run_dir, "videos"), args.capture_video_every
        self.policy = jax.jit(partial(deterministic_action, cfg.actor))
        wanted = args.capture_video or self.every is not None
        # Gymnasium's MuJoCo renderer reads MUJOCO_GL when it first draws: GLFW (the default) needs a display, EGL does
        # not (Mesa's EGL renders on a CPU). Set only when videos are asked for; Linux only (elsewhere "egl" is invalid)
        if wanted and sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and "MUJOCO_GL" not in os.environ:
            os.environ["MUJOCO_GL"] = "egl"
        self.on = wanted and optional_output("--capture-video: no video can be made", VIDEO_ADVICE, self.check)

    def check(self) -> None:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()  # the encoder's binary
        with contextlib.closing(self.info.eval_env.make(render_mode="rgb_array")) as env:
            env.reset(seed=0)
            if env.render() is None:
                raise ILQError(f"{self.info.eval_env.id} renders no image")

    def __call__(self, index: int, step: int, actor_params, last: bool, tag: str = "") -> None:
        """After evaluation `index` (0, 1, ...) at `step`: the videos when due, from every learner's actor_params."""
        if not (self.on and (last or (self.every and (index + 1) % self.every == 0))):
            return
        seed = evaluation_seeds(self.args.eval_seed, index, self.args.eval_episodes, 1)[0]
        for g, m in enumerate(self.methods):
            row = method_rows(g, self.n, len(self.methods)).start  # the method's first seed, copied out of the state
            params = jax.device_get(jax.tree.map(lambda x: x[row], actor_params))
            path = os.path.join(self.folder, f"{m}-update{step}{tag}.mp4")
            self.on = optional_output(f"--capture-video: {path} was not made", VIDEO_ADVICE, self.record, path, params, seed)
            if not self.on:
                return

    def record(self, path: str, params, seed: int) -> None:
        import imageio

        os.makedirs(self.folder, exist_ok=True)
        steps, total, done = 0, 0.0, False
        with contextlib.closing(self.info.eval_env.make(render_mode="rgb_array")) as env:
            try:
                obs, _ = env.reset(seed=seed)
                with imageio.get_writer(path, fps=env.metadata.get("render_fps") or 30) as video:
                    video.append_data(env.render())
                    while not done:
                        action = np.asarray(self.policy(params, jnp.asarray(flatten_obs(obs))[None]))[0]
                        obs, reward, term, trunc, _ = env.step(np.clip(action, env.action_space.low, env.action_space.high))
                        video.append_data(env.render())
                        steps, total, done = steps + 1, total + float(reward), term or trunc
            except BaseException:
                with contextlib.suppress(OSError):  # no half-written video
                    os.remove(path)
                raise
        print(f"[ilq] video {path}: {steps} steps, return {total:.2f}", flush=True)


# ---------------------------------------------------------------------------------------------------- the command line
def parse_flags(cls, argv: list, description: Optional[str] = None):
    """The command line as a flags dataclass made of flag groups (its bases, each with its GROUP): --help shows one
    box per group, and the flags keep their plain names (--env-id, not --data.env-id)."""
    groups = [(base.GROUP, base) for base in cls.__bases__]
    nested = dataclasses.make_dataclass(cls.__name__, [(g, b, dataclasses.field(default_factory=b)) for g, b in groups])
    description = inspect.cleandoc(description or cls.__doc__)
    parsed = tyro.cli(nested, args=argv, description=description, config=(tyro.conf.OmitArgPrefixes,))
    return cls(**{k: v for g, _ in groups for k, v in vars(getattr(parsed, g)).items()})


if __name__ == "__main__":
    main()
