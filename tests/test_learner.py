"""The ILQ learner: the fused jitted ILB target against a plain step-by-step computation of Eq. 16-20,
its invariants, gradient isolation, determinism, NaN handling, and the CLI (summary.json, resume)."""

import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, run_training_cli, tiny_config, with_params
from conftest import tiny_args as _tiny_args

import ilq_jax as ilq

OBS, ACT, B, N_OOD, M = 5, 2, 8, 2, 4


def setup(seed=0, family="hopper", **overrides):
    """Random (untrained) networks and models: the target must be right for any parameters."""
    cfg = tiny_config(OBS, ACT, **{**dict(batch_size=B, num_behavior_samples=M, num_ood_actions=N_OOD), **overrides})
    k = jax.random.split(jax.random.PRNGKey(seed), 8)
    dyn_net = ilq.DynamicsEnsemble(OBS + 1, 3, 16, 4)
    dyn = ilq.DynamicsModel(
        dyn_net.init(k[0], jnp.zeros((1, OBS + ACT))),
        jax.random.normal(k[1], (OBS + ACT,)),
        0.5 + jnp.abs(jax.random.normal(k[2], (OBS + ACT,))),
        jnp.array([0, 2], jnp.int32),
        OBS,
        3,
        16,
        4,
        family,
    )
    beh = ilq.BehaviorModel(
        ilq.NoiseNet(ACT, 32).init(k[3], jnp.zeros((1, ACT)), jnp.zeros(1, jnp.int32), jnp.zeros((1, OBS))), ACT, 5, 32
    )
    n = 64
    data = ilq.Transitions(
        observations=jax.random.normal(k[4], (n, OBS)) + jnp.array([1.2, 0, 0, 0, 0]),
        actions=jax.random.uniform(k[5], (n, ACT), minval=-1, maxval=1),
        rewards=jax.random.normal(k[6], (n,)),
        next_observations=jax.random.normal(k[7], (n, OBS)),
        terminals=(jnp.arange(n) % 3 == 0).astype(jnp.float32),
    )
    state = ilq.init_train_state(cfg, jax.random.PRNGKey(seed + 100))
    # targets differ from the online critics, alpha != 1: a mix-up of the two would show
    noise = jax.tree_util.tree_map(
        lambda p: 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 7), p.shape), state.critic.params
    )
    state = with_params(state, target=jax.tree_util.tree_map(jnp.add, state.critic.params, noise), log_alpha=-0.7)
    batch = jax.tree_util.tree_map(lambda x: x[:B], data)
    return cfg, state, ilq.Frozen(data, dyn, beh), batch


def q_plain(cfg, params, j, s, a):
    """Critic j on one (s, a) pair, without vmap or batching."""
    p = jax.tree_util.tree_map(lambda x: x[j], params)
    return float(ilq.QNetwork(cfg.hidden_dim, cfg.num_hidden).apply(p, np.asarray(s)[None], np.asarray(a)[None])[0])


def behaviour_samples(cfg, frozen, batch, key):
    """Eq. 20's M behaviour actions at the batch's states, drawn as ilq_update draws them (None without the limit)."""
    if not cfg.limitation:
        return None
    return ilq.diffusion_sample(frozen.behavior, batch.observations, key, cfg.num_behavior_samples)


def reference_targets(cfg, state, frozen, batch, key, behavior_actions):
    """Eq. 17-20 element by element, with the same random draws as the fused version."""
    k_next, k_ood, k_img, k_img_next = jax.random.split(key, 4)
    T = state.critic.target_params
    s, r, d, s2 = (np.asarray(x) for x in (batch.observations, batch.rewards, batch.terminals, batch.next_observations))
    alpha = float(np.exp(state.alpha.params["log_alpha"])) if (cfg.entropy and cfg.target_entropy_bonus) else 0.0

    a2, logp2 = ilq.sample_action(cfg.actor, state.actor.params, batch.next_observations, k_next)
    y_in = [
        r[i] + cfg.gamma * (1 - d[i]) * (min(q_plain(cfg, T, j, s2[i], a2[i]) for j in (0, 1)) - alpha * logp2[i])
        for i in range(B)
    ]

    s_ood = np.repeat(s, cfg.num_ood_actions, axis=0)
    a_ood, _ = ilq.sample_action(cfg.actor, state.actor.params, jnp.asarray(s_ood), k_ood)
    y_img = y_lmt = None
    if cfg.imagination:
        s_img, r_img, pen, done = ilq.dynamics_step(frozen.dynamics, jnp.asarray(s_ood), a_ood, k_img)
        a_img, logp_img = ilq.sample_action(cfg.actor, state.actor.params, s_img, k_img_next)
        y_img = []
        for i in range(len(s_ood)):
            boot = (
                0.0
                if bool(done[i])
                else cfg.gamma * (min(q_plain(cfg, T, j, s_img[i], a_img[i]) for j in (0, 1)) - alpha * logp_img[i])
            )
            y_img.append(float(r_img[i]) - cfg.penalty_coef * float(pen[i]) + boot)
    if cfg.limitation:
        a_beh = np.asarray(behavior_actions)
        per_state = [
            min(max(q_plain(cfg, T, j, s[i], a_beh[i, m]) for m in range(cfg.num_behavior_samples)) for j in (0, 1))
            for i in range(B)
        ]
        y_lmt = [per_state[i // cfg.num_ood_actions] for i in range(len(s_ood))]
    if y_img is not None and y_lmt is not None:
        y_ood = [min(a, b) + cfg.delta for a, b in zip(y_img, y_lmt)]
    else:
        y_ood = [v + cfg.delta for v in (y_img if y_img is not None else y_lmt)]
    return dict(
        y_in=np.array(y_in),
        y_ood=np.array(y_ood),
        a_ood=np.asarray(a_ood),
        s_ood=s_ood,
        y_img=None if y_img is None else np.array(y_img),
        y_lmt=None if y_lmt is None else np.array(y_lmt),
    )


def reference_loss(cfg, critic_params, batch, ref):
    """Eq. 16: eta * mean in-sample squared error + (1 - eta) * mean OOD squared error, per critic, summed."""
    s, a = np.asarray(batch.observations), np.asarray(batch.actions)
    loss = 0.0
    for j in (0, 1):
        e_in = np.mean([(q_plain(cfg, critic_params, j, s[i], a[i]) - ref["y_in"][i]) ** 2 for i in range(B)])
        e_ood = np.mean(
            [
                (q_plain(cfg, critic_params, j, ref["s_ood"][i], ref["a_ood"][i]) - ref["y_ood"][i]) ** 2
                for i in range(len(ref["y_ood"]))
            ]
        )
        loss += cfg.eta * e_in + (1 - cfg.eta) * e_ood
    return loss


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(imagination=False),
        dict(limitation=False),
        dict(target_entropy_bonus=True),
        dict(num_ood_actions=1, delta=-1.0),
    ],
)
def test_fused_target_equals_plain_reference(variant):
    cfg, state, frozen, batch = setup(**variant)
    key = jax.random.PRNGKey(42)
    a_beh = behaviour_samples(cfg, frozen, batch, jax.random.PRNGKey(43))
    fused = jax.jit(partial(ilq.ilb_targets, cfg))(state, frozen, batch, a_beh, key)
    ref = reference_targets(cfg, state, frozen, batch, key, a_beh)
    np.testing.assert_allclose(fused.y_in, ref["y_in"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.y_ood, ref["y_ood"], rtol=1e-5, atol=1e-5)
    for name in ("y_img", "y_lmt"):
        if ref[name] is None:
            assert getattr(fused, name) is None
        else:
            np.testing.assert_allclose(getattr(fused, name), ref[name], rtol=1e-5, atol=1e-5)
    loss, _ = jax.jit(partial(ilq.critic_loss, cfg))(state.critic.params, batch, fused)
    np.testing.assert_allclose(float(loss), reference_loss(cfg, state.critic.params, batch, ref), rtol=1e-5)


def test_the_given_behaviour_actions_are_used_for_the_limit():
    cfg, state, frozen, batch = setup()
    bank = jax.random.uniform(jax.random.PRNGKey(3), (B, M, ACT), minval=-1, maxval=1)
    key = jax.random.PRNGKey(5)
    fused = jax.jit(partial(ilq.ilb_targets, cfg))(state, frozen, batch, bank, key)
    ref = reference_targets(cfg, state, frozen, batch, key, np.asarray(bank))
    np.testing.assert_allclose(fused.y_lmt, ref["y_lmt"], rtol=1e-5, atol=1e-5)
    fresh = jax.jit(partial(ilq.ilb_targets, cfg))(state, frozen, batch, behaviour_samples(cfg, frozen, batch, key), key)
    assert not np.allclose(fresh.y_lmt, fused.y_lmt)


def test_ood_target_is_capped_by_the_limit_and_equals_imagination_below_it():
    seen_img, seen_lmt = 0, 0
    for seed in range(6):
        cfg, state, frozen, batch = setup(seed=seed, penalty_coef=float(seed % 3))
        a_beh = behaviour_samples(cfg, frozen, batch, jax.random.PRNGKey(seed + 1))
        t = jax.jit(partial(ilq.ilb_targets, cfg))(state, frozen, batch, a_beh, jax.random.PRNGKey(seed))
        y_img, y_lmt, y_ood = map(np.asarray, (t.y_img, t.y_lmt, t.y_ood))
        assert np.all(y_ood <= y_lmt + cfg.delta + 1e-6)
        below = y_img < y_lmt
        np.testing.assert_allclose(y_ood[below], y_img[below] + cfg.delta, rtol=1e-6)
        np.testing.assert_allclose(y_ood[~below], y_lmt[~below] + cfg.delta, rtol=1e-6)
        seen_img, seen_lmt = seen_img + below.sum(), seen_lmt + (~below).sum()
    assert seen_img > 0 and seen_lmt > 0, "both branches of the min must have been exercised"


def test_no_gradient_flows_into_targets():
    cfg, state, frozen, batch = setup(target_entropy_bonus=True)  # alpha inside the targets: its gradient must be 0 too
    a_beh = behaviour_samples(cfg, frozen, batch, jax.random.PRNGKey(1))

    def loss_through_targets(actor_params, target_params, log_alpha):
        st = with_params(state, actor=actor_params, target=target_params, log_alpha=log_alpha)
        t = ilq.ilb_targets(cfg, st, frozen, batch, a_beh, jax.random.PRNGKey(0))
        return ilq.critic_loss(cfg, state.critic.params, batch, t)[0]

    params = (state.actor.params, state.critic.target_params, state.alpha.params["log_alpha"])
    grads = jax.grad(loss_through_targets, argnums=(0, 1, 2))(*params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(np.all(np.asarray(g) == 0) for g in leaves)
    # while the online critics do get a gradient
    t = ilq.ilb_targets(cfg, state, frozen, batch, a_beh, jax.random.PRNGKey(0))
    g_critic = jax.grad(lambda p: ilq.critic_loss(cfg, p, batch, t)[0])(state.critic.params)
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(g_critic))


def _run_updates(seed, n=6):
    cfg, state, frozen, _ = setup()
    update = ilq.make_update_fn(cfg)
    state, metrics = update(state, frozen, jax.random.split(jax.random.PRNGKey(seed), n))
    return jax.device_get(metrics), state


def test_same_seed_same_numbers_and_the_update_learns_something():
    m1, s1 = _run_updates(0)
    m2, s2 = _run_updates(0)
    m3, _ = _run_updates(1)
    for k in m1:
        np.testing.assert_array_equal(m1[k], m2[k])
    assert not np.array_equal(m1["losses/critic_loss"], m3["losses/critic_loss"])
    assert m1["losses/critic_loss"].shape == (6,)
    _, s0, _, _ = setup()
    moved = jax.tree_util.tree_map(
        lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), s1.critic.target_params, s0.critic.target_params
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # soft target update happened
    assert float(s1.alpha.params["log_alpha"]) != float(s0.alpha.params["log_alpha"])  # alpha is tuned


def test_soft_target_update_uses_tau():
    cfg, state, frozen, _ = setup(tau=0.25)
    new_state, _ = ilq.ilq_update(cfg, state, frozen, jax.random.PRNGKey(0))
    expected = jax.tree_util.tree_map(lambda o, t: 0.25 * o + 0.75 * t, new_state.critic.params, state.critic.target_params)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(new_state.critic.target_params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_entropy_off_keeps_alpha_zero():
    cfg, state, frozen, _ = setup(entropy=False)
    new_state, metrics = ilq.ilq_update(cfg, state, frozen, jax.random.PRNGKey(0))
    assert float(metrics["losses/alpha"]) == 0.0 and new_state.alpha.params == state.alpha.params


def test_injected_nan_is_caught_with_the_update_step(tmp_path):
    cfg, state, frozen, _ = setup()
    state = with_params(state, critic=jax.tree_util.tree_map(lambda p: p * jnp.nan, state.critic.params))
    _, metrics = ilq.make_update_fn(cfg)(state, frozen, jax.random.split(jax.random.PRNGKey(0), 3))
    with pytest.raises(ilq.ILQError, match="update 501"):
        ilq.check_finite(jax.device_get(metrics), 501, str(tmp_path))
    finite = {k: np.zeros(3) for k in ("losses/critic_loss", "losses/actor_loss", "losses/q_data", "losses/q_ood")}
    ilq.check_finite(finite, 1, str(tmp_path))  # no false alarm


def test_paper_hyperparameters_apply_by_task_and_flags_override():
    info = ilq.DatasetInfo(
        "hopper-medium-replay", "", "hopper-medium-replay", "hopper", ilq.gym_env("Hopper-v5"), 0, 1, 11, 3, np.zeros(1), ""
    )
    hp = ilq.effective_hparams(ilq.Args(), info)
    assert (hp["eta"], hp["delta"], hp["penalty_coef"], hp["critic_lr"], hp["actor_lr"]) == (0.8, -0.5, 1.0, 3e-4, 1e-4)
    hp = ilq.effective_hparams(ilq.Args(delta=0.0, eta=0.5), info)
    assert (hp["eta"], hp["delta"]) == (0.5, 0.0) and set(hp["overridden"]) == {"eta", "delta"}
    pen = ilq.effective_hparams(
        ilq.Args(),
        ilq.DatasetInfo("pen-human", "", "pen-human", "pen", ilq.d4rl_eval_env("pen-human"), 0, 1, 45, 24, np.zeros(1), ""),
    )
    assert pen["entropy"] is False and pen["cosine_lr"] is True


def test_numeric_flags_are_validated_before_any_work():
    for bad in (
        dict(batch_size=0),
        dict(batch_size=-3),
        dict(updates_per_call=0),
        dict(total_steps=0),
        dict(eval_episodes=0),
        dict(num_seeds=0),
        dict(stop_after=0),
        dict(eta=1.5),
        dict(tau=-0.1),
        dict(critic_lr=0.0),
        dict(dynamics_elites=9),
    ):
        with pytest.raises(ilq.ILQError, match="--" + next(iter(bad)).replace("_", "-")):
            ilq.resolve_args(ilq.Args(**bad))
    with pytest.raises(ilq.ILQError, match="no OOD target"):
        ilq.resolve_args(ilq.Args(imagination=False, limitation=False))
    # any --total-steps: not tied to --updates-per-call (the last call is shorter)
    assert ilq.resolve_args(ilq.Args(total_steps=50)).total_steps == 50


def test_cli_tiny_run_writes_summary(tmp_path):
    out, summary = run_training_cli(tmp_path, "tiny", *TINY)
    first = out.stdout.splitlines()[0]  # the budget, why, and the flag that changes it
    assert first.startswith("[ilq] budget 'cpu': data generated here") and "--budget cpu|paper" in first, first
    for key in (
        "final_normalized_score",
        "dataset_mean_normalized_return",
        "eval_steps",
        "seeds",
        "evaluation",
        "updates_per_second",
        "train_time_s",
        "wall_time_s",
        "args",
        "versions",
    ):
        assert key in summary
    (seed,) = summary["seeds"]
    assert summary["eval_steps"] == [20, 40] and len(seed["returns"]) == 2 and len(seed["returns"][0]) == 2
    assert seed["seed"] == 1 and np.isclose(summary["final_normalized_score"], np.mean(seed["normalized_scores"]))
    assert summary["args"]["total_steps"] == 40 and summary["updates_per_second"] > 0
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "runs" / "tiny" / "seed_1"))
    assert "final normalised score" in out.stdout


def test_resume_equals_uninterrupted_and_run_folders_are_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    full = ilq.train(_tiny_args(tmp_path, run_name="full"))
    assert ilq.train(_tiny_args(tmp_path, run_name="half", stop_after=20)) == {}
    assert ilq.read_checkpoint(tmp_path / "runs" / "half")[0]["updates"] == 20
    resumed = ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "half")))
    assert resumed["seeds"] == full["seeds"]
    with pytest.raises(ilq.ILQError, match="already exists"):
        ilq.train(_tiny_args(tmp_path, run_name="full"))


PART_ONE_RUN = r"""
import ast, sys, types
for name in ("gymnasium", "minari", "h5py", "tyro", "tensorboard"):  # Part II's libraries: importing one fails
    sys.modules[name] = None
text = open(sys.argv[1]).read()
part_one = text[: text.index("\n# Part II")]
imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(part_one)) if isinstance(n, ast.Import) for a in n.names}
imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(part_one)) if isinstance(n, ast.ImportFrom)}
module = sys.modules["ilq_part_one"] = types.ModuleType("ilq_part_one")  # a fresh namespace (dataclasses look it up)
exec(compile(part_one, "part_one", "exec"), module.__dict__)
ns = module.__dict__
import jax, jax.numpy as jnp
cfg = ns["ILQConfig"](obs_dim=5, act_dim=2, eta=0.7, delta=0.3, penalty_coef=0.5, critic_lr=1e-3, actor_lr=1e-3,
                      entropy=True, cosine_lr=False, total_steps=10, batch_size=8, num_behavior_samples=3, hidden_dim=16)
k = jax.random.split(jax.random.PRNGKey(0), 5)
data = ns["Transitions"](jax.random.normal(k[0], (32, 5)), jax.random.uniform(k[1], (32, 2), minval=-1, maxval=1),
                         jax.random.normal(k[2], (32,)), jax.random.normal(k[3], (32, 5)), jnp.zeros(32))
frozen = ns["Frozen"](data, ns["init_dynamics"](5, 2, "hopper", members=3, elites=2, hidden=8),
                      ns["init_behavior"](5, 2, hidden=16))
state, metrics = ns["make_update_fn"](cfg)(ns["init_train_state"](cfg, k[4]), frozen, jax.random.split(k[4], 2))
print("IMPORTS", sorted(imported))
print("LOSS", float(metrics["losses/critic_loss"][-1]))
"""


def test_part_one_alone_runs_a_fused_update():
    """Part I is what a researcher copies: the file's text up to the Part II marker, executed alone in a fresh process
    where Part II's libraries cannot be imported, runs a fused update on random data; it imports only jax, flax,
    optax, chex, numpy and the standard library."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ilq_jax.py")
    out = subprocess.run(
        [sys.executable, "-c", PART_ONE_RUN, path],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    imported = set(eval(out.stdout.split("IMPORTS", 1)[1].splitlines()[0]))
    assert imported <= {
        "__future__",
        "chex",
        "dataclasses",
        "flax",
        "functools",
        "jax",
        "math",
        "numpy",
        "optax",
        "time",
        "typing",
    }, imported
    assert np.isfinite(float(out.stdout.split("LOSS", 1)[1]))
    text = open(path).read()
    lines = text.splitlines()
    part_one = next(i for i, line in enumerate(lines) if line.startswith("# Part I "))
    ilb = next(i for i, line in enumerate(lines) if line.startswith("def ilb_targets"))
    update = next(i for i, line in enumerate(lines) if line.startswith("def make_update_fn"))  # right after ilq_update
    assert part_one < 200 and ilb < 420 and update - ilb <= 150, (part_one, ilb, update)  # Eq. 16-21 read in one piece
    part_one_text = text[text.index("\n# Part I ") : text.index("\n# Part II")]  # the code (the docstring names flags)
    for run_option in ("sample_chunk", "method_rows", "bank", "bf16", "mish_one_exp"):  # chosen where a run is assembled
        assert run_option not in part_one_text, run_option


README_SNIPPET_RUN = r"""
import sys, types
for name in ("gymnasium", "minari", "h5py", "tyro", "tensorboard"):  # Part II's libraries: importing one fails
    sys.modules[name] = None
sys.path.insert(0, sys.argv[1])
import ilq_jax  # the whole file imports without them
module = sys.modules["ilq_jax"] = types.ModuleType("ilq_jax")  # and Part I copied alone is enough for the snippet
text = open(ilq_jax.__file__).read()
exec(compile(text[: text.index("\n# Part II")], "part_one", "exec"), module.__dict__)
readme = open(sys.argv[2]).read()
snippet = readme.split("**Use ILQ in your own code**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
exec(compile(snippet, "README snippet", "exec"), {})
"""


def test_the_readme_snippet_runs_on_part_one_alone():
    """`import ilq_jax` works where gymnasium, tyro, h5py, minari and tensorboard cannot be imported, and the README's
    "use ILQ in your own code" snippet, taken from the README's text, runs with `ilq_jax` being Part I alone and prints
    the shape of 10 updates' losses."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", README_SNIPPET_RUN, root, os.path.join(root, "README.md")],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(10,)"


def test_adroit_alpha_reading_is_a_flag_zero_by_default_or_fixed():
    """Entropy off (Adroit): alpha is --fixed-alpha (0 by default: no entropy term), never tuned; the actor loss is
    E[alpha log pi - min_j Q_j] with that alpha."""
    for fixed in (0.0, 0.2):
        cfg, state, frozen, batch = setup(entropy=False, fixed_alpha=fixed)
        key = jax.random.PRNGKey(3)
        new_state, (loss, logp) = ilq.actor_alpha_update(cfg, state, batch.observations, key)
        a, logp_ref = ilq.sample_action(cfg.actor, state.actor.params, batch.observations, key)
        q = cfg.critic.apply(state.critic.params, batch.observations, a).min(0)
        np.testing.assert_allclose(loss, np.mean(fixed * np.asarray(logp_ref) - np.asarray(q)), rtol=1e-5, atol=1e-6)
        assert new_state.alpha.params == state.alpha.params  # not tuned
        _, metrics = ilq.ilq_update(cfg, state, frozen, key)
        assert float(metrics["losses/alpha"]) == pytest.approx(fixed)


def test_the_default_budget_is_the_papers_on_an_accelerator_and_the_short_one_on_cpu(monkeypatch):
    """The card's command (a D4RL name, no --budget) runs the paper's 1e6 updates on a GPU/TPU, the CPU budget here;
    the data generated here keep the short budget everywhere; --budget always wins."""
    d4rl = ilq.Args(env_id="walker2d-medium-replay")
    assert (ilq.resolve_args(d4rl).budget, ilq.resolve_args(d4rl).total_steps) == ("cpu", 5_000)
    monkeypatch.setattr(ilq.jax, "default_backend", lambda: "gpu")  # the platform faked as a GPU
    assert (ilq.resolve_args(d4rl).budget, ilq.resolve_args(d4rl).total_steps) == ("paper", 1_000_000)
    assert "gpu" in ilq.default_budget(d4rl.env_id)[1] and "--budget" not in ilq.default_budget(d4rl.env_id)[1]
    assert ilq.resolve_args(ilq.Args()).budget == "cpu"  # ilq-local/hopper/random-v0
    assert ilq.resolve_args(ilq.Args(env_id="walker2d-medium-replay", budget="cpu")).budget == "cpu"
