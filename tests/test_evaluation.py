"""Evaluation: evaluate() on a tiny environment with known rewards and episode lengths that differ
across the vectorised envs gives exact returns; normalised scores are recomputed from returns with D4RL's reference
constants typed here (d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE), independently of ilq_jax's table.
Everything here is exact: no sampling."""

import gymnasium as gym
import h5py
import jax.numpy as jnp
import numpy as np
import pytest

import ilq_jax as ilq

# D4RL reference returns (random policy, expert policy), typed from d4rl/infos.py
D4RL = {"hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3), "halfcheetah": (-280.178953, 12135.0)}


class StepEnv(gym.Env):
    """Env `index`: episodes of `length` steps; step t (1-based) pays t * (1 + index) + 10 * action. The episode ends
    by termination, or by truncation when `truncate`. obs = [index, t]. Refuses to run far past its episode."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, index, length, truncate=False):
        self.index, self.length, self.truncate = index, length, truncate
        self.seeds, self.actions, self.total = [], [], 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.seeds.append(seed)
        self.t = 0
        return np.array([self.index, 0.0]), {}

    def step(self, action):
        self.total += 1
        if self.total > 50:
            raise RuntimeError("evaluate() kept stepping long after every episode ended")
        self.t += 1
        self.actions.append(float(action[0]))
        reward = self.t * (1 + self.index) + 10.0 * float(action[0])
        end = self.t >= self.length
        return np.array([self.index, float(self.t)]), reward, end and not self.truncate, end and self.truncate, {}


LENGTHS, TRUNCATE = (3, 5, 1, 8), (False, True, False, False)


def expected_return(i, gain):
    action = float(np.clip(gain * i, -1.0, 1.0))  # the policy's action, clipped to the action box
    L = LENGTHS[i]
    return (1 + i) * L * (L + 1) / 2 + 10.0 * action * L


def test_evaluate_returns_exact_sums_with_different_episode_lengths():
    envs = gym.vector.SyncVectorEnv([lambda i=i: StepEnv(i, LENGTHS[i], TRUNCATE[i]) for i in range(4)])
    policy = lambda gain, obs: gain * obs[:, :1]  # noqa: E731  (env 3 asks for 1.5: clipped to 1)
    returns = ilq.evaluate(envs, policy, jnp.asarray(0.5), 123)
    assert returns.shape == (4,)
    np.testing.assert_allclose(returns, [expected_return(i, 0.5) for i in range(4)], rtol=0, atol=1e-9)
    # one episode per env, each from its own seed (env i from seed + i); the policy acted in every step of it
    for i, env in enumerate(envs.envs):
        assert env.seeds[0] == 123 + i
        np.testing.assert_allclose(env.actions[: LENGTHS[i]], min(0.5 * i, 1.0), atol=1e-6)
    assert max(env.total for env in envs.envs) == max(LENGTHS)  # stops when the longest episode ends
    envs.close()


def test_evaluate_with_the_deterministic_policy_of_an_actor():
    """The policy train() passes: tanh(mean) of the actor; here a planted actor whose mean is atanh(0.3) everywhere."""
    actor = ilq.Actor(1, 4, 1)
    params = {
        "params": {
            "Dense_0": dict(kernel=jnp.zeros((2, 4)), bias=jnp.zeros(4)),
            "Dense_1": dict(kernel=jnp.zeros((4, 1)), bias=jnp.full(1, np.arctanh(0.3))),
            "Dense_2": dict(kernel=jnp.zeros((4, 1)), bias=jnp.zeros(1)),
        }
    }
    envs = gym.vector.SyncVectorEnv([lambda i=i: StepEnv(i, LENGTHS[i], TRUNCATE[i]) for i in range(4)])
    returns = ilq.evaluate(envs, lambda p, o: ilq.deterministic_action(actor, p, o), params, 0)
    expected = [(1 + i) * L * (L + 1) / 2 + 3.0 * L for i, L in enumerate(LENGTHS)]
    np.testing.assert_allclose(returns, expected, atol=1e-5)
    envs.close()


DIMS = {"hopper": (11, 3), "walker2d": (17, 6), "halfcheetah": (17, 6)}  # D4RL's observation and action sizes


def write_d4rl(path, rewards, ends, dims, seed=0):
    rng = np.random.default_rng(seed)
    n, (obs_dim, act_dim) = len(rewards), dims
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
        f["next_observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32)
        f["rewards"] = np.asarray(rewards, np.float32)
        f["terminals"] = np.asarray(ends, bool)
        f["timeouts"] = np.zeros(n, bool)


@pytest.mark.parametrize("family", ["hopper", "walker2d", "halfcheetah"])
def test_normalised_scores_are_recomputed_from_returns(tmp_path, family):
    """A D4RL-format file for each locomotion family: the dataset's episode returns and their normalised scores, and
    the normalisation of evaluation returns, against 100 (R - random) / (expert - random) with the typed constants."""
    lo, hi = D4RL[family]
    rewards = np.array([1.5, 2.0, -0.5, 4.0, 10.0, 0.25], np.float32)
    ends = [False, True, False, False, True, True]  # episodes: rows 0-1, 2-4, 5
    path = tmp_path / f"{family}.hdf5"
    write_d4rl(path, rewards, ends, DIMS[family])
    _, info = ilq.load_dataset(ilq.Args(env_id=f"{family}-medium", dataset_path=str(path), download=False))
    episode_returns = np.array([3.5, 13.5, 0.25])
    np.testing.assert_allclose(info.episode_returns, episode_returns, rtol=1e-6)
    np.testing.assert_allclose(info.normalize(info.episode_returns), 100 * (episode_returns - lo) / (hi - lo), rtol=1e-6)
    returns = np.array([lo, hi, 0.0, 1234.5, -50.0])
    norm = info.normalize(returns)
    np.testing.assert_allclose(norm, 100 * (returns - lo) / (hi - lo), rtol=1e-12)
    np.testing.assert_allclose(norm[:2], [0.0, 100.0], atol=1e-9)


@pytest.mark.parametrize("family", ["hopper", "walker2d", "halfcheetah"])
def test_local_random_datasets_carry_d4rl_reference_scores(family):
    """ilq-local/<robot>/random-v0 is generated with D4RL_REF_SCORES[robot] as its Minari reference scores (see
    make_random_dataset); those constants are D4RL's."""
    assert ilq.D4RL_REF_SCORES[family] == D4RL[family]
