"""Evaluation where the data were recorded: D4RL locomotion names on Gymnasium's -v4 envs with clipped actions, and
D4RL maze2d / pen rebuilt on Gymnasium-Robotics' physics, checked against D4RL's definitions (frame, observation,
reward, time limits, start distribution, pen drop); the maze2d and pen data makers of benchmarks/make_datasets.py;
and both pipelines end to end on locally made data in D4RL's HDF5 layout at a tiny budget."""

import os
import re
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
from conftest import run_training_cli, tiny_flags

import ilq_jax as ilq
from benchmarks import make_datasets as md

pytest.importorskip("gymnasium_robotics")
gym = ilq.gym
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval_env_spec(task):
    """(maker, description) of the evaluation env of a D4RL name (with or without its -vN suffix)."""
    name = re.sub(r"-v\d+$", "", task)
    if ilq.parse_d4rl_name(name) is None and name != "pen-expert":
        raise ValueError(f"{task} is not a D4RL name this project evaluates")
    env = ilq.d4rl_eval_env(name)
    return env.make, env.note


de = types.SimpleNamespace(**{k: getattr(ilq, k) for k in dir(ilq) if not k.startswith("__")})
de.__dict__.update(
    {
        k: getattr(md, k)
        for k in ("WaypointController", "make_maze2d_dataset", "make_pen_dataset", "d4rl_maze2d_reward", "CollectingMaze2d")
    }
)
de.d4rl_eval_env_spec = _eval_env_spec
# the evaluation env as the data maker drives it: a given start state (reset options), D4RL's time limit
de.make_collecting_maze2d = lambda maze, dense=False: gym.wrappers.TimeLimit(
    md.CollectingMaze2d(maze, dense), ilq.D4RL_MAZE2D[maze]["max_episode_steps"]
)
OPEN = {m: set(de.maze2d_cells(m)[0]) for m in de.D4RL_MAZE2D}


@pytest.fixture(scope="module")
def umaze():
    env = de.make_collecting_maze2d("umaze", dense=False)
    yield env
    env.close()


@pytest.fixture(scope="module")
def large():
    env = de.make_collecting_maze2d("large", dense=False)
    yield env
    env.close()


def cell_of(pos):
    """The cell a D4RL-frame position lies in: cell r spans qpos [r - 0.7, r + 0.3) (particle 0.2 off centre)."""
    return tuple(int(v) for v in np.floor(np.asarray(pos) + 0.5 + de.D4RL_QPOS_OFFSET))


# ------------------------------------------------------------------- maze2d: frame and layout


def test_goal_cells_time_limits_and_spaces():
    assert {m: de.maze2d_cells(m)[1] for m in de.D4RL_MAZE2D} == {"umaze": (1, 1), "medium": (6, 6), "large": (7, 9)}
    for maze, steps in (("umaze", 300), ("medium", 600), ("large", 800)):
        env = de.make_d4rl_maze2d(maze, dense=False)
        assert env._max_episode_steps == steps
        assert env.observation_space.shape == (4,)
        assert env.action_space.shape == (2,)
        assert (env.action_space.low == -1).all() and (env.action_space.high == 1).all()
        np.testing.assert_array_equal(env.env.target, de.maze2d_cells(maze)[1])  # fixed target: the goal cell
        env.close()


@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_mapping_is_librarys_cell_centres_plus_offset(maze):
    env = de.CollectingMaze2d(maze)
    m = env.maze_obj
    for r, c in OPEN[maze]:
        # D4RL qpos (r - 0.2, c - 0.2) is the centre of cell (r, c), the library's cell_rowcol_to_xy
        np.testing.assert_allclose(
            de.d4rl_to_gym_pos(m, [r - 0.2, c - 0.2]), m.cell_rowcol_to_xy(np.array([r, c])), atol=1e-12
        )
        p = np.array([r, c]) + np.array([0.13, -0.07])
        np.testing.assert_allclose(de.gym_to_d4rl_pos(m, de.d4rl_to_gym_pos(m, p)), p, atol=1e-12)
    v = np.array([0.3, -0.7])
    np.testing.assert_allclose(de.gym_to_d4rl_vec(de.d4rl_to_gym_vec(v)), v)
    env.close()


@pytest.mark.parametrize(
    "maze,qpos,gym_xy",
    [
        ("umaze", (1, 1), (-0.8, 0.8)),
        ("medium", (6, 6), (2.7, -2.7)),
        ("large", (7, 9), (3.7, -3.2)),
        ("large", (1, 1), (-4.3, 2.8)),
    ],
)
def test_known_qpos_maps_to_expected_observation(maze, qpos, gym_xy):
    env = de.make_collecting_maze2d(maze, dense=False)
    obs, _ = env.reset(seed=0, options={"qpos": qpos, "qvel": (0.3, -0.2)})
    data = env.unwrapped.point_env.data
    np.testing.assert_allclose(data.qpos, gym_xy, atol=1e-12)  # where the library's particle is
    np.testing.assert_allclose(data.qvel, (-0.2, -0.3), atol=1e-12)  # D4RL (vx, vy) -> library (vy, -vx)
    np.testing.assert_allclose(obs, [*qpos, 0.3, -0.2], atol=1e-12)  # and back: D4RL's 4-d layout
    env.close()


@pytest.mark.parametrize(
    "maze,start,stops",
    [
        # D4RL walls: cell (r, c) is a box centred at world (r + 1, c + 1), half-size 0.5; particle radius 0.1 at
        # world qpos + 1.2. So a wall on row r' stops the particle at qpos_x = r' - 0.8 (from below) / r' + 0.4.
        ("umaze", (1, 1), {(-1, 0): 0.4, (1, 0): 1.2, (0, -1): 0.4, (0, 1): 3.2}),
        ("large", (7, 9), {(-1, 0): 6.4, (1, 0): 7.2, (0, -1): 7.4, (0, 1): 10.2}),
    ],
)
def test_walls_are_where_d4rl_puts_them(maze, start, stops, request):
    env = request.getfixturevalue(maze)
    for push, stop in stops.items():
        obs, _ = env.reset(seed=0, options={"qpos": start, "qvel": (0, 0)})
        for _ in range(150):
            obs, *_ = env.step(push)
        for _ in range(50):
            obs, *_ = env.step((0, 0))
        axis = 0 if push[0] else 1
        assert abs(obs[axis] - stop) < 0.03, (push, obs)
        assert abs(obs[1 - axis] - start[1 - axis]) < 1e-6


def test_walls_at_d4rl_height_give_the_same_trajectory():
    import mujoco

    def run(lower):
        env = de.CollectingMaze2d("umaze")
        m = env.unwrapped.point_env.model
        if lower:  # D4RL's walls span z in [-0.2, 0.2]; the library's [0, 0.4]
            names = [mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_GEOM, g) or "" for g in range(m.ngeom)]
            ids = [g for g, name in enumerate(names) if name.startswith("block_")]
            assert len(ids) == 18
            m.geom_pos[ids, 2] = 0.0
        env.reset(seed=0, options={"qpos": (1, 1), "qvel": (0, 0)})
        out, contacts = [], 0
        for a in [(-1, -0.3)] * 60 + [(0.3, -1)] * 60 + [(1, 1)] * 80 + [(1, -0.2)] * 80:
            out.append(env.step(a)[0])
            contacts += env.unwrapped.point_env.data.ncon
        env.close()
        return np.array(out), contacts

    (a, ca), (b, cb) = run(False), run(True)
    assert ca > 280 + 50  # the ground contact on every step, plus wall contacts
    np.testing.assert_array_equal(a, b)
    assert ca == cb


def test_velocity_clip_and_euler_step(umaze):
    obs, _ = umaze.reset(seed=0, options={"qpos": (3, 2), "qvel": (20.0, -30.0)})
    nobs, *_ = umaze.step((0, 0))
    # D4RL clips qvel to +-5 before the step; joint damping then slows it a little
    assert 4.9 < nobs[2] <= 5.0 and -5.0 <= nobs[3] < -4.9
    np.testing.assert_allclose(nobs[:2] - obs[:2], 0.01 * nobs[2:], atol=1e-12)  # Euler, timestep 0.01, D4RL axes


# ------------------------------------------------------------------- maze2d: reward, termination, resets


def test_sparse_reward_radius(umaze):
    assert de.d4rl_maze2d_reward([1.0, 1.5], [1.0, 1.0], dense=False) == 1.0  # exactly at 0.5
    assert de.d4rl_maze2d_reward([1.5, 1.0], [1.0, 1.0], dense=False) == 1.0
    assert de.d4rl_maze2d_reward([1.0, 1.5 + 1e-9], [1.0, 1.0], dense=False) == 0.0
    target = np.array([1.0, 1.0])
    for offset, expected in (
        ((0, 0), 1.0),
        ((0.3, 0.3), 1.0),
        ((0.0, 0.5 - 1e-6), 1.0),
        ((0.0, 0.5 + 1e-6), 0.0),
        ((-0.5 - 1e-6, 0.0), 0.0),
        ((-0.36, 0.36), 0.0),
        ((0, 2.0), 0.0),
    ):
        obs, _ = umaze.reset(seed=0, options={"qpos": target + offset, "qvel": (0, 0)})
        nobs, reward, *_ = umaze.step((0, 0))
        np.testing.assert_array_equal(nobs[:2], obs[:2])  # at rest, no force: the particle stays put
        assert reward == expected, (offset, reward)


def test_dense_reward():
    env = de.make_collecting_maze2d("umaze", dense=True)
    obs, _ = env.reset(seed=0, options={"qpos": (1.0, 2.0), "qvel": (0, 0)})
    _, reward, *_ = env.step((0, 0))
    assert reward == pytest.approx(np.exp(-1.0), abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(50):
        obs, reward, *_ = env.step(rng.uniform(-1, 1, 2))
        assert reward == pytest.approx(np.exp(-np.linalg.norm(obs[:2] - np.array([1.0, 1.0]))), abs=1e-12)
    env.close()


@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_never_terminates_and_truncates_at_d4rl_limit(maze):
    env = de.make_collecting_maze2d(maze, dense=False)
    env.reset(seed=1)
    rng = np.random.default_rng(1)
    limit = de.D4RL_MAZE2D[maze]["max_episode_steps"]
    rewards = []
    for t in range(1, limit + 1):
        obs, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 2))
        rewards.append(reward)
        assert not terminated
        assert truncated == (t == limit)
        assert cell_of(obs[:2]) in OPEN[maze]  # never inside a wall
    # reaching the target does not end the episode either
    obs, _ = env.reset(seed=0, options={"qpos": de.maze2d_cells(maze)[1], "qvel": (0, 0)})
    _, reward, terminated, truncated, _ = env.step((0, 0))
    assert reward == 1.0 and not terminated and not truncated
    env.close()


def test_start_distribution(umaze):
    n = 1400
    qpos, qvel, cells = np.zeros((n, 2)), np.zeros((n, 2)), []
    for i in range(n):
        obs, _ = umaze.reset(seed=1000 + i)
        qpos[i], qvel[i] = obs[:2], obs[2:]
        cells.append(tuple(int(v) for v in np.round(obs[:2])))
    # start cell: uniform over the empty cells and the goal cell (7 in the U-maze)
    assert set(cells) == OPEN["umaze"] and len(OPEN["umaze"]) == 7
    counts = np.array([cells.count(c) for c in sorted(OPEN["umaze"])])
    assert np.all(np.abs(counts - n / 7) < 5 * np.sqrt(n / 7 * 6 / 7)), counts
    # qpos = cell + U(-0.1, 0.1) per axis
    noise = qpos - np.round(qpos)
    assert np.abs(noise).max() <= 0.1 and np.abs(noise).max() > 0.099
    assert np.abs(noise.mean(0)).max() < 0.01 and np.allclose(noise.std(0), 0.2 / np.sqrt(12), rtol=0.1)
    # qvel ~ N(0, 0.1^2) per axis
    assert np.abs(qvel.mean(0)).max() < 0.015 and np.allclose(qvel.std(0), 0.1, rtol=0.1)


def test_seeded_resets_are_reproducible(umaze):
    a, _ = umaze.reset(seed=7)
    b, _ = umaze.reset(seed=7)
    c, _ = umaze.reset(seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    make, _ = de.d4rl_eval_env_spec("maze2d-umaze-v1")
    envs = gym.vector.SyncVectorEnv([make, make])
    x, _ = envs.reset(seed=[7, 8])
    np.testing.assert_array_equal(x[0], a)
    np.testing.assert_array_equal(x[1], c)
    envs.close()


# ------------------------------------------------------------------- d4rl_eval_env_spec
MASS_FIELDS = ("body_mass", "body_inertia", "body_ipos", "body_iquat")


def v4_with_masses_of(env, env_id):
    """gym.make(env_id) as shipped, then given env's body masses, inertias and inertial frames."""
    import mujoco

    ref = gym.make(env_id)
    for field in MASS_FIELDS:
        getattr(ref.unwrapped.model, field)[:] = getattr(env.unwrapped.model, field)
    mujoco.mj_setConst(ref.unwrapped.model, ref.unwrapped.data)
    return ref


@pytest.mark.parametrize(
    "task,env_id,obs_dim",
    [
        ("hopper-medium-v2", "Hopper-v4", 11),
        ("walker2d-medium-replay", "Walker2d-v4", 17),
        ("halfcheetah-expert-v2", "HalfCheetah-v4", 17),
    ],
)
def test_locomotion_is_v4_with_clipped_actions(task, env_id, obs_dim):
    make, desc = de.d4rl_eval_env_spec(task)
    assert env_id in desc and "\n" not in desc
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = make()
    with pytest.warns(DeprecationWarning, match="out of date"):  # the reference env; make() stays silent
        ref = v4_with_masses_of(env, env_id)
    assert env.spec.id == env_id and env.spec.max_episode_steps == 1000
    obs, _ = env.reset(seed=3)
    ref.reset(seed=3)
    assert obs.shape == (obs_dim,)
    big = np.linspace(-4, 4, env.action_space.shape[0])
    for _ in range(5):
        obs, *_ = env.step(big)
        ref_obs, *_ = ref.step(np.clip(big, -1, 1))
        np.testing.assert_array_equal(obs, ref_obs)  # out-of-range actions act as clipped to [-1, 1]
    np.testing.assert_array_equal(env.unwrapped.data.ctrl, np.clip(big, -1, 1))
    if env_id == "Walker2d-v4":  # v2/v4 right foot friction 0.9; Walker2d-v5 changed it to 1.9
        import mujoco

        m = env.unwrapped.model
        assert m.geom_friction[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "foot_geom"), 0] == 0.9
    env.close()
    ref.close()


# gym -v2 on mujoco-py (MuJoCo < 2.1.2) computed a capsule's mass and inertia as a cylinder's of half-length h + r/2
V2_MASSES = {
    "hopper": dict(torso=3.5343, thigh=3.9270, leg=2.7143, foot=5.0894),
    "halfcheetah": dict(torso=6.3603, bthigh=1.5352, bshin=1.5809, bfoot=1.0691, fthigh=1.4256, fshin=1.1789, ffoot=0.8499),
}
WALKER2D_GEOMS = {  # walker2d.xml: body -> its capsules (radius r, half-length h), density 1000 (MuJoCo's default)
    "torso": [(0.05, 0.2)],
    "thigh": [(0.05, 0.225)],
    "leg": [(0.04, 0.25)],
    "foot": [(0.06, 0.1)],
    "thigh_left": [(0.05, 0.225)],
    "leg_left": [(0.04, 0.25)],
    "foot_left": [(0.06, 0.1)],
}


def old_cylinder(r, h, density=1000.0):
    """(mass, axial inertia, transverse inertia) of the cylinder MuJoCo < 2.1.2 put in place of a capsule (r, h)."""
    length = 2 * h + r  # the middle section extended by r/2 at both ends
    mass = density * np.pi * r**2 * length
    return mass, mass * r**2 / 2, mass * (3 * r**2 + length**2) / 12


@pytest.mark.parametrize("task", ["hopper-medium-v2", "walker2d-medium-replay", "halfcheetah-expert"])
def test_locomotion_has_the_v2_masses(task):
    import mujoco

    family = task.split("-")[0]
    env_id = ilq.D4RL_LOCOMOTION_V4[family]
    env = ilq.d4rl_eval_env(task).make()
    m = env.unwrapped.model
    body = lambda name: mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, name)
    expected = V2_MASSES.get(family)
    if family == "walker2d":  # from the cylinder rule, summed over each body's geoms
        expected = {}
        for name, capsules in WALKER2D_GEOMS.items():
            b = body(name)
            geoms = range(m.body_geomadr[b], m.body_geomadr[b] + m.body_geomnum[b])
            np.testing.assert_allclose(sorted(m.geom_size[g, :2].tolist() for g in geoms), sorted(capsules), atol=1e-12)
            assert all(m.geom_type[g] == mujoco.mjtGeom.mjGEOM_CAPSULE for g in geoms)
            parts = np.array([old_cylinder(r, h) for r, h in capsules])
            expected[name] = parts[:, 0].sum()
            if len(capsules) == 1:  # principal inertia of one cylinder
                np.testing.assert_allclose(sorted(m.body_inertia[b]), sorted(parts[0, [1, 2, 2]]), rtol=5e-3)
    assert sorted(expected) == sorted(mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_BODY, b) for b in range(1, m.nbody))
    got = [m.body_mass[body(name)] for name in expected]
    np.testing.assert_allclose(got, list(expected.values()), rtol=5e-3)
    with pytest.warns(DeprecationWarning, match="out of date"):
        today = gym.make(env_id).unwrapped.model
    assert not np.allclose(today.body_mass, m.body_mass, rtol=5e-3)  # the shipped -v4 robot is another one
    for field in ("geom_type", "geom_size", "geom_pos", "geom_quat", "geom_friction", "body_pos", "body_quat"):
        np.testing.assert_array_equal(getattr(m, field), getattr(today, field))  # the contact geometry is -v4's
    assert (m.geom_type == mujoco.mjtGeom.mjGEOM_CAPSULE).sum() == m.nbody - 1 + (family == "halfcheetah")
    assert f"-v2 masses on MuJoCo {ilq.package_versions()['mujoco']}" in ilq.d4rl_eval_env(task).note
    env.close()


@pytest.mark.parametrize("family", ["hopper", "walker2d", "halfcheetah"])
def test_locomotion_rules_stay_v4s(family):
    """Past its masses the evaluation env is -v4: -v4 given the same mass properties yields the same observations,
    rewards, terminations and truncations step for step, over several episodes; and resets are -v4's as shipped."""
    env_id = ilq.D4RL_LOCOMOTION_V4[family]
    env = ilq.make_d4rl_locomotion(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ref, shipped = v4_with_masses_of(env, env_id), gym.make(env_id)
    assert type(env.unwrapped) is type(ref.unwrapped) and env.spec.max_episode_steps == 1000
    rng, seed, ends = np.random.default_rng(0), 0, {"terminated": 0, "truncated": 0}
    np.testing.assert_array_equal(env.reset(seed=seed)[0], shipped.reset(seed=seed)[0])
    ref.reset(seed=seed)
    for _ in range(1100):
        action = rng.uniform(-1, 1, env.action_space.shape)
        out, ref_out = env.step(action), ref.step(action)
        for x, y in zip(out[:4], ref_out[:4]):
            np.testing.assert_array_equal(x, y)
        if out[2] or out[3]:
            ends["terminated" if out[2] else "truncated"] += 1
            seed += 1
            np.testing.assert_array_equal(env.reset(seed=seed)[0], ref.reset(seed=seed)[0])
    if family == "halfcheetah":
        assert ends == {"terminated": 0, "truncated": 1}
    else:
        assert ends["terminated"] >= 2
    for e in (env, ref, shipped):
        e.close()


def random_d4rl_file(path, obs_dim: int, act_dim: int, n: int = 50):
    """A small D4RL-layout file of random transitions (sizes of the named robot)."""
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for k, shape in (("observations", (n, obs_dim)), ("next_observations", (n, obs_dim)), ("actions", (n, act_dim))):
            f[k] = rng.uniform(-1, 1, size=shape).astype(np.float32)
        f["rewards"], f["terminals"] = rng.normal(size=n).astype(np.float32), np.zeros(n, bool)
    return path


def test_eval_env_id_v4_is_the_shipped_robot(tmp_path):

    path = random_d4rl_file(tmp_path / "hopper.hdf5", 11, 3)
    args = ilq.Args(env_id="hopper-medium", dataset_path=str(path), download=False, eval_env_id="Hopper-v4")
    _, info = ilq.load_dataset(args)
    assert info.eval_env.id == "Hopper-v4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        envs = ilq.make_env(info, 1)
    # today's exact capsules, MuJoCo >= 2.1.2: 1000 pi r^2 (2h + 4r/3)
    np.testing.assert_allclose(envs.envs[0].unwrapped.model.body_mass[1:], [3.6652, 4.0579, 2.7814, 5.3156], rtol=1e-4)
    envs.close()


def test_spec_routes_maze2d_and_pen_and_refuses_others():
    for task, dense, steps in (
        ("maze2d-umaze-v1", False, 300),
        ("maze2d-medium-dense-v1", True, 600),
        ("maze2d-large-dense", True, 800),
    ):
        make, desc = de.d4rl_eval_env_spec(task)
        env = make()
        assert isinstance(env.env, de.D4RLMaze2d) and env.env.dense == dense and env._max_episode_steps == steps
        assert ("Dense-v3" in desc) == dense and "\n" not in desc
        env.close()
    for task in ("pen-human-v0", "pen-cloned-v1", "pen-expert"):
        make, desc = de.d4rl_eval_env_spec(task)
        env = make()
        assert isinstance(env.env, de.D4RLPen) and env._max_episode_steps == 100
        env.close()
    for bad in ("antmaze-umaze-v2", "maze2d-open-v0", "door-human-v1", "hopper", "mujoco/hopper/medium-v0"):
        with pytest.raises(ValueError):
            de.d4rl_eval_env_spec(bad)


# ------------------------------------------------------------------- pen


def test_pen_ends_when_the_pen_drops():
    env = de.make_d4rl_pen()
    base = env.unwrapped
    obs, _ = env.reset(seed=0)
    assert obs.shape == (45,) and env.action_space.shape == (24,)
    rng = np.random.default_rng(0)
    for t in range(1, 101):  # noqa: B007  (t is read after the loop)
        obs, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 24).astype(np.float32))
        z = base.data.xpos[base.obj_body_id][2]
        assert obs[de.PEN_OBJ_Z] == z
        assert terminated == (z < 0.075)
        if terminated:
            break
    assert terminated and not truncated and t < 100, t  # uniform random actions drop the pen early
    assert reward < -3  # AdroitHandPen's dense reward includes D4RL's -5 drop penalty
    env.close()


def test_pen_truncates_at_100_steps():
    env = de.make_d4rl_pen()
    base = env.unwrapped
    env.reset(seed=0)
    hold = np.clip((base.data.qpos[base.model.actuator_trnid[:, 0]] - base.act_mean) / base.act_rng, -1, 1)
    for t in range(1, 101):
        obs, _, terminated, truncated, _ = env.step(hold.astype(np.float32))
        assert not terminated and truncated == (t == 100)
    assert obs[de.PEN_OBJ_Z] > 0.2  # still in the hand
    env.close()


# ------------------------------------------------------------------- locally made data


def test_waypoint_controller_plans_d4rl_shortest_path():
    ctrl = de.WaypointController("umaze", np.random.default_rng(0))
    assert ctrl._path((3, 1), (1, 1)) == [(3, 2), (3, 3), (2, 3), (1, 3), (1, 2), (1, 1)]
    assert ctrl._path((1, 1), (1, 1)) == [(1, 1)]
    assert ctrl._path((2, 1), (1, 1)) == [(1, 1)]  # a start rounded into a wall cell steps out of it
    ctrl.get_action(np.array([3.05, 0.95]), np.zeros(2), np.array([0.93, 1.04]))
    wps = np.array(ctrl._waypoints)
    cells = np.array([(3, 2), (3, 3), (2, 3), (1, 3), (1, 2), (1, 1)])
    assert np.all((cells[:-1] - wps[:-1] >= 0) & (cells[:-1] - wps[:-1] <= 0.2))  # D4RL: cell - U(0, 0.2)
    assert np.ptp(cells[:-1] - wps[:-1]) > 0.05
    np.testing.assert_array_equal(wps[-1], (1, 1))  # the target cell exactly
    action, solved = ctrl.get_action(np.array([3.05, 0.95]), np.zeros(2), np.array([0.93, 1.04]))
    np.testing.assert_allclose(action, np.clip(10 * (wps[0] - [3.05, 0.95]), -1, 1))  # PD: 10 (wp - pos) - vel
    assert not solved


def test_maze2d_dataset_time_limit_splits_episodes(monkeypatch):
    monkeypatch.setitem(ilq.D4RL_MAZE2D["umaze"], "max_episode_steps", 20)
    d = de.make_maze2d_dataset("umaze", dense=False, n_steps=400, seed=0)
    lengths = np.diff(np.concatenate([[-1], np.flatnonzero(d["timeouts"])]))
    assert lengths.max() == 21 and (lengths == 21).sum() >= 5  # D4RL: done once ts >= max_episode_steps


def check_continuing_maze_data(d, maze, dense, n):
    assert {k: (v.shape, v.dtype) for k, v in d.items()} == {
        "observations": ((n, 4), np.float32),
        "actions": ((n, 2), np.float32),
        "rewards": ((n,), np.float32),
        "terminals": ((n,), np.bool_),
        "timeouts": ((n,), np.bool_),
        "next_observations": ((n, 4), np.float32),
    }
    np.testing.assert_array_equal(d["next_observations"][:-1], d["observations"][1:])  # one continuing trajectory
    assert not d["terminals"].any()
    assert np.abs(d["actions"]).max() <= 1.0
    # D4RL's action noise N(0, 0.5^2): consecutive actions jump (the PD controller alone moves < 0.1 per step)
    assert np.abs(np.diff(d["actions"], axis=0)).mean() > 0.3
    # physics in D4RL's axes: Euler step with timestep 0.01
    np.testing.assert_allclose(
        d["next_observations"][:, :2] - d["observations"][:, :2], 0.01 * d["next_observations"][:, 2:], atol=2e-5
    )
    # every position is inside an open cell of D4RL's layout
    assert all(cell_of(p) in OPEN[maze] for p in d["observations"][:, :2])
    # episodes: split by timeouts, never longer than D4RL's time limit + 1
    ends = np.flatnonzero(d["timeouts"])
    lengths = np.diff(np.concatenate([[-1], ends]))
    assert lengths.max() <= de.D4RL_MAZE2D[maze]["max_episode_steps"] + 1
    # the controller reaches its goals: most episodes end early, within 0.1 of an open cell's point
    reached = ends[lengths <= de.D4RL_MAZE2D[maze]["max_episode_steps"]]
    assert len(reached) >= 0.8 * len(ends) and len(reached) >= 5
    pos = d["observations"][reached, :2]
    assert np.all(np.linalg.norm(pos - np.round(pos), axis=1) < 0.1)
    assert all(tuple(int(v) for v in np.round(p)) in OPEN[maze] for p in pos)
    # rewards: D4RL's, relative to the goal cell, from observations[t] (as in D4RL's v1 files)
    goal = np.array(de.maze2d_cells(maze)[1], np.float64)
    np.testing.assert_allclose(d["rewards"], de.d4rl_maze2d_reward(d["observations"][:, :2], goal, dense), atol=1e-6)
    return lengths


def test_maze2d_dataset_umaze():
    n = 4000
    d = de.make_maze2d_dataset("umaze", dense=False, n_steps=n, seed=0)
    lengths = check_continuing_maze_data(d, "umaze", False, n)
    assert 30 < lengths.mean() < 150  # D4RL's maze2d-umaze-v1 goal-to-goal segments are of this size
    assert (d["rewards"] > 0).any() and set(np.unique(d["rewards"])) == {0.0, 1.0}
    e = de.make_maze2d_dataset("umaze", dense=False, n_steps=300, seed=0)
    for k in d:
        np.testing.assert_array_equal(e[k], d[k][:300])  # seeded: reproducible
    f = de.make_maze2d_dataset("umaze", dense=True, n_steps=300, seed=1, reward_on_next_obs=True)
    assert not np.allclose(f["observations"], e["observations"])
    np.testing.assert_allclose(f["rewards"], np.exp(-np.linalg.norm(f["next_observations"][:, :2] - 1.0, axis=1)), rtol=1e-6)


def test_maze2d_dataset_large_dense():
    n = 4000
    d = de.make_maze2d_dataset("large", dense=True, n_steps=n, seed=2)
    check_continuing_maze_data(d, "large", True, n)
    assert (d["rewards"] > 0).all() and d["rewards"].max() <= 1.0


def test_pen_dataset():
    n = 700
    d = de.make_pen_dataset(n, seed=0)
    assert {k: v.shape for k, v in d.items()} == {
        "observations": (n, 45),
        "actions": (n, 24),
        "rewards": (n,),
        "terminals": (n,),
        "timeouts": (n,),
        "next_observations": (n, 45),
    }
    ends = d["terminals"] | d["timeouts"]
    assert not (d["terminals"] & d["timeouts"]).any()
    inside = ~ends[:-1]
    np.testing.assert_array_equal(d["next_observations"][:-1][inside], d["observations"][1:][inside])
    np.testing.assert_array_equal(d["terminals"], d["next_observations"][:, de.PEN_OBJ_Z] < 0.075)  # pen dropped
    starts = np.concatenate([[0], np.flatnonzero(ends[:-1]) + 1])
    lengths = np.diff(np.concatenate([starts, [n]]))
    assert lengths.max() <= 100
    np.testing.assert_array_equal(d["timeouts"][starts[1:] - 1], lengths[:-1] == 100)
    assert d["terminals"].any() and d["timeouts"].any()  # both kinds of episode end occur
    assert np.abs(d["actions"]).max() <= 1.0 and np.isfinite(d["rewards"]).all()


@pytest.mark.parametrize("task,make", [("maze2d-umaze", "maze2d"), ("pen-human", "pen")])
def test_pipeline_end_to_end_on_locally_made_d4rl_format_data(task, make, tmp_path):
    """benchmarks/make_datasets.py --d4rl-format writes locally made data in D4RL's layout (labelled as such); the
    headline path `ilq_jax.py --env-id <D4RL name> --dataset-path <file>` then pretrains, trains, evaluates in the
    D4RL-faithful env and reports with D4RL's reference scores and the paper's row."""
    data = tmp_path / f"{task}.hdf5"
    made = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "make_datasets.py"),
            "--d4rl-format",
            task,
            "--steps",
            "600",
            "--out",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    tiny = tiny_flags(random_dataset_steps=None, total_steps=20, eval_interval=10, diffusion_steps=20)
    _, summary = run_training_cli(tmp_path, "e2e", "--env-id", task, "--dataset-path", str(data), *tiny)
    assert summary["evaluation"]["env"] == ("D4RL-maze2d-umaze" if make == "maze2d" else "D4RL-pen-human")
    assert "LOCALLY MADE" in summary["dataset"]["source"] and "NOT a D4RL dataset" in summary["dataset"]["source"]
    refs = {"maze2d": (23.85, 161.86), "pen": (96.262799, 3076.8331017826877)}[make]
    assert (summary["dataset"]["ref_min"], summary["dataset"]["ref_max"]) == refs
    assert summary["hyperparameters"]["source"] == f"paper Tables 3-6 row '{task}'"
    returns = np.array(summary["seeds"][0]["returns"])
    assert returns.shape == (2, 2) and np.isfinite(summary["final_normalized_score"])
    np.testing.assert_allclose(
        summary["seeds"][0]["normalized_scores"], 100 * (returns.mean(1) - refs[0]) / (refs[1] - refs[0]), rtol=1e-9
    )


def test_d4rl_locomotion_names_are_evaluated_on_v4_not_v5(tmp_path):

    path = random_d4rl_file(tmp_path / "walker.hdf5", 17, 6)
    _, info = ilq.load_dataset(ilq.Args(env_id="walker2d-medium-replay", dataset_path=str(path), download=False))
    assert info.eval_env.id == "Walker2d-v4" and "clipped to [-1, 1]" in info.eval_env.note
    envs = ilq.make_env(info, 2)
    assert envs.single_observation_space.shape == (17,)
    envs.close()
