"""The data entry point, offline: tiny Minari datasets and D4RL-format HDF5 files made here, and every error."""

import json
import os
import re
import shutil
import subprocess
import sys

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest

import ilq_jax as ilq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------------------------
# Tiny environments: a counter that terminates on even-seeded episodes and runs into its time limit on odd ones,
# and a goal-conditioned one with a Dict observation.
# ------------------------------------------------------------------------------------------------------------------


class CountEnv(gym.Env):
    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.term_at = 0, (3 if (seed or 0) % 2 == 0 else 10**6)
        return self._obs(), {}

    def _obs(self):
        return np.array([self.t, 10.0 * self.t, -self.t], np.float64)

    def step(self, action):
        self.t += 1
        return self._obs(), float(self.t), self.t >= self.term_at, False, {}


class GoalEnv(gym.Env):
    observation_space = gym.spaces.Dict(
        {
            "observation": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
            "desired_goal": gym.spaces.Box(-np.inf, np.inf, (1,), np.float64),
            "achieved_goal": gym.spaces.Box(-np.inf, np.inf, (1,), np.float64),
            "bonus": gym.spaces.Box(-np.inf, np.inf, (1,), np.float64),
        }
    )
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        return {
            "observation": np.array([self.t, self.t + 0.5]),
            "desired_goal": np.array([100.0 + self.t]),
            "achieved_goal": np.array([-1.0]),
            "bonus": np.array([200.0 + self.t]),
        }

    def step(self, action):
        self.t += 1
        return self._obs(), 0.0, False, False, {}


class CountBothEnv(CountEnv):
    """Terminates on exactly the step where the time limit also truncates."""

    def reset(self, seed=None, options=None):
        out = super().reset(seed=seed)
        self.term_at = 4
        return out


gym.register("TinyCount-v0", entry_point=f"{__name__}:CountEnv", max_episode_steps=5)
gym.register("TinyCountBoth-v0", entry_point=f"{__name__}:CountBothEnv", max_episode_steps=4)
gym.register("TinyGoal-v0", entry_point=f"{__name__}:GoalEnv", max_episode_steps=4)


def record(dataset_id, env_id, seeds, **kw):
    env = minari.DataCollector(gym.make(env_id))
    for seed in seeds:
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            done = term or trunc
    ds = env.create_dataset(
        dataset_id=dataset_id,
        algorithm_name="test",
        author="tests",
        author_email="t@t.invalid",
        code_permalink="tests/test_data.py",
        description="made by tests/test_data.py",
        eval_env=env_id,
        **kw,
    )
    env.close()
    return ds


@pytest.fixture(scope="module")
def count_dataset():
    # episodes: seed 0 terminates after 3 steps; seed 1 is truncated by the time limit after 5 steps; seed 2 terminates
    return record("tests/count/tiny-v0", "TinyCount-v0", [0, 1, 2], ref_min_score=0.0, ref_max_score=15.0)


def load(env_id, **kw):
    return ilq.load_dataset(ilq.Args(env_id=env_id, **kw))


# ------------------------------------------------------------------------------------------------------------------
# Minari
# ------------------------------------------------------------------------------------------------------------------


def test_minari_transitions_and_the_done_mask_across_a_truncation(count_dataset):
    eps = list(count_dataset.iterate_episodes())  # the recorded data: terminate, truncate (TimeLimit), terminate
    assert [bool(e.terminations[-1]) for e in eps] == [True, False, True]
    assert [bool(e.truncations[-1]) for e in eps] == [False, True, False]
    data, info = load("tests/count/tiny-v0")
    assert all(np.asarray(x).dtype == np.float32 for x in data)
    assert data.observations.shape == (11, 3) and data.actions.shape == (11, 2)
    obs, nxt = np.asarray(data.observations), np.asarray(data.next_observations)
    # successors are the next observation of the same episode, including the last step of the truncated episode
    np.testing.assert_array_equal(obs[:, 0], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(nxt[:, 0], [1, 2, 3, 1, 2, 3, 4, 5, 1, 2, 3])
    np.testing.assert_array_equal(obs[:, 1], 10 * obs[:, 0])
    # only the two real terminations mask bootstrapping; the time-limit truncation (row 7) does not
    np.testing.assert_array_equal(np.asarray(data.terminals), [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(data.rewards), [1, 2, 3, 1, 2, 3, 4, 5, 1, 2, 3])
    assert (info.obs_dim, info.act_dim) == (3, 2)
    assert (info.ref_min, info.ref_max) == (0.0, 15.0)  # from the dataset's metadata
    np.testing.assert_array_equal(info.episode_returns, [6, 15, 6])
    np.testing.assert_allclose(info.normalize([7.5]), [50.0])
    assert info.source == "Minari dataset tests/count/tiny-v0" and info.task is None and info.family == "none"
    text = ilq.describe_dataset(data, info)
    assert "11 transitions, 3 episodes" in text and "terminals 2" in text and "reference scores min 0 / max 15" in text
    envs = ilq.make_env(info, 2)  # the dataset's own env spec is its evaluation env, and its sizes match
    assert envs.num_envs == 2
    envs.close()


def test_a_termination_on_the_time_limit_step_still_masks():
    ds = record("tests/countboth/tiny-v0", "TinyCountBoth-v0", [0])
    ep = next(ds.iterate_episodes())
    assert bool(ep.terminations[-1]) and bool(ep.truncations[-1])
    data, _ = load("tests/countboth/tiny-v0")
    np.testing.assert_array_equal(np.asarray(data.terminals), [0, 0, 0, 1])


def test_dict_observations_are_flattened_in_the_documented_order():
    record("tests/goal/tiny-v0", "TinyGoal-v0", [0])
    data, info = load("tests/goal/tiny-v0")
    obs, nxt = np.asarray(data.observations), np.asarray(data.next_observations)
    # observation first, then the other keys sorted (bonus, desired_goal); achieved_goal dropped
    assert info.obs_dim == 4
    np.testing.assert_array_equal(obs[1], [1.0, 1.5, 201.0, 101.0])
    np.testing.assert_array_equal(nxt[3], [4.0, 4.5, 204.0, 104.0])
    assert data.terminals.sum() == 0  # the episode only ever truncates
    # the same order for a single Dict observation and for a batch of them
    env = GoalEnv()
    env.reset()
    single = env._obs()
    np.testing.assert_array_equal(ilq.flatten_obs(single), [0.0, 0.5, 200.0, 100.0])
    batch = {k: np.stack([v, 2 * v]) for k, v in single.items()}
    np.testing.assert_array_equal(ilq.flatten_obs(batch), [[0.0, 0.5, 200.0, 100.0], [0.0, 1.0, 400.0, 200.0]])
    # no reference scores in this dataset's metadata: raw returns only
    assert info.ref_min is None and info.ref_max is None and info.normalize([1.0]) is None
    assert "no reference scores" in ilq.describe_dataset(data, info)
    envs = ilq.make_env(info)  # the env's Dict observation space flattens to the dataset's size
    envs.close()


def test_flatten_obs_nested_and_without_an_observation_key():
    # without `observation`, every key is kept in sorted order (achieved_goal included)
    flat = ilq.flatten_obs({"desired_goal": np.array([3.0]), "achieved_goal": np.array([2.0]), "b": np.array([1.0])})
    np.testing.assert_array_equal(flat, [2.0, 1.0, 3.0])
    assert flat.dtype == np.float32
    nested = {
        "observation": {"z": np.array([2.0]), "a": np.array([1.0])},
        "desired_goal": np.array([9.0]),
        "achieved_goal": np.array([-1.0]),
    }
    np.testing.assert_array_equal(ilq.flatten_obs(nested), [1.0, 2.0, 9.0])
    np.testing.assert_array_equal(ilq.flatten_obs(np.array([[1, 2]], np.float64)), [[1.0, 2.0]])  # arrays pass


def test_missing_minari_dataset_names_the_download_command(monkeypatch):
    with pytest.raises(ilq.ILQError, match="minari download mujoco/hopper/medium-v0"):
        load("mujoco/hopper/medium-v0", download=False)
    # with download allowed and no hub reachable (HF_HUB_OFFLINE=1 in conftest), one clear message, no traceback
    with pytest.raises(ilq.ILQError, match=r"could not be downloaded.*minari download mujoco/hopper/medium-v0"):
        load("mujoco/hopper/medium-v0")
    with pytest.raises(ilq.ILQError, match="benchmarks/make_datasets.py"):
        load("ilq-local/hopper/medium-replay-v0")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no-data", "metadata"])
def test_damaged_local_minari_dataset_is_refused_with_what_to_delete(monkeypatch, tmp_path, damage):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    record("tests/count/tiny-v0", "TinyCount-v0", [0, 1])
    folder = tmp_path / "tests" / "count" / "tiny-v0"
    main = folder / "data" / "main_data.hdf5"
    blob = main.read_bytes()
    if damage == "truncate":
        main.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        main.write_bytes(b"not hdf5 at all" * 64)
    elif damage == "no-data":
        main.unlink()
    else:
        (folder / "data" / "metadata.json").write_text("{broken")
    with pytest.raises(ilq.ILQError, match=rf"'tests/count/tiny-v0' is damaged .*Delete its folder {re.escape(str(folder))}"):
        load("tests/count/tiny-v0")


# ------------------------------------------------------------------------------------------------------------------
# The locally generated default
# ------------------------------------------------------------------------------------------------------------------


def test_random_dataset_is_generated_once_labelled_as_local_and_has_reference_scores(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))  # a fresh Minari folder, whatever ran before
    data, info = load("ilq-local/hopper/random-v0", random_dataset_steps=2000)
    assert "generated" in capsys.readouterr().out
    assert data.observations.shape == (2000, 11) and data.actions.shape == (2000, 3)
    assert all(np.asarray(x).dtype == np.float32 for x in data)
    assert float(np.abs(np.asarray(data.actions)).max()) <= 1.0
    assert "not D4RL" in info.source and info.task == "hopper-random"
    assert info.name == "ilq-local/hopper/random-2000steps-v0"  # stored under an id that names its size
    assert (info.ref_min, info.ref_max) == ilq.D4RL_REF_SCORES["hopper"]
    assert info.eval_env.id == "Hopper-v5"
    meta = minari.load_dataset("ilq-local/hopper/random-2000steps-v0").storage.metadata
    assert "NOT a D4RL dataset" in meta["description"]
    assert meta["ref_min_score"] == ilq.D4RL_REF_SCORES["hopper"][0]
    assert meta["ref_max_score"] == ilq.D4RL_REF_SCORES["hopper"][1]
    assert (meta["ilq_steps"], meta["ilq_seed"], meta["ilq_env"]) == (2000, 0, "Hopper-v5")  # what made it
    text = ilq.describe_dataset(data, info)
    assert "not D4RL data" in text and "reference scores min -20.2723 / max 3234.3" in text
    # Hopper falls over under a random policy: the mask is 1 exactly where Hopper-v5's health check fails
    terminals = np.asarray(data.terminals)
    assert 0 < terminals.sum() < 2000
    np.testing.assert_array_equal(np.asarray(ilq.terminated("hopper", data.next_observations)), terminals == 1)
    assert len(info.episode_returns) >= terminals.sum()
    again, info2 = load("ilq-local/hopper/random-v0", random_dataset_steps=2000)
    assert "generated" not in capsys.readouterr().out  # the cache is reused
    assert info2.fingerprint == info.fingerprint


def test_generated_datasets_are_keyed_by_their_size_and_never_stand_in_for_another(capsys, monkeypatch, tmp_path):
    """A 999-step smoke run and a 2000-step run get two datasets; neither is the default id's (50 000 steps)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    _, big = load("ilq-local/hopper/random-v0", random_dataset_steps=2000)
    _, small = load("ilq-local/hopper/random-v0", random_dataset_steps=999)
    assert "generated" in capsys.readouterr().out  # the 999-step request made its own dataset
    assert (big.name, small.name) == ("ilq-local/hopper/random-2000steps-v0", "ilq-local/hopper/random-999steps-v0")
    assert big.fingerprint != small.fingerprint and len(small.episode_returns) < len(big.episode_returns)
    assert "ilq-local/hopper/random-v0" not in minari.list_local_datasets()  # the default run's id stays untouched


def test_a_generated_dataset_made_with_other_settings_is_refused(monkeypatch, tmp_path):
    """What sits under the default id must be the default dataset: one made with another size (an older version cached
    every size under one id) or without a record of what made it is refused with what to do, never used."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    ilq.make_random_dataset("ilq-local/hopper/random-v0", "Hopper-v5", 300, ref_scores=ilq.D4RL_REF_SCORES["hopper"])
    with pytest.raises(
        ilq.ILQError,
        match=r"'ilq-local/hopper/random-v0' was not made with this run's settings: it "
        r"records \{'steps': 300, .*'steps': 50000.*minari delete ilq-local/hopper/random-v0",
    ):
        load("ilq-local/hopper/random-v0")
    storage = minari.load_dataset("ilq-local/hopper/random-v0").storage
    storage.update_metadata(dict(ilq_steps=50_000, ilq_seed=0, ilq_env="Walker2d-v5"))
    with pytest.raises(ilq.ILQError, match="'env': 'Walker2d-v5'"):  # recorded on another env
        load("ilq-local/hopper/random-v0")
    # made by an earlier version (no record; always seed 0): its size decides, read from Minari's own total_steps
    path = tmp_path / "ilq-local" / "hopper" / "random-v0" / "data" / "metadata.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in meta.items() if not k.startswith("ilq_")}))
    with pytest.raises(ilq.ILQError, match=r"records \{'steps': 300, 'seed': 0, 'env': 'Hopper-v5'\}"):
        load("ilq-local/hopper/random-v0")
    monkeypatch.setattr(ilq, "RANDOM_DATASET_STEPS", 300)  # a default of 300 steps: the old dataset is exactly that
    data, info = load("ilq-local/hopper/random-v0", random_dataset_steps=300)
    assert data.observations.shape == (300, 11) and info.name == "ilq-local/hopper/random-v0"


def test_failed_generation_leaves_no_dataset(monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))

    def broken_step(self, action):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(minari.DataCollector, "step", broken_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        load("ilq-local/walker2d/random-v0", random_dataset_steps=100)
    assert not minari.list_local_datasets()
    assert not any(files for _, _, files in os.walk(tmp_path))  # not even a partial file


def test_a_crash_while_writing_the_dataset_removes_it_and_the_next_run_regenerates(monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    create = minari.DataCollector.create_dataset

    def crash_after_writing(self, *a, **kw):  # the files are on disk when the interruption comes
        create(self, *a, **kw)
        assert os.path.isdir(tmp_path / "ilq-local" / "walker2d" / "random-100steps-v0")
        raise KeyboardInterrupt

    monkeypatch.setattr(minari.DataCollector, "create_dataset", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        load("ilq-local/walker2d/random-v0", random_dataset_steps=100)
    assert not (tmp_path / "ilq-local" / "walker2d" / "random-100steps-v0").exists()
    assert "ilq-local/walker2d/random-100steps-v0" not in minari.list_local_datasets()
    monkeypatch.setattr(minari.DataCollector, "create_dataset", create)
    data, info = load("ilq-local/walker2d/random-v0", random_dataset_steps=100)
    assert data.observations.shape == (100, 17) and info.eval_env.id == "Walker2d-v5"


# ------------------------------------------------------------------------------------------------------------------
# D4RL HDF5 files
# ------------------------------------------------------------------------------------------------------------------


def write_d4rl(path, n=12, next_obs=True, **override):
    rng = np.random.default_rng(0)
    arrays = dict(
        observations=rng.normal(size=(n, 11)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        rewards=np.arange(n, dtype=np.float32),
        terminals=np.zeros(n, bool),
        timeouts=np.zeros(n, bool),
    )
    arrays["terminals"][3] = True  # episode 1: rows 0-3, terminates
    arrays["timeouts"][8] = True  # episode 2: rows 4-8, times out; episode 3: rows 9-11, data ends
    if next_obs:
        arrays["next_observations"] = rng.normal(size=(n, 11)).astype(np.float32)
    arrays.update(override)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return arrays


def test_d4rl_file_with_next_observations(tmp_path):
    raw = write_d4rl(tmp_path / "h.hdf5")
    data, info = load("hopper-medium-replay-v2", dataset_path=str(tmp_path / "h.hdf5"))
    np.testing.assert_array_equal(np.asarray(data.next_observations), raw["next_observations"])
    np.testing.assert_array_equal(np.asarray(data.terminals), raw["terminals"].astype(np.float32))  # timeouts: 0
    assert info.eval_env.id == "Hopper-v4" and info.task == "hopper-medium-replay"
    assert (info.ref_min, info.ref_max) == (-20.272305, 3234.3)
    assert (info.obs_dim, info.act_dim) == (11, 3)
    np.testing.assert_array_equal(info.episode_returns, [0 + 1 + 2 + 3, 4 + 5 + 6 + 7 + 8, 9 + 10 + 11])
    assert "D4RL HDF5" in info.source


def test_d4rl_file_without_next_observations_drops_unknown_successors(tmp_path):
    raw = write_d4rl(tmp_path / "h.hdf5", next_obs=False)
    data, _ = load("hopper-medium-replay", dataset_path=str(tmp_path / "h.hdf5"))
    kept = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10]  # the timeout row 8 and the final, non-terminal row 11 have no successor
    np.testing.assert_array_equal(np.asarray(data.observations), raw["observations"][kept])
    np.testing.assert_array_equal(np.asarray(data.next_observations)[:3], raw["observations"][1:4])
    np.testing.assert_array_equal(np.asarray(data.next_observations)[4:8], raw["observations"][5:9])
    np.testing.assert_array_equal(np.asarray(data.terminals), [0, 0, 0, 1, 0, 0, 0, 0, 0, 0])  # termination kept


def test_d4rl_file_is_found_in_the_d4rl_cache_folder():
    _, fname = ilq.d4rl_source("walker2d-medium", None)
    assert fname == "walker2d_medium-v2.hdf5"
    os.makedirs(os.environ["D4RL_DATASET_DIR"], exist_ok=True)
    write_d4rl(
        os.path.join(os.environ["D4RL_DATASET_DIR"], fname),
        observations=np.zeros((12, 17), np.float32),
        next_observations=np.zeros((12, 17), np.float32),
        actions=np.zeros((12, 6), np.float32),
    )
    data, info = load("walker2d-medium")
    assert info.eval_env.id == "Walker2d-v4" and data.observations.shape == (12, 17)


def test_hopper_medium_replay_is_found_under_its_d4rl_file_name(monkeypatch, tmp_path):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    raw = write_d4rl(tmp_path / "hopper_medium_replay-v2.hdf5")
    for name in ("hopper-medium-replay", "hopper-medium-replay-v2"):
        data, info = load(name, download=False)
        np.testing.assert_array_equal(np.asarray(data.observations), raw["observations"])
        assert info.source == f"D4RL HDF5 {tmp_path / 'hopper_medium_replay-v2.hdf5'}"
        assert info.task == "hopper-medium-replay" and info.family == "hopper" and info.eval_env.id == "Hopper-v4"
    assert "reference scores min -20.2723 / max 3234.3" in ilq.describe_dataset(data, info)
    with pytest.raises(ilq.ILQError, match="hopper_medium_replay-v1.hdf5"):  # another version is another file
        load("hopper-medium-replay-v1", download=False)


def test_d4rl_urls_and_file_names_per_version():
    base = "http://rail.eecs.berkeley.edu/datasets/offline_rl/"
    assert ilq.d4rl_source("hopper-medium-replay", None) == (
        base + "gym_mujoco_v2/hopper_medium_replay-v2.hdf5",
        "hopper_medium_replay-v2.hdf5",
    )
    assert ilq.d4rl_source("halfcheetah-medium-expert", "v1") == (
        base + "gym_mujoco_v1/halfcheetah_medium_expert-v1.hdf5",
        "halfcheetah_medium_expert-v1.hdf5",
    )
    # D4RL's first release (d4rl/infos.py): no version in the file name, and medium-replay is called "mixed"
    assert ilq.d4rl_source("hopper-medium-replay", "v0") == (base + "gym_mujoco/hopper_mixed.hdf5", "hopper_mixed.hdf5")
    assert ilq.d4rl_source("walker2d-medium-replay", "v0")[1] == "walker_mixed.hdf5"
    assert ilq.d4rl_source("halfcheetah-medium-expert", "v0")[1] == "halfcheetah_medium_expert.hdf5"
    assert ilq.d4rl_source("maze2d-large", None) == (
        base + "maze2d/maze2d-large-sparse-v1.hdf5",
        "maze2d-large-sparse-v1.hdf5",
    )
    assert ilq.d4rl_source("pen-cloned", "v1") == (base + "hand_dapg_v1/pen-cloned-v1.hdf5", "pen-cloned-v1.hdf5")


@pytest.mark.parametrize(
    "name, eval_env, ref",
    [
        ("halfcheetah-expert-v2", "HalfCheetah-v4", ilq.D4RL_REF_SCORES["halfcheetah"]),
        ("walker2d-random", "Walker2d-v4", ilq.D4RL_REF_SCORES["walker2d"]),
        ("maze2d-umaze", "D4RL-maze2d-umaze", (23.85, 161.86)),
        ("maze2d-medium-dense-v1", "D4RL-maze2d-medium-dense", ilq.D4RL_REF_SCORES["maze2d-medium-dense"]),
        ("pen-human", "D4RL-pen-human", ilq.D4RL_REF_SCORES["pen"]),
    ],
)
def test_d4rl_metadata_per_family(tmp_path, name, eval_env, ref):
    obs_dim, act_dim = ilq.D4RL_SIZES[ilq.family_of(name)]  # each task's own data sizes
    write_d4rl(
        tmp_path / "x.hdf5",
        observations=np.zeros((12, obs_dim), np.float32),
        next_observations=np.zeros((12, obs_dim), np.float32),
        actions=np.zeros((12, act_dim), np.float32),
    )
    _, info = load(name, dataset_path=str(tmp_path / "x.hdf5"))
    assert info.eval_env.id == eval_env and (info.ref_min, info.ref_max) == ref
    assert info.task == ilq.parse_d4rl_name(name)[0] and info.family == ilq.family_of(name)


def test_d4rl_edge_rows_without_next_observations(tmp_path):
    n = 6
    obs = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 11), np.float32)
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[2] = timeouts[2] = True  # a termination on the time-limit step: kept, and it masks
    terminals[5] = True  # the final row terminates: kept (its successor is never used)
    with h5py.File(tmp_path / "h.hdf5", "w") as f:
        f["observations"], f["actions"], f["rewards"] = obs, np.zeros((n, 3), np.float32), np.arange(n, dtype=np.float32)
        f["terminals"], f["timeouts"] = terminals, timeouts
    data, info = load("hopper-medium", dataset_path=str(tmp_path / "h.hdf5"))
    np.testing.assert_array_equal(np.asarray(data.observations)[:, 0], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(np.asarray(data.next_observations)[[0, 1, 3, 4], 0], [1, 2, 4, 5])
    np.testing.assert_array_equal(np.asarray(data.terminals), [0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(info.episode_returns, [0 + 1 + 2, 3 + 4 + 5])


def test_d4rl_file_without_timeouts(tmp_path):
    raw = write_d4rl(tmp_path / "h.hdf5", next_obs=False)
    with h5py.File(tmp_path / "h.hdf5", "a") as f:
        del f["timeouts"]
    data, info = load("hopper-medium", dataset_path=str(tmp_path / "h.hdf5"))
    # no timeouts recorded: every row but the final, non-terminal one has obs[i+1] as its successor
    np.testing.assert_array_equal(np.asarray(data.observations), raw["observations"][:11])
    np.testing.assert_array_equal(np.asarray(data.next_observations)[4:], raw["observations"][5:12])
    assert float(data.terminals.sum()) == 1.0
    np.testing.assert_array_equal(info.episode_returns, [0 + 1 + 2 + 3, sum(range(4, 12))])


def test_every_paper_name_parses_with_or_without_a_version():
    for name in ilq.D4RL_NAMES:
        assert ilq.parse_d4rl_name(name) == (name, None)
        for v in ("v0", "v1", "v2"):
            assert ilq.parse_d4rl_name(f"{name}-{v}") == (name, v)
    assert len(ilq.D4RL_NAMES) == 15 + 6 + 2
    assert ilq.d4rl_source("maze2d-umaze-dense", None)[1] == "maze2d-umaze-dense-v1.hdf5"
    assert ilq.d4rl_source("pen-human", None)[1] == "pen-v0_demos_clipped.hdf5"


def test_unknown_env_id_suggests_the_closest_names():
    with pytest.raises(ilq.ILQError, match="Did you mean: .*hopper-medium-replay"):
        load("hoper-medium-replay")
    with pytest.raises(ilq.ILQError, match="Unknown --env-id"):
        load("zzzz")


def test_d4rl_missing_and_not_downloadable_names_the_file_and_url(tmp_path, monkeypatch):
    with pytest.raises(ilq.ILQError, match=r"halfcheetah_expert-v2\.hdf5.*--no-download"):
        load("halfcheetah-expert", download=False)
    with pytest.raises(ilq.ILQError, match="does not exist"):
        load("hopper-medium", dataset_path=str(tmp_path / "nope.hdf5"))

    def unreachable(url, timeout=None):
        raise OSError("network unreachable")

    monkeypatch.setattr(ilq.urllib.request, "urlopen", unreachable)
    with pytest.raises(
        ilq.ILQError,
        match=r"Could not download http://rail\.eecs\.berkeley\.edu/datasets/offline_rl/"
        r"gym_mujoco_v2/halfcheetah_expert-v2\.hdf5.*--dataset-path",
    ):
        load("halfcheetah-expert")
    leftovers = os.listdir(os.environ["D4RL_DATASET_DIR"]) if os.path.isdir(os.environ["D4RL_DATASET_DIR"]) else []
    assert not [f for f in leftovers if f.startswith("halfcheetah_expert")]  # nothing half-written


class FakeResponse:
    """What urlopen returns: a context manager with read(n); it can break after serving some chunks."""

    def __init__(self, chunks, error=None, before_error=None):
        self.chunks, self.error, self.before_error = list(chunks), error, before_error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n=-1):
        if self.chunks:
            return self.chunks.pop(0)
        if self.error is not None:
            if self.before_error:
                self.before_error()
            raise self.error
        return b""


def test_a_download_is_placed_in_the_cache_and_reused(monkeypatch, tmp_path):
    write_d4rl(tmp_path / "src.hdf5")
    blob = (tmp_path / "src.hdf5").read_bytes()
    cache = tmp_path / "d4rl"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    urls = []
    monkeypatch.setattr(
        ilq.urllib.request, "urlopen", lambda url, timeout=None: urls.append(url) or FakeResponse([blob[:1000], blob[1000:]])
    )
    data, info = load("hopper-expert")
    assert urls == ["http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_expert-v2.hdf5"]
    assert sorted(os.listdir(cache)) == ["hopper_expert-v2.hdf5"]  # no .part left over
    assert (cache / "hopper_expert-v2.hdf5").read_bytes() == blob
    assert data.observations.shape == (12, 11) and info.source == f"D4RL HDF5 {cache / 'hopper_expert-v2.hdf5'}"
    load("hopper-expert")
    assert len(urls) == 1  # the second load reads the cache


@pytest.mark.parametrize("error", [ConnectionResetError("connection reset"), KeyboardInterrupt()])
def test_a_broken_download_leaves_nothing_behind(monkeypatch, tmp_path, error):
    cache = tmp_path / "d4rl"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    seen = []
    monkeypatch.setattr(
        ilq.urllib.request,
        "urlopen",
        lambda url, timeout=None: FakeResponse(
            [b"\x89HDF\r\n\x1a\n" + b"0" * 5000], error, lambda: seen.append(os.listdir(cache))
        ),
    )
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C is not turned into an ILQError, but still cleans up
        with pytest.raises(KeyboardInterrupt):
            load("walker2d-expert")
    else:
        with pytest.raises(
            ilq.ILQError,
            match=r"Could not download .*walker2d_expert-v2\.hdf5 \(ConnectionResetError"
            r".*--dataset-path",
        ):
            load("walker2d-expert")
    assert seen == [["walker2d_expert-v2.hdf5.part"]]  # a partial file did exist while the download ran...
    assert os.listdir(cache) == []  # ...and is gone


@pytest.mark.parametrize(
    "shapes, match",
    [
        (dict(observations=(0, 11), actions=(0, 3), rewards=(0,), terminals=(0,), timeouts=(0,)), "non-empty"),
        (dict(observations=(5, 11), actions=(5,), rewards=(5,), terminals=(5,), timeouts=(5,)), "must be 2-D"),
        (
            dict(observations=(5, 11), actions=(5, 3), rewards=(5,), terminals=(5,), timeouts=(5,), next_observations=(5, 12)),
            "next_observations shaped like observations",
        ),
        (dict(observations=(5, 11), actions=(4, 3), rewards=(5,), terminals=(5,), timeouts=(5,)), "inconsistent"),
    ],
)
def test_malformed_d4rl_arrays_are_refused(tmp_path, shapes, match):
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        for k, shape in shapes.items():
            f[k] = np.zeros(shape, np.float32)
    with pytest.raises(ilq.ILQError, match=match) as e:
        load("hopper-medium", dataset_path=str(tmp_path / "bad.hdf5"))
    assert "Pass an intact copy with --dataset-path" in str(e.value) and "delete" not in str(e.value).lower()
    os.makedirs(os.environ["D4RL_DATASET_DIR"], exist_ok=True)  # the same file in the D4RL cache: that one may go
    cached = os.path.join(os.environ["D4RL_DATASET_DIR"], "hopper_medium-v2.hdf5")
    shutil.copy(tmp_path / "bad.hdf5", cached)
    try:
        with pytest.raises(ilq.ILQError, match=match) as e:
            load("hopper-medium", download=False)
        assert "Delete it and download it again" in str(e.value)
    finally:
        os.remove(cached)


def test_truncated_or_corrupt_or_incomplete_hdf5_is_refused(tmp_path):
    write_d4rl(tmp_path / "good.hdf5")
    blob = open(tmp_path / "good.hdf5", "rb").read()
    open(tmp_path / "cut.hdf5", "wb").write(blob[: len(blob) // 2])
    open(tmp_path / "junk.hdf5", "wb").write(b"this is not hdf5" * 100)
    for name in ("cut.hdf5", "junk.hdf5"):  # files the user named: never answered "delete it"
        with pytest.raises(ilq.ILQError, match=f"{name}' as HDF5 .*truncated or corrupt. Pass an intact copy") as e:
            load("hopper-medium", dataset_path=str(tmp_path / name))
        assert "delete" not in str(e.value).lower()
    assert sorted(os.listdir(tmp_path)) == ["cut.hdf5", "good.hdf5", "junk.hdf5"]  # nothing written beside them
    with h5py.File(tmp_path / "partial.hdf5", "w") as f:
        f["observations"] = np.zeros((4, 11))
    with pytest.raises(ilq.ILQError, match=r"lacks \['actions', 'rewards', 'terminals'\]"):
        load("hopper-medium", dataset_path=str(tmp_path / "partial.hdf5"))


@pytest.mark.parametrize("key", ["observations", "actions", "rewards", "next_observations"])
def test_non_finite_values_are_refused(tmp_path, key):
    raw = write_d4rl(tmp_path / "ok.hdf5")
    bad = raw[key].copy()
    bad[5] = np.nan if key != "rewards" else np.inf
    write_d4rl(tmp_path / "bad.hdf5", **{key: bad})
    with pytest.raises(ilq.ILQError, match=rf"NaN/inf values in `{key}` \(first at transition 5\)"):
        load("hopper-medium", dataset_path=str(tmp_path / "bad.hdf5"))


def test_actions_outside_the_unit_box_are_refused(tmp_path):
    raw = write_d4rl(tmp_path / "ok.hdf5")
    acts = raw["actions"].copy()
    acts[2, 1] = 1.5
    write_d4rl(tmp_path / "bad.hdf5", actions=acts)
    with pytest.raises(ilq.ILQError, match=r"outside \[-1, 1\] \(max \|a\| = 1\.5\)"):
        load("hopper-medium", dataset_path=str(tmp_path / "bad.hdf5"))


def test_another_robots_data_under_a_d4rl_name_is_called_a_data_mismatch(tmp_path):
    """walker2d data passed as hopper-medium-replay: the data do not match the named task; changing the evaluation env
    would not help, so the message must not send the user to --eval-env-id."""
    write_d4rl(
        tmp_path / "walker.hdf5",
        observations=np.zeros((12, 17), np.float32),
        next_observations=np.zeros((12, 17), np.float32),
        actions=np.zeros((12, 6), np.float32),
    )
    with pytest.raises(
        ilq.ILQError,
        match=r"does not hold hopper-medium-replay data: its observations have size 17 "
        r"and its actions 6, but hopper data have 11 and 3",
    ) as e:
        load("hopper-medium-replay", dataset_path=str(tmp_path / "walker.hdf5"))
    assert "--eval-env-id" not in str(e.value)
    _, info = load("walker2d-medium-replay", dataset_path=str(tmp_path / "walker.hdf5"))  # the right name works
    assert info.eval_env.id == "Walker2d-v4"


def test_an_evaluation_env_that_does_not_fit_the_data_points_to_eval_env_id(tmp_path):
    write_d4rl(tmp_path / "h.hdf5")
    _, info = load("hopper-medium", dataset_path=str(tmp_path / "h.hdf5"), eval_env_id="Walker2d-v5")
    assert info.eval_env.id == "Walker2d-v5"  # the override is honoured, then checked
    with pytest.raises(ilq.ILQError, match="Walker2d-v5 has observation size 17 .* has 11 and 3.*with --eval-env-id"):
        ilq.make_env(info)
    _, info = load("hopper-medium", dataset_path=str(tmp_path / "h.hdf5"))
    ilq.make_env(info).close()


def test_a_gymnasium_env_id_given_as_env_id_says_that_env_id_names_a_dataset():
    for env_id in ("Hopper-v5", "HalfCheetah-v4", "PointMaze_UMaze-v3"):
        with pytest.raises(
            ilq.ILQError,
            match=rf"--env-id '{env_id}' is a Gymnasium environment, but --env-id names a "
            rf"DATASET.*--eval-env-id {env_id}",
        ) as e:
            load(env_id)
        if env_id == "Hopper-v5":
            assert "hopper-random, hopper-medium, hopper-medium-replay" in str(e.value)
            assert "ilq-local/hopper/random-v0" in str(e.value)


def test_minari_hub_downloads_are_installed_and_fail_offline_with_ilqs_message():
    """requirements.txt installs Minari's `hf` extra (its remote store needs huggingface_hub); with HF_HUB_OFFLINE=1
    (conftest) the download path imports and then fails with ILQ's one-paragraph message, not an ImportError."""
    requirements = open(os.path.join(ROOT, "requirements.txt")).read()
    assert re.search(r"^minari\[hdf5,hf\]==", requirements, re.M)
    import huggingface_hub  # noqa: F401  (installed by minari[hf])

    with pytest.raises(ilq.ILQError) as e:
        load("mujoco/hopper/medium-v0")
    message = str(e.value)
    assert "could not be downloaded (OfflineModeIsEnabled" in message and "ModuleNotFoundError" not in message
    assert "ImportError" not in message and "minari download mujoco/hopper/medium-v0" in message


def run_cli(*argv):
    env = dict(os.environ)  # conftest's temporary MINARI_DATASETS_PATH / D4RL_DATASET_DIR and HF_HUB_OFFLINE=1
    assert env["HF_HUB_OFFLINE"] == "1" and "ilq-tests-" in env["D4RL_DATASET_DIR"]
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ilq_jax.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1  # one paragraph
    return r.stderr


@pytest.mark.parametrize("env_id, suggestion", [("not-a-dataset", None), ("hopper-mediun", "hopper-medium")])
def test_cli_prints_one_paragraph_error_without_traceback(env_id, suggestion):
    err = run_cli("--env-id", env_id)
    assert err.startswith(f"error: Unknown --env-id '{env_id}'") and "ilq-local/hopper/random-v0" in err
    if suggestion:
        assert f"Did you mean: {suggestion}" in err


def test_cli_reports_a_corrupt_dataset_file_without_traceback(tmp_path):
    (tmp_path / "junk.hdf5").write_bytes(b"junk" * 100)
    err = run_cli("--env-id", "hopper-medium-replay", "--dataset-path", str(tmp_path / "junk.hdf5"))
    assert err.startswith(f"error: Could not read '{tmp_path / 'junk.hdf5'}' as HDF5") and "truncated or corrupt" in err
    assert "delete" not in err.lower() and (tmp_path / "junk.hdf5").exists()


def test_cli_env_id_hopper_v5_points_to_eval_env_id():
    err = run_cli("--env-id", "Hopper-v5")
    assert "names a DATASET" in err and "--eval-env-id Hopper-v5" in err
