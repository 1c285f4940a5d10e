"""Datasets with headroom, made on this machine with D4RL's "medium-replay" and "medium" protocols.

An online SAC agent built from ilq_jax.py's own actor, twin critics, train state and Eq. 21 actor/temperature
update (2 x 256 hidden layers, as rlkit's SAC that made D4RL's data; batch 256, one update per env step) trains on
Gymnasium's Hopper-v4 / Walker2d-v4 / HalfCheetah-v4 (where ilq_jax.py evaluates D4RL's locomotion names: D4RL's
-v2 model and rules, actions clipped to [-1, 1]) until its deterministic evaluation return reaches a medium level:
one third of the way from D4RL's random to expert reference score (D4RL's definition of "medium": a policy at
about 1/3 of the expert's performance). Then it writes two local Minari datasets:

    ilq-local/<robot>/medium-replay-v0   every transition SAC saw until then (its whole replay buffer)
    ilq-local/<robot>/medium-v0          rollouts of that policy (actions sampled from it, as D4RL did)

and the same data in D4RL's HDF5 layout in --out-dir (<robot>_medium_replay-ilq-local.hdf5,
<robot>_medium-ilq-local.hdf5), for `ilq_jax.py --env-id <robot>-medium-replay --dataset-path FILE`, plus the
medium policy (<robot>_medium-sac-policy.msgpack, its settings in the .json beside it). All are real data made
here, labelled as locally generated, never as D4RL data; D4RL's reference scores of the robot are stored with
them so scores normalise on the usual scale. Commands:

    python benchmarks/make_datasets.py                    # hopper; time-boxed by --max-minutes
    python benchmarks/make_datasets.py --robot walker2d
    python benchmarks/make_datasets.py --quick            # a few minutes: tiny datasets under ilq-local/*-quick
"""

import argparse
import os
import sys
import time
from collections import deque
from functools import partial

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ilq_jax as ilq  # noqa: E402


def sac_update(cfg: ilq.ILQConfig, state: ilq.ILQState, batch: ilq.Transitions, key):
    """Plain SAC: the in-sample soft TD target for both critics, then ILQ's own actor/temperature step (Eq. 21)."""
    k_next, k_actor = jax.random.split(key)
    alpha = jnp.exp(state.alpha.params["log_alpha"])
    a_next, logp_next = ilq.sample_action(cfg.actor, state.actor.params, batch.next_observations, k_next)
    v_next = cfg.critic.apply(state.critic.target_params, batch.next_observations, a_next).min(0) - alpha * logp_next
    y = jax.lax.stop_gradient(batch.rewards + cfg.gamma * (1.0 - batch.terminals) * v_next)
    loss_q, grads = jax.value_and_grad(
        lambda p: jnp.mean((cfg.critic.apply(p, batch.observations, batch.actions) - y) ** 2, axis=1).sum()
    )(state.critic.params)
    state = state.replace(critic=state.critic.apply_gradients(grads=grads))
    state, _ = ilq.actor_alpha_update(cfg, state, batch.observations, k_actor)
    target = optax.incremental_update(state.critic.params, state.critic.target_params, cfg.tau)
    return state.replace(critic=state.critic.replace(target_params=target)), loss_q


SAC_HIDDEN_LAYERS = 2  # rlkit's SAC (D4RL's data maker): 2 x 256; 1.7x faster here than ILQ's 3 x 256


def make_sac_step(cfg: ilq.ILQConfig):
    """`update_every` SAC updates per call (a lax.scan over pre-sampled minibatches), train state donated."""

    def many(state, batches, keys):
        return jax.lax.scan(lambda s, x: sac_update(cfg, s, x[0], x[1]), state, (batches, keys))

    return jax.jit(many, donate_argnums=0)


class Episodes:
    """Episodes as Minari wants them: T+1 observations, T actions/rewards/terminations/truncations."""

    def __init__(self):
        self.done, self.current = [], None

    def start(self, obs):
        self.current = dict(observations=[obs], actions=[], rewards=[], terminations=[], truncations=[])

    def add(self, act, rew, next_obs, term, trunc):
        c = self.current
        c["observations"].append(next_obs)
        c["actions"].append(act)
        c["rewards"].append(rew)
        c["terminations"].append(term)
        c["truncations"].append(trunc)

    def close(self):
        """Keep the running episode (cut as a truncation: the data simply stops there)."""
        c = self.current
        if c and c["actions"]:
            c["truncations"][-1] = not c["terminations"][-1]
            self.done.append(c)
        self.current = None

    def finish(self):
        self.done.append(self.current)
        self.current = None

    def buffers(self):
        from minari.data_collector import EpisodeBuffer

        return [
            EpisodeBuffer(
                id=i,
                observations=np.asarray(e["observations"], np.float64),
                actions=np.asarray(e["actions"], np.float32),
                rewards=list(map(float, e["rewards"])),
                terminations=list(map(bool, e["terminations"])),
                truncations=list(map(bool, e["truncations"])),
            )
            for i, e in enumerate(self.done)
        ]

    def returns(self):
        return np.array([sum(e["rewards"]) for e in self.done])


def write_dataset(dataset_id: str, episodes: Episodes, env_id: str, refs, description: str):
    import minari

    if dataset_id in minari.list_local_datasets():
        minari.delete_dataset(dataset_id)
    ds = minari.create_dataset_from_buffers(
        dataset_id=dataset_id,
        buffer=episodes.buffers(),
        env=env_id,
        eval_env=env_id,
        algorithm_name="SAC (ilq_jax.py networks)",
        author="ilq-jax",
        author_email="none@ilq-jax.invalid",
        code_permalink="benchmarks/make_datasets.py",
        ref_min_score=refs[0],
        ref_max_score=refs[1],
        description=description + " Locally generated by ilq-jax; NOT a D4RL dataset. Reference scores are "
        "D4RL's for this robot.",
    )
    r = episodes.returns()
    print(
        f"[datasets] wrote {dataset_id}: {ds.total_steps} steps, {ds.total_episodes} episodes, "
        f"return mean {r.mean():.1f} (normalised {100 * (r.mean() - refs[0]) / (refs[1] - refs[0]):.1f})",
        flush=True,
    )


# ------------------------------------------------------------------ maze2d and pen data (D4RL's protocols)


class WaypointController:
    """D4RL's maze2d data-collection controller (d4rl/pointmaze/waypoint_controller.py), re-implemented.

    Plans on the grid from the current cell (position rounded, D4RL's qpos units) to the target's cell:
    a shortest 4-connected path (D4RL runs q-iteration; a breadth-first search with D4RL's tie order
    -col, +col, -row, +row gives the same greedy path). Waypoints are the path's cells, each shifted by
    -U(0, 0.2) per axis except the last (the target cell). PD control a = clip(10 (waypoint - pos) -
    1 * vel, -1, 1); a waypoint counts as passed within 0.1, and the task as solved within 0.1 of the target
    cell, both also needing a per-step displacement < 0.1 (D4RL's "velocity" test).
    """

    MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0))

    def __init__(self, maze: str, rng: np.random.Generator, solve_thresh=0.1, p_gain=10.0, d_gain=-1.0):
        self.open = set(ilq.maze2d_cells(maze)[0])
        self.rng, self.solve_thresh, self.p_gain, self.d_gain = rng, solve_thresh, p_gain, d_gain
        self.vel_thresh = 0.1
        self._target = None
        self._waypoints, self._idx, self._prev = [], 0, np.zeros(2)

    def _path(self, start: tuple, target: tuple) -> list:
        dist, queue = {target: 0}, deque([target])
        while queue:
            cur = queue.popleft()
            for dr, dc in self.MOVES:
                nxt = (cur[0] + dr, cur[1] + dc)
                if nxt in self.open and nxt not in dist:
                    dist[nxt] = dist[cur] + 1
                    queue.append(nxt)
        if start == target:
            return [target]
        path, cur = [], start
        while cur != target:  # greedy descent; the start may be a wall cell (rounding near a wall)
            options = [(cur[0] + dr, cur[1] + dc) for dr, dc in self.MOVES]
            cur = min((n for n in options if n in dist), key=lambda n: dist[n])  # min keeps the first on ties
            path.append(cur)
        return path

    def _new_target(self, pos, target_cell) -> None:
        start = (int(round(pos[0])), int(round(pos[1])))
        cells = self._path(start, target_cell)
        self._waypoints = [
            np.asarray(c, np.float64) - (0.0 if c == target_cell else self.rng.uniform(size=2) * 0.2) for c in cells
        ]
        self._idx, self._prev, self._target = 0, np.asarray(start, np.float64), target_cell

    def get_action(self, pos, vel, target) -> tuple[np.ndarray, bool]:
        target_cell = (int(round(target[0])), int(round(target[1])))
        if target_cell != self._target:
            self._new_target(pos, target_cell)
        step_len = np.linalg.norm(self._prev - pos)
        solved = np.linalg.norm(pos - np.asarray(self._target, np.float64)) < self.solve_thresh and step_len < self.vel_thresh
        wp = np.asarray(self._target, np.float64) if solved else self._waypoints[self._idx]
        action = self.p_gain * (wp - pos) + self.d_gain * vel
        if not solved and np.linalg.norm(pos - wp) < self.solve_thresh and step_len < self.vel_thresh:
            self._idx = min(self._idx + 1, len(self._waypoints) - 1)
        self._prev = np.asarray(pos, np.float64).copy()
        return np.clip(action, -1.0, 1.0), bool(solved)


def _pack(obs, act, rew, term, tout, nobs) -> dict:
    return dict(
        observations=np.asarray(obs, np.float32),
        actions=np.asarray(act, np.float32),
        rewards=np.asarray(rew, np.float32),
        terminals=np.asarray(term, bool),
        timeouts=np.asarray(tout, bool),
        next_observations=np.asarray(nobs, np.float32),
    )


class CollectingMaze2d(ilq.D4RLMaze2d):
    """ilq_jax's D4RL maze2d env with what collecting data needs and evaluating does not: a target that moves
    (set_target, D4RL's waypoints) and a start at a given D4RL-frame state (reset(options={"qpos", "qvel"}))."""

    def set_target(self, target) -> None:
        self.target = np.asarray(target, np.float64).copy()
        self.env.unwrapped.goal = ilq.d4rl_to_gym_pos(self.maze_obj, self.target)
        self.env.unwrapped.update_target_site_pos()

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed)
        if options and "qpos" in options:
            obs = self.start(np.asarray(options["qpos"], np.float64), np.asarray(options.get("qvel", (0, 0)), np.float64))
        return obs, info


def make_maze2d_dataset(
    maze: str, dense: bool, n_steps: int, seed: int, action_noise: float = 0.5, reward_on_next_obs: bool = False
) -> dict:
    """LOCALLY MADE maze2d data (not D4RL's files) with D4RL's collection protocol
    (scripts/generation/generate_maze2d_datasets.py), recorded in D4RLMaze2d (Gymnasium-Robotics physics):

    one continuing trajectory of n_steps from one reset; the WaypointController steers to a target drawn
    uniformly over the open cells + U(-0.1, 0.1)^2, actions get N(0, action_noise^2) noise (D4RL's --noisy:
    0.5) and are clipped to [-1, 1]; when the controller reports the target reached, or after the time limit
    (ts >= 300 / 600 / 800), that step is marked in `timeouts` and a new target is drawn (D4RL: "timeouts"
    splits the trajectory at reached goals; there are no terminal states, `terminals` is all False).
    Rewards are relative to the evaluation target (the goal cell), as D4RL relabels them, and by default
    from observations[t] as in D4RL's released v1 files (reward_on_next_obs=True: from next_observations[t],
    as the env gives it). The trajectory is never cut, so next_observations[t] == observations[t + 1] for
    every t; D4RL's script instead repeats the last observation after a reached goal.
    Arrays in D4RL's HDF5 layout (float32; terminals/timeouts bool) plus next_observations.
    """
    env = CollectingMaze2d(maze, dense)
    rng = np.random.default_rng(seed)
    ctrl = WaypointController(maze, rng)
    horizon = ilq.D4RL_MAZE2D[maze]["max_episode_steps"]

    def random_target():
        return np.asarray(env.cells[int(rng.integers(len(env.cells)))], np.float64) + rng.uniform(-0.1, 0.1, 2)

    eval_target = env.target.copy()
    env.set_target(random_target())
    obs, _ = env.reset(seed=seed)
    out = {k: [] for k in ("obs", "act", "tout", "nobs")}
    ts = 0
    for _ in range(n_steps):
        act, done = ctrl.get_action(obs[:2], obs[2:], env.target)
        act = np.clip(act + action_noise * rng.standard_normal(2), -1.0, 1.0)
        done = done or ts >= horizon
        nobs, *_ = env.step(act)
        for k, v in zip(out, (obs, act, done, nobs)):
            out[k].append(v)
        ts += 1
        if done:
            env.set_target(random_target())
            ts = 0
        obs = nobs
    env.close()
    pos = np.asarray(out["nobs" if reward_on_next_obs else "obs"])[:, :2]
    rew = d4rl_maze2d_reward(pos, eval_target, dense)
    return _pack(out["obs"], out["act"], rew, np.zeros(n_steps, bool), out["tout"], out["nobs"])


def make_pen_dataset(n_steps: int, seed: int, max_noise: float = 1.0) -> dict:
    """LOCALLY MADE pen data (not D4RL's human/cloned demonstrations), recorded in make_d4rl_pen()
    (AdroitHandPen-v1 with D4RL's drop termination and 100-step episodes) by a NOISY SCRIPTED policy:
    hold the initial grasp (each position actuator commanded to its joint's initial angle) plus Gaussian
    noise whose scale is drawn per episode from U(0, max_noise), clipped to [-1, 1]. Low noise keeps the pen
    (episodes time out at 100 steps), high noise drops it (terminal). Episode e resets with seed + e.
    `terminals`: the pen dropped; `timeouts`: the 100-step limit (the last, cut episode is not marked).
    """
    env = ilq.make_d4rl_pen()
    base = env.unwrapped
    rng = np.random.default_rng(seed)
    joints = base.model.actuator_trnid[:, 0]
    out = {k: [] for k in ("obs", "act", "rew", "term", "tout", "nobs")}
    episode, t = 0, 0
    while t < n_steps:
        obs, _ = env.reset(seed=seed + episode)
        hold = np.clip((base.data.qpos[joints] - base.act_mean) / base.act_rng, -1.0, 1.0)
        sigma = rng.uniform(0.0, max_noise)
        done = False
        while not done and t < n_steps:
            act = np.clip(hold + sigma * rng.standard_normal(hold.shape), -1.0, 1.0)
            nobs, rew, term, trunc, _ = env.step(act.astype(np.float32))
            t += 1
            done = term or trunc
            for k, v in zip(out, (obs, act, rew, term, trunc and not term, nobs)):
                out[k].append(v)
            obs = nobs
        episode += 1
    env.close()
    return _pack(out["obs"], out["act"], out["rew"], out["term"], out["tout"], out["nobs"])


def d4rl_maze2d_reward(pos, target, dense: bool):
    """D4RL maze2d reward of positions (..., 2) in qpos units: exp(-dist), or 1 if dist <= 0.5."""
    dist = np.linalg.norm(np.asarray(pos, np.float64) - np.asarray(target, np.float64), axis=-1)
    return np.exp(-dist) if dense else (dist <= 0.5).astype(np.float64)


def write_d4rl_hdf5(path: str, arrays: dict, description: str) -> None:
    """A locally made dataset in D4RL's HDF5 layout, so that `ilq_jax.py --env-id <D4RL name> --dataset-path <file>`
    runs the D4RL path (paper row, evaluation env); the file says what it is in its `ilq_local_description` attribute."""
    import h5py

    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
        f.attrs["ilq_local_description"] = description + " Locally generated by ilq-jax; NOT a D4RL dataset."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--robot", choices=["hopper", "walker2d", "halfcheetah"], default="hopper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=300_000, help="env-step cap of the online SAC run")
    p.add_argument("--max-minutes", type=float, default=60.0, help="wall-time cap of the online SAC run")
    p.add_argument(
        "--medium-fraction",
        type=float,
        default=1 / 3,
        help="stop once the evaluation return reaches this fraction of D4RL's random->expert range",
    )
    p.add_argument("--medium-steps", type=int, default=100_000, help="size of the medium (policy rollout) dataset")
    p.add_argument("--learning-starts", type=int, default=5_000)
    p.add_argument("--update-every", type=int, default=50, help="env steps per call of that many SAC updates")
    p.add_argument("--eval-every", type=int, default=5_000)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny run for a smoke check; datasets get a -quick suffix")
    p.add_argument(
        "--d4rl-format",
        metavar="TASK",
        default=None,
        help="instead: make maze2d-{umaze,medium,large}[-dense] (waypoint controller) or pen-human (noisy "
        "scripted grasp) data in D4RL's HDF5 layout, to --out",
    )
    p.add_argument("--steps", type=int, default=100_000, help="size of the --d4rl-format dataset")
    p.add_argument("--out", default=None, help="HDF5 file written by --d4rl-format")
    p.add_argument("--out-dir", default=".", help="folder of the D4RL-layout HDF5 files and the policy of the SAC run")
    a = p.parse_args(argv)
    if a.d4rl_format:
        task, out = a.d4rl_format, a.out or f"{a.d4rl_format}-ilq-local.hdf5"
        if task.startswith("maze2d-"):
            maze, dense = task.split("-")[1], task.endswith("-dense")
            arrays = make_maze2d_dataset(maze, dense, a.steps, a.seed)
            what = f"D4RL's maze2d protocol (waypoint controller, action noise 0.5) on the D4RL-faithful {task} env"
        elif task.startswith("pen-"):
            arrays, what = make_pen_dataset(a.steps, a.seed), "a noisy scripted grasp on the D4RL-faithful pen env"
        else:
            p.error("--d4rl-format takes maze2d-<umaze|medium|large>[-dense] or pen-<human|cloned>")
        write_d4rl_hdf5(out, arrays, f"{a.steps} steps of {what}, seed {a.seed}.")
        print(
            f"[datasets] wrote {out}: {a.steps} steps, {int(arrays['timeouts'].sum() + arrays['terminals'].sum())} "
            f"episode ends, mean reward {arrays['rewards'].mean():.3f}"
        )
        return
    if a.quick:
        a.max_steps, a.learning_starts, a.eval_every, a.medium_steps, a.eval_episodes = 2_000, 1_000, 1_000, 1_000, 2
    make_medium_datasets(a)


def episodes_to_d4rl(episodes: Episodes) -> dict:
    """Minari-style episodes -> D4RL's flat HDF5 arrays (terminals = terminations, timeouts = truncations)."""
    eps = episodes.done
    cat = lambda k, sl=slice(None): np.concatenate([np.asarray(e[k], np.float32)[sl] for e in eps])  # noqa: E731
    return _pack(
        cat("observations", slice(None, -1)),
        cat("actions"),
        cat("rewards"),
        cat("terminations") > 0,
        cat("truncations") > 0,
        cat("observations", slice(1, None)),
    )


def save_policy(path: str, cfg: ilq.ILQConfig, actor_params, meta: dict) -> None:
    """The medium SAC policy (actor parameters) and, beside it, what it is: reload with load_policy."""
    import json

    import flax

    with open(path, "wb") as f:
        f.write(flax.serialization.to_bytes(actor_params))
    side = dict(meta, obs_dim=cfg.obs_dim, act_dim=cfg.act_dim, hidden_dim=cfg.hidden_dim, num_hidden=cfg.num_hidden)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(side, f, indent=2)


def load_policy(path: str):
    """(actor module, actor parameters, sidecar) of a policy written by save_policy."""
    import json

    import flax

    side = json.load(open(os.path.splitext(path)[0] + ".json"))
    actor = ilq.Actor(side["act_dim"], side["hidden_dim"], side["num_hidden"])
    template = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, side["obs_dim"])))
    return actor, flax.serialization.from_bytes(template, open(path, "rb").read()), side


def make_medium_datasets(a) -> None:
    suffix = "-quick" if a.quick else ""
    env_id = ilq.D4RL_LOCOMOTION_V4[a.robot]
    robot = f"{env_id} with the -v2 masses (ilq_jax.restore_v2_masses; D4RL's robot), actions clipped to [-1, 1]"
    refs = ilq.D4RL_REF_SCORES[a.robot]
    target = refs[0] + a.medium_fraction * (refs[1] - refs[0])

    env = ilq.make_d4rl_locomotion(a.robot)
    eval_envs = gym.vector.SyncVectorEnv([partial(ilq.make_d4rl_locomotion, a.robot) for _ in range(a.eval_episodes)])
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    # online SAC (sac_update) on ilq_jax's networks and optimisers: no ILQ target, so eta / delta play no part
    cfg = ilq.ILQConfig.for_task(None, obs_dim, act_dim, a.max_steps, eta=1.0, critic_lr=3e-4, num_hidden=SAC_HIDDEN_LAYERS)
    k_init, k_act, k_update, k_rollout = jax.random.split(jax.random.PRNGKey(a.seed), 4)
    state = ilq.init_train_state(cfg, k_init)
    update = make_sac_step(cfg)
    # the key is folded inside jit: an eager fold_in per env step costs more than the policy itself
    act_fn = jax.jit(lambda p, o, k, i: ilq.sample_action(cfg.actor, p, o[None], jax.random.fold_in(k, i))[0][0])
    sample = lambda params, o, k, i: np.asarray(act_fn(params, jnp.asarray(o, jnp.float32), k, i))  # noqa: E731
    policy = jax.jit(partial(ilq.deterministic_action, cfg.actor))
    rng = np.random.default_rng(a.seed)
    env.action_space.seed(a.seed)

    buf = {
        k: np.zeros((a.max_steps,) + s, np.float32)
        for k, s in dict(
            observations=(obs_dim,), actions=(act_dim,), rewards=(), next_observations=(obs_dim,), terminals=()
        ).items()
    }
    episodes = Episodes()
    obs, _ = env.reset(seed=a.seed)
    episodes.start(obs)
    t0, n_ep, last_eval, t_update, curve = time.time(), 0, float("nan"), 0.0, []
    print(
        f"[datasets] online SAC on {robot} until the evaluation return reaches {target:.0f} "
        f"(normalised {100 * a.medium_fraction:.1f}), at most {a.max_steps} steps / {a.max_minutes} min",
        flush=True,
    )
    step = 0
    for step in range(1, a.max_steps + 1):
        if step <= a.learning_starts:
            act = env.action_space.sample()
        else:
            act = sample(state.actor.params, obs, k_act, step)
        next_obs, rew, term, trunc, _ = env.step(act)
        i = step - 1
        buf["observations"][i], buf["actions"][i], buf["rewards"][i] = obs, act, rew
        buf["next_observations"][i], buf["terminals"][i] = next_obs, float(term)
        episodes.add(act, rew, next_obs, term, trunc)
        obs = next_obs
        if term or trunc:
            episodes.finish()
            n_ep += 1
            obs, _ = env.reset(seed=a.seed + n_ep)
            episodes.start(obs)
        if step > a.learning_starts and step % a.update_every == 0:
            tu = time.time()
            idx = rng.integers(0, step, size=(a.update_every, cfg.batch_size))  # only the minibatches are copied
            batches = ilq.Transitions(**{k: jnp.asarray(v[idx]) for k, v in buf.items()})
            state, loss = update(state, batches, jax.random.split(jax.random.fold_in(k_update, step), a.update_every))
            loss.block_until_ready()
            t_update += time.time() - tu
        if step > a.learning_starts and step % a.eval_every == 0:
            last_eval = float(ilq.evaluate(eval_envs, policy, state.actor.params, 10_000 + step).mean())
            elapsed = time.time() - t0
            curve.append(dict(step=step, wall_s=round(elapsed, 1), eval_return=round(last_eval, 1)))
            print(
                f"[datasets] step {step:7d} | {step / elapsed:5.0f} steps/s | SAC updates {100 * t_update / elapsed:4.1f} % "
                f"of the time | eval return {last_eval:7.1f} | episodes {n_ep} | {elapsed / 60:5.1f} min",
                flush=True,
            )
            if last_eval >= target:
                break
        if time.time() - t0 > 60 * a.max_minutes:
            print(f"[datasets] time box of {a.max_minutes} min reached at step {step}", flush=True)
            break
    episodes.close()
    reached, wall = last_eval >= target, time.time() - t0
    level = (
        f"reached evaluation return {last_eval:.1f} (target {target:.0f}) after {step} steps"
        if reached
        else f"did NOT reach the medium target {target:.0f}: last evaluation return {last_eval:.1f} after {step} steps"
    )
    print(
        f"[datasets] SAC {level} in {wall:.0f}s ({step / wall:.0f} env steps/s, SAC updates {100 * t_update / wall:.0f} % "
        "of the time)",
        flush=True,
    )

    replay_what = (
        f"D4RL 'medium-replay' protocol on {robot}: the full replay buffer of an online SAC run (seed {a.seed}) that {level}."
    )
    write_dataset(f"{ilq.LOCAL_NAMESPACE}/{a.robot}/medium-replay{suffix}-v0", episodes, env_id, refs, replay_what)

    rollouts = Episodes()
    obs, _ = env.reset(seed=a.seed + 1_000_000)
    rollouts.start(obs)
    for i in range(a.medium_steps):
        act = sample(state.actor.params, obs, k_rollout, i)
        next_obs, rew, term, trunc, _ = env.step(act)
        rollouts.add(act, rew, next_obs, term, trunc)
        obs = next_obs
        if term or trunc:
            rollouts.finish()
            obs, _ = env.reset(seed=a.seed + 1_000_001 + len(rollouts.done))
            rollouts.start(obs)
    rollouts.close()
    medium_what = (
        f"D4RL 'medium' protocol on {robot}: {a.medium_steps} steps of the stochastic policy of an online SAC run "
        f"(seed {a.seed}) that {level}."
    )
    write_dataset(f"{ilq.LOCAL_NAMESPACE}/{a.robot}/medium{suffix}-v0", rollouts, env_id, refs, medium_what)

    os.makedirs(a.out_dir, exist_ok=True)
    for kind, eps, what in (("medium_replay", episodes, replay_what), ("medium", rollouts, medium_what)):
        path = os.path.join(a.out_dir, f"{a.robot}_{kind}{suffix.replace('-', '_')}-ilq-local.hdf5")
        write_d4rl_hdf5(path, episodes_to_d4rl(eps), what)
        print(f"[datasets] wrote {path} (D4RL's HDF5 layout; locally made, NOT a D4RL dataset)", flush=True)
    meta = dict(env=env_id, env_note=robot, seed=a.seed, steps=step, wall_s=round(wall, 1), reached=reached, eval_curve=curve)
    meta.update(final_eval_return=last_eval, target_return=target, what=f"the medium SAC policy of the run that {level}")
    policy_path = os.path.join(a.out_dir, f"{a.robot}_medium{suffix.replace('-', '_')}-sac-policy.msgpack")
    save_policy(policy_path, cfg, state.actor.params, meta)
    print(f"[datasets] wrote {policy_path} (the medium SAC policy) and its .json", flush=True)
    env.close()
    eval_envs.close()


if __name__ == "__main__":
    main()
