"""From the command line to the compiled update: for every row of the paper's hyper-parameter tables and for every
learner flag, the ILQConfig that make_learners_update receives holds exactly the intended values. The values are
captured at that boundary (make_learners_update is replaced by a recorder) and compared with numbers typed here from the paper,
not recomputed by the code under test. Also: "mean of the last 10 evaluations" with 12 evaluations."""

import dataclasses

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_args as _tiny_args

import ilq_jax as ilq

# The paper's Tables 3-6 and Appendix A.2, typed independently:
# task: (eta, delta, reward-penalty coefficient, critic lr, actor lr); Adroit: no entropy, cosine schedule.
PAPER = {
    "halfcheetah-random": (0.95, 2, 0, 5e-4, 3e-4),
    "hopper-random": (0.9, 1, 1, 3e-4, 1e-4),
    "walker2d-random": (0.7, 1, 0, 5e-4, 3e-4),
    "halfcheetah-medium": (0.95, 1, 0, 5e-4, 3e-4),
    "hopper-medium": (0.95, -2, 2, 5e-4, 3e-4),
    "walker2d-medium": (0.9, 0.5, 1, 5e-4, 3e-4),
    "halfcheetah-medium-replay": (0.95, 2, 0, 5e-4, 3e-4),
    "hopper-medium-replay": (0.8, -0.5, 1, 3e-4, 1e-4),
    "walker2d-medium-replay": (0.9, 1, 2, 3e-4, 1e-4),
    "halfcheetah-medium-expert": (0.6, 1, 0, 5e-4, 3e-4),
    "hopper-medium-expert": (0.4, -0.5, 0, 5e-4, 3e-4),
    "walker2d-medium-expert": (0.8, 1, 0, 5e-4, 3e-4),
    "maze2d-umaze": (0.95, -0.5, 0, 5e-4, 3e-4),
    "maze2d-umaze-dense": (0.95, 0, 0, 5e-4, 3e-4),
    "maze2d-medium": (0.95, 0, 0, 5e-4, 3e-4),
    "maze2d-medium-dense": (0.95, 0, 0, 5e-4, 3e-4),
    "maze2d-large": (0.95, 0, 0, 5e-4, 3e-4),
    "maze2d-large-dense": (0.95, 0, 0, 5e-4, 3e-4),
    "pen-human": (0.8, -1, 0, 3e-4, 1e-4),
    "pen-cloned": (0.8, 0, 0, 3e-4, 1e-4),
}
DIMS = {"hopper": (11, 3), "walker2d": (17, 6), "halfcheetah": (17, 6), "maze2d": (4, 2), "pen": (45, 24)}


class Captured(Exception):
    pass


@pytest.fixture
def capture(monkeypatch, tmp_path):
    """Record the ILQConfig handed to make_update_fn and stop there. The evaluation env and the pretrained models
    are stand-ins (they carry no hyper-parameter); everything between the CLI and the update runs for real."""
    seen = {}

    def recorder(cfg, methods, sample_chunk=1):
        seen["cfg"] = cfg
        raise Captured

    class NoEnv:
        def close(self):
            pass

    def models(kind, args, data, info, force=False, stop=None, curves=None):
        obs, act = info.obs_dim, info.act_dim
        net = ilq.DynamicsEnsemble(obs + 1, 2, 8, 2)
        dyn = ilq.DynamicsModel(
            net.init(jax.random.PRNGKey(0), jnp.zeros((1, obs + act))),
            jnp.zeros(obs + act),
            jnp.ones(obs + act),
            jnp.arange(1),
            obs,
            2,
            8,
            2,
            info.family,
        )
        noise = ilq.NoiseNet(act, 8)
        beh = ilq.BehaviorModel(
            noise.init(jax.random.PRNGKey(1), jnp.zeros((1, act)), jnp.zeros(1, jnp.int32), jnp.zeros((1, obs))), act, 2, 8
        )
        side = dict(kind=kind, config={}, trained=0, metrics={})
        return (dyn if kind == "dynamics" else beh), side, "stand-in"

    monkeypatch.setattr(ilq, "make_learners_update", recorder)
    monkeypatch.setattr(ilq, "make_env", lambda info, n=1: NoEnv())
    monkeypatch.setattr(ilq, "load_or_train", models)
    monkeypatch.chdir(tmp_path)
    return seen


def d4rl_file(path, obs_dim, act_dim, n=300):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
        f["next_observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = np.arange(n) % 20 == 19


@pytest.mark.parametrize("task", sorted(PAPER))
def test_every_paper_row_reaches_the_compiled_update(task, capture, tmp_path):
    family = task.split("-")[0]
    path = tmp_path / f"{task}.hdf5"
    d4rl_file(path, *DIMS[family])
    with pytest.raises(Captured):
        ilq.main(["--env-id", task, "--dataset-path", str(path), "--run-name", task])
    cfg = capture["cfg"]
    eta, delta, penalty, critic_lr, actor_lr = PAPER[task]
    adroit = family == "pen"
    assert (cfg.eta, cfg.delta, cfg.penalty_coef, cfg.critic_lr, cfg.actor_lr) == (eta, delta, penalty, critic_lr, actor_lr)
    assert (cfg.entropy, cfg.cosine_lr) == (not adroit, adroit)
    assert (cfg.obs_dim, cfg.act_dim) == DIMS[family]
    # Table 3, the same for every task
    assert (cfg.gamma, cfg.tau, cfg.batch_size, cfg.num_behavior_samples, cfg.hidden_dim, cfg.num_hidden) == (
        0.99,
        0.005,
        256,
        10,
        256,
        3,
    )
    assert (cfg.imagination, cfg.limitation, cfg.target_entropy_bonus, cfg.num_ood_actions) == (True, True, False, 1)


def test_every_learner_flag_reaches_the_compiled_update(capture, tmp_path):
    path = tmp_path / "hopper.hdf5"
    d4rl_file(path, 11, 3)
    # distinct values everywhere, so that two flags wired to each other's field would show
    flags = dict(
        eta=0.33,
        delta=0.77,
        penalty_coef=1.5,
        critic_lr=1.1e-5,
        actor_lr=2.2e-5,
        gamma=0.95,
        tau=0.011,
        batch_size=64,
        num_behavior_samples=7,
        num_ood_actions=3,
        hidden_dim=48,
        num_hidden=2,
        total_steps=123,
    )
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    argv += [
        "--env-id",
        "hopper-medium-replay",
        "--dataset-path",
        str(path),
        "--run-name",
        "flags",
        "--no-limitation",
        "--target-entropy-bonus",
        "--no-entropy",
        "--cosine-lr",
        "--fixed-alpha=0.125",
    ]
    with pytest.raises(Captured):
        ilq.main(argv)
    cfg = capture["cfg"]
    for k, v in flags.items():
        assert getattr(cfg, k) == v, k
    assert (cfg.imagination, cfg.limitation, cfg.target_entropy_bonus, cfg.entropy, cfg.cosine_lr) == (
        True,
        False,
        True,
        False,
        True,
    )
    assert cfg.fixed_alpha == 0.125
    argv = ["--env-id", "hopper-medium-replay", "--dataset-path", str(path), "--run-name", "flags2", "--no-imagination"]
    with pytest.raises(Captured):
        ilq.main(argv)
    assert (capture["cfg"].imagination, capture["cfg"].limitation) == (False, True)


def test_final_score_is_the_mean_of_the_last_10_of_12_evaluations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = dataclasses.replace(_tiny_args(tmp_path, run_name="twelve"), total_steps=24, eval_interval=2, eval_episodes=1)
    summary = ilq.train(args)
    (seed,) = summary["seeds"]
    scores = seed["normalized_scores"]
    assert len(scores) == 12 and summary["eval_steps"] == list(range(2, 25, 2))
    assert seed["final_normalized_score"] == pytest.approx(np.mean(scores[2:]), rel=1e-12)
    assert not np.isclose(np.mean(scores[2:]), np.mean(scores))  # the first two evaluations are left out
