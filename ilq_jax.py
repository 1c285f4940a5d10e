"""ILQ: Imagination-Limited Q-Learning for offline RL, in one JAX file.

Liu, Wu, Wang, Huang, Zhou, "Imagination-Limited Q-Learning for Offline
Reinforcement Learning", IJCAI 2025, arXiv 2505.12211. Equation numbers below are
the paper's. This file is self-contained: copy it alone and ILQ works.

    python ilq_jax.py                                  # offline default, ~10 min on 2 CPU cores
    python ilq_jax.py --env-id hopper-medium-replay --dataset-path hopper_medium_replay-v2.hdf5
    python ilq_jax.py --env-id walker2d-medium-replay --budget paper   # the paper's 1e6 updates

Reading order: Args -> data -> networks -> pretraining (dynamics, diffusion) ->
ILB target (Eq. 16-20) -> update (Eq. 21) -> evaluation -> main.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, NamedTuple, Optional

import chex
import flax
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro


# =====================================================================================
# Args
# =====================================================================================

@dataclass
class Args:
    exp_name: str = "ilq"
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the ILQ learner (networks, minibatches, OOD actions)"""
    num_seeds: int = 1
    """independent learners trained together in one process (jax.vmap), seeds --seed ... --seed + N - 1"""
    env_id: str = "ilq-local/hopper/random-v0"
    """dataset: a D4RL name (`hopper-medium-replay`), a Minari id (`mujoco/hopper/medium-v0`),
    or `ilq-local/<hopper|walker2d|halfcheetah>/random-v0`, a uniformly-random-policy dataset this
    file generates offline (the default)"""
    dataset_path: Optional[str] = None
    """D4RL-format HDF5 file to load for a D4RL name (else the D4RL cache folder, else download)"""
    download: bool = True
    """allow downloading a dataset that is not on disk"""
    eval_env_id: Optional[str] = None
    """override the Gymnasium id used for evaluation"""
    run_name: Optional[str] = None
    """run folder name under runs/ (default: <dataset>__<exp_name>__<seed>__<time>)"""
    resume: Optional[str] = None
    """continue the run saved in this folder (e.g. runs/<run-name>); its saved args are used"""
    stop_after: Optional[int] = None
    """stop after this many updates in this invocation, with a checkpoint (for time-boxed jobs)"""

    budget: Literal["cpu", "paper"] = "cpu"
    """`cpu`: a reduced budget that finishes the default in ~10 min on 2 CPU cores;
    `paper`: 1e6 updates, 3e5 diffusion steps, 40 dynamics epochs (Table 3)"""
    total_steps: Optional[int] = None
    """gradient updates of the learner (default from --budget)"""
    updates_per_call: int = 250
    """updates fused into one jitted `lax.scan` call (no host round-trip in between)"""
    eval_interval: Optional[int] = None
    """updates between evaluations (default from --budget)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    eval_seed: int = 10_000
    """seed of the evaluation episodes (separate from the training seed)"""
    batch_size: int = 256

    # ILQ (Eq. 16-21). None = the paper's value for this dataset (Tables 3-6), else the default row.
    eta: Optional[float] = None
    """trade-off factor eta of Eq. 16 (weight of the in-sample loss)"""
    delta: Optional[float] = None
    """delta of Eq. 18, added after the min"""
    penalty_coef: Optional[float] = None
    """MOPO reward-penalty coefficient applied to r_hat inside y_img (A.2)"""
    critic_lr: Optional[float] = None
    actor_lr: Optional[float] = None
    entropy: Optional[bool] = None
    """auto-tuned SAC entropy (paper: off for Adroit)"""
    cosine_lr: Optional[bool] = None
    """cosine learning-rate schedule (paper: Adroit only)"""
    gamma: float = 0.99
    tau: float = 0.005
    num_behavior_samples: int = 10
    """M of Eq. 20: behaviour actions per state for the limit"""
    num_ood_actions: int = 1
    """OOD actions sampled from pi per dataset state (ambiguity A1)"""
    imagination: bool = True
    """--no-imagination: OOD target = y_lmt + delta (ablation of Sec. 5.4)"""
    limitation: bool = True
    """--no-limitation: OOD target = y_img + delta (ablation of Sec. 5.4)"""
    behavior_bank: bool = False
    """sample the M behaviour actions per dataset state once after pretraining (faster on CPU)
    instead of fresh inside every update (the paper)"""
    target_entropy_bonus: bool = False
    """subtract alpha*log pi in the critic targets (SAC/MCQ); the paper's Eq. 17/19 have none (A4)"""
    hidden_dim: int = 256
    num_hidden: int = 3

    # Pretrained models (Algorithm 1, lines 2-3)
    dynamics_path: Optional[str] = None
    """dynamics artifact (.msgpack) to load instead of the cache"""
    behavior_path: Optional[str] = None
    """diffusion behaviour artifact (.msgpack) to load instead of the cache"""
    model_dir: str = "~/.cache/ilq-jax/models"
    """cache of pretrained models, keyed by dataset fingerprint and architecture"""
    pretrain_seed: int = 0
    """seed of model pretraining (shared by all learner seeds)"""
    dynamics_members: int = 7
    dynamics_elites: int = 5
    dynamics_hidden: int = 200
    dynamics_layers: int = 4
    dynamics_epochs: Optional[int] = None
    """default from --budget (paper: 40)"""
    dynamics_lr: float = 1e-3
    diffusion_steps: Optional[int] = None
    """default from --budget (paper: 3e5)"""
    diffusion_k: int = 5
    """K, the number of diffusion steps (Diffusion-QL: 5, VP schedule)"""
    diffusion_lr: float = 3e-4
    random_dataset_steps: int = 50_000
    """size of a generated ilq-local/*/random-v0 dataset"""


# Budgets: the paper's Table 3, and one that fits a 2-core CPU in ~10 minutes.
BUDGETS = {
    "paper": dict(total_steps=1_000_000, eval_interval=5_000, diffusion_steps=300_000, dynamics_epochs=40),
    "cpu": dict(total_steps=5_000, eval_interval=500, diffusion_steps=20_000, dynamics_epochs=10),
}


class ILQError(Exception):
    """A problem the user can fix; main() prints it as one paragraph, without a traceback."""


# =====================================================================================
# Data: D4RL HDF5 files, Minari datasets, and datasets this file generates itself
# =====================================================================================

class Transitions(NamedTuple):
    """Device-resident dataset (float32). `terminals` is the TD mask: true terminations only."""
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    terminals: jax.Array


@dataclass
class DatasetInfo:
    name: str  # what the user asked for
    source: str  # where the data came from, in words
    task: Optional[str]  # D4RL-style task name for the paper's hyper-parameters, e.g. "hopper-medium"
    family: str  # termination-function family: hopper | walker2d | halfcheetah | maze2d | pen | none
    eval_env: Any  # Gymnasium id or EnvSpec
    ref_min: Optional[float]
    ref_max: Optional[float]
    obs_dim: int
    act_dim: int
    episode_returns: np.ndarray
    fingerprint: str

    def normalize(self, returns):
        """Eq. of D4RL: 100 * (R - random) / (expert - random); None without reference scores."""
        if self.ref_min is None or self.ref_max is None:
            return None
        return 100.0 * (np.asarray(returns, dtype=np.float64) - self.ref_min) / (self.ref_max - self.ref_min)


# D4RL reference scores (d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE; v1/v2 reuse v0's).
D4RL_REF_SCORES = {
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
D4RL_LOCOMOTION = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
D4RL_MAZE = {"umaze": "PointMaze_UMaze-v3", "medium": "PointMaze_Medium-v3", "large": "PointMaze_Large-v3"}
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/"
D4RL_NAMES = (
    [f"{e}-{k}" for e in D4RL_LOCOMOTION for k in ("random", "medium", "medium-replay", "medium-expert", "expert")]
    + [f"maze2d-{m}{d}" for m in D4RL_MAZE for d in ("", "-dense")]
    + ["pen-human", "pen-cloned"]
)
LOCAL_NAMESPACE = "ilq-local"  # Minari namespace of datasets generated here (never D4RL data)


def d4rl_source(task: str, version: Optional[str]) -> tuple[str, str]:
    """(download URL, cache file name) of a D4RL task, with the paper's versions as default."""
    if task.startswith("maze2d"):
        version = version or "v1"
        maze, dense = task.split("-")[1], task.endswith("-dense")
        fname = f"maze2d-{maze}-{'dense' if dense else 'sparse'}-{version}.hdf5"
        return D4RL_URL + "maze2d/" + fname, fname
    if task.startswith("pen"):
        version = version or "v0"
        if version == "v0":
            fname = {"pen-human": "pen-v0_demos_clipped.hdf5", "pen-cloned": "pen-demos-v0-bc-combined.hdf5"}[task]
            return D4RL_URL + "hand_dapg/" + fname, fname
        return D4RL_URL + f"hand_dapg_{version}/{task}-{version}.hdf5", f"{task}-{version}.hdf5"
    version = version or "v2"
    if version == "v0":  # D4RL's first release: gym_mujoco/<robot>_<kind>.hdf5, medium-replay named "mixed"
        robot, kind = task.split("-", 1)
        kind = "mixed" if kind == "medium-replay" else kind.replace("-", "_")
        fname = f"{'walker' if (robot, kind) == ('walker2d', 'mixed') else robot}_{kind}.hdf5"
        return D4RL_URL + "gym_mujoco/" + fname, fname
    fname = f"{task.replace('-', '_')}-{version}.hdf5"
    return D4RL_URL + f"gym_mujoco_{version}/" + fname, fname


def parse_d4rl_name(env_id: str) -> Optional[tuple[str, Optional[str]]]:
    m = re.fullmatch(r"(.+?)(?:-(v\d))?", env_id)
    if m and m.group(1) in D4RL_NAMES:
        return m.group(1), m.group(2)
    return None


def family_of(name: str) -> str:
    for fam, keys in (("hopper", ("hopper",)), ("walker2d", ("walker",)), ("halfcheetah", ("cheetah",)),
                      ("maze2d", ("maze2d", "pointmaze")), ("pen", ("pen",))):
        if any(k in name.lower() for k in keys):
            return fam
    return "none"


def flatten_obs(obs) -> np.ndarray:
    """Flatten (possibly nested, possibly batched) Dict observations along the last axis.

    Order: `observation` first, then the other keys in sorted order; `achieved_goal` is dropped when
    `observation` exists (in goal-conditioned envs it repeats part of the observation). So PointMaze
    gives observation(4) || desired_goal(2). Arrays pass through unchanged.
    """
    if not isinstance(obs, dict):
        return np.asarray(obs, dtype=np.float32)
    keys = sorted(obs)
    if "observation" in keys:
        keys = ["observation"] + [k for k in keys if k not in ("observation", "achieved_goal")]
    return np.concatenate([flatten_obs(obs[k]) for k in keys], axis=-1)


def _fingerprint(arrays: dict) -> str:
    h = hashlib.sha1()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def _episode_returns(rewards: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sum rewards per episode; `ends` marks the last step of each episode (the tail counts too)."""
    cuts = np.flatnonzero(ends) + 1
    if len(cuts) == 0 or cuts[-1] != len(rewards):
        cuts = np.append(cuts, len(rewards))
    return np.add.reduceat(rewards, np.concatenate([[0], cuts[:-1]])) if len(rewards) else np.zeros(0)


def validate_arrays(arrays: dict, name: str) -> None:
    """Refuse data the learner would silently mis-handle."""
    for k in ("observations", "actions", "rewards", "next_observations"):
        bad = ~np.isfinite(arrays[k])
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ILQError(f"Dataset '{name}' has {int(bad.sum())} NaN/inf values in `{k}` (first at "
                           f"transition {row}). Clean or drop those transitions before training; ILQ cannot "
                           f"learn from non-finite data.")
    amax = float(np.abs(arrays["actions"]).max(initial=0.0))
    if amax > 1.0 + 1e-4:
        raise ILQError(f"Dataset '{name}' has actions outside [-1, 1] (max |a| = {amax:.4g}). ILQ's tanh policy "
                       f"and diffusion sampler produce actions in [-1, 1]: rescale the dataset's actions to that "
                       f"box (and the environment's action space with them) before training.")
    if len(arrays["rewards"]) == 0:
        raise ILQError(f"Dataset '{name}' holds no transitions.")


def read_d4rl_hdf5(path: str) -> dict:
    """Transitions from a D4RL-format HDF5 file (observations, actions, rewards, terminals, timeouts,
    optional next_observations). Without next_observations the successor is obs[i+1], so rows whose
    successor is unknown (timeouts and a final row that is not terminal) are dropped, unlike D4RL's
    qlearning_dataset which invents successors across episode boundaries."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
            if missing:
                raise ILQError(f"'{path}' is not a D4RL-format HDF5 file: it lacks {missing}. Expected keys: "
                               f"observations, actions, rewards, terminals, timeouts (optional next_observations).")
            raw = {k: np.asarray(f[k]) for k in ("observations", "actions", "rewards", "terminals",
                                                 "timeouts", "next_observations") if k in f}
    except ILQError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/ValueError flavours for damaged files
        raise ILQError(f"Could not read '{path}' as HDF5 ({type(e).__name__}: {e}). The file is truncated or "
                       f"corrupt: delete it and download it again.") from None
    n = len(raw["observations"])
    if any(len(v) != n for v in raw.values()):
        raise ILQError(f"'{path}' is inconsistent: its arrays have lengths "
                       f"{ {k: len(v) for k, v in raw.items()} }. Delete it and download it again.")
    shapes = {k: v.shape for k, v in raw.items() if k in ("observations", "actions", "next_observations")}
    if n == 0 or any(len(s) != 2 for s in shapes.values()) or shapes.get("next_observations", shapes["observations"]) \
            != shapes["observations"]:
        raise ILQError(f"'{path}' is not a usable D4RL-format file: its arrays have shapes {shapes}, but they must "
                       f"be 2-D (transitions x features), non-empty, with next_observations shaped like "
                       f"observations. Delete it and download it again, or fix the program that wrote it.")
    obs = raw["observations"].astype(np.float32)
    terminals = raw["terminals"].reshape(-1).astype(bool)
    timeouts = raw.get("timeouts", np.zeros(n)).reshape(-1).astype(bool)
    if "next_observations" in raw:
        keep = np.ones(n, bool)
        next_obs = raw["next_observations"].astype(np.float32)
    else:  # a terminal row's successor is masked by (1 - terminal) in Eq. 17: it keeps itself as a placeholder
        next_obs = np.where(terminals[:, None], obs, np.concatenate([obs[1:], obs[-1:]]))
        keep = terminals | ~timeouts
        keep[-1] = terminals[-1]
    arrays = dict(observations=obs[keep], actions=raw["actions"][keep].astype(np.float32),
                  rewards=raw["rewards"].reshape(-1)[keep].astype(np.float32), next_observations=next_obs[keep],
                  terminals=terminals[keep].astype(np.float32))
    arrays["episode_returns"] = _episode_returns(raw["rewards"].reshape(-1).astype(np.float64), terminals | timeouts)
    return arrays


def download_d4rl(url: str, dest: str) -> None:
    """The real D4RL download; written to a .part file first so a broken download leaves nothing behind."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    print(f"[data] downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, length=1 << 20)
        os.replace(part, dest)
    except BaseException as e:  # Ctrl-C included: never leave a partial file behind
        if os.path.exists(part):
            os.remove(part)
        if not isinstance(e, Exception):
            raise
        raise ILQError(f"Could not download {url} ({type(e).__name__}: {e}). Download that file by other means "
                       f"and pass it with --dataset-path, or place it at {dest}.") from None


def load_d4rl(args: Args, task: str, version: Optional[str]) -> tuple[dict, DatasetInfo]:
    url, fname = d4rl_source(task, version)
    cache = os.path.join(os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets")), fname)
    path = args.dataset_path or cache
    if not os.path.exists(path):
        if args.dataset_path:
            raise ILQError(f"--dataset-path '{args.dataset_path}' does not exist.")
        if not args.download:
            raise ILQError(f"D4RL dataset '{task}' is not on disk (looked for {cache}) and --no-download is set. "
                           f"Download {url} and pass it with --dataset-path, or put it at {cache}.")
        download_d4rl(url, cache)
    arrays = read_d4rl_hdf5(path)
    family = family_of(task)
    ref = D4RL_REF_SCORES[task if family == "maze2d" else family]
    if family == "maze2d":
        eval_env = D4RL_MAZE[task.split("-")[1]].replace("-v3", "Dense-v3" if task.endswith("dense") else "-v3")
    else:
        eval_env = D4RL_LOCOMOTION.get(family, "AdroitHandPen-v1")
    info = DatasetInfo(name=args.env_id, source=f"D4RL HDF5 {path}", task=task, family=family, eval_env=eval_env,
                       ref_min=ref[0], ref_max=ref[1], obs_dim=arrays["observations"].shape[1],
                       act_dim=arrays["actions"].shape[1], episode_returns=arrays.pop("episode_returns"),
                       fingerprint="")
    return arrays, info


def minari_arrays(dataset) -> dict:
    """Minari episodes -> flat transitions. Episodes have T+1 observations; the TD mask is
    `terminations` only: a truncation (time limit) never cuts bootstrapping."""
    parts = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
    returns = []
    for ep in dataset.iterate_episodes():
        obs = flatten_obs(ep.observations)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions, np.float32).reshape(len(ep.rewards), -1))
        parts["rewards"].append(np.asarray(ep.rewards, np.float32))
        parts["terminals"].append(np.asarray(ep.terminations, np.float32))
        returns.append(float(np.sum(ep.rewards, dtype=np.float64)))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays["episode_returns"] = np.asarray(returns)
    return arrays


def make_random_dataset(dataset_id: str, env_id: str, n_steps: int, seed: int = 0,
                        ref_scores: Optional[tuple[float, float]] = None):
    """Record a uniformly-random-policy dataset with minari.DataCollector (the D4RL "random" protocol,
    on Gymnasium MuJoCo instead of D4RL's v2 envs). Written under the ilq-local namespace so it is never
    mistaken for a D4RL or Minari-hub dataset; a failure leaves no half-written dataset."""
    import minari

    env = minari.DataCollector(gym.make(env_id), record_infos=False)
    env.action_space.seed(seed)
    t0, steps, episode = time.time(), 0, 0
    env.reset(seed=seed)
    print(f"[data] generating {dataset_id}: {n_steps} steps of a uniformly random policy on {env_id}")
    try:
        while steps < n_steps:  # the policy is uniform: a fresh sample of the action space each step
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            steps += 1
            if term or trunc:
                episode += 1
                env.reset(seed=seed + episode)
        refs = dict(ref_min_score=ref_scores[0], ref_max_score=ref_scores[1]) if ref_scores else {}
        with warnings.catch_warnings():  # Minari warns that no author e-mail is given; there is none to give
            warnings.filterwarnings("ignore", message=".*author_email.*")
            ds = env.create_dataset(
                dataset_id=dataset_id, algorithm_name="uniform random policy", author="ilq-jax",
                code_permalink="ilq_jax.py (make_random_dataset)", eval_env=env_id,
                description=(f"Locally generated by ilq_jax.py: {n_steps} steps of a uniformly random policy on "
                             f"{env_id} (seed {seed}), the D4RL 'random' protocol. NOT a D4RL dataset. Reference "
                             f"scores{' are D4RL' + chr(39) + 's for this robot' if ref_scores else ': none'}."),
                **refs)
    except BaseException:
        try:
            minari.delete_dataset(dataset_id)
        except Exception:
            pass
        raise
    finally:
        env.close()
    print(f"[data] generated {dataset_id} in {time.time() - t0:.1f}s ({episode} episodes)")
    return ds


def load_minari(args: Args) -> tuple[dict, DatasetInfo]:
    import minari

    env_id = args.env_id
    local = re.fullmatch(LOCAL_NAMESPACE + r"/(hopper|walker2d|halfcheetah)/(random|medium|medium-replay)-v\d+", env_id)
    folder = os.path.join(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets"), env_id)
    damaged = lambda e: (f"The local Minari dataset '{env_id}' is damaged ({type(e).__name__}: {str(e)[:200]}). "
                         f"Delete its folder {folder} (or run `minari delete {env_id}`) and download or generate it "
                         f"again.")
    try:
        dataset = minari.load_dataset(env_id, download=False)
    except FileNotFoundError:
        if local and local.group(2) == "random":
            robot = local.group(1)
            make_random_dataset(env_id, D4RL_LOCOMOTION[robot], args.random_dataset_steps,
                                ref_scores=D4RL_REF_SCORES[robot])
            dataset = minari.load_dataset(env_id, download=False)
        elif env_id.startswith(LOCAL_NAMESPACE + "/"):
            raise ILQError(f"'{env_id}' is not in the local Minari folder. ilq_jax.py generates "
                           f"{LOCAL_NAMESPACE}/<hopper|walker2d|halfcheetah>/random-v0 itself; the medium and "
                           f"medium-replay datasets come from `python benchmarks/make_datasets.py`.") from None
        elif not args.download:
            raise ILQError(f"Minari dataset '{env_id}' is not in the local Minari folder and --no-download is "
                           f"set. Run `minari download {env_id}` on a machine with network access.") from None
        else:
            try:
                dataset = minari.load_dataset(env_id, download=True)
            except Exception as e:  # ImportError, httpx errors, OfflineModeIsEnabled, unknown id on the hub...
                raise ILQError(f"Minari dataset '{env_id}' is not on disk and could not be downloaded "
                               f"({type(e).__name__}: {str(e)[:200]}). Run `pip install \"minari[hf]\"` and "
                               f"`minari download {env_id}` where the network is reachable, or copy the dataset "
                               f"into {os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}.") from None
    except Exception as e:  # a damaged local copy: bad metadata.json, missing data file, ...
        raise ILQError(damaged(e)) from None
    try:
        arrays = minari_arrays(dataset)
    except Exception as e:  # h5py reports a truncated or corrupt data file only when the episodes are read
        raise ILQError(damaged(e)) from None
    meta = dataset.storage.metadata
    spec = dataset.spec
    eval_spec = getattr(spec, "eval_env_spec", None) or dataset.env_spec
    # A local dataset follows a D4RL protocol, so it takes that D4RL task's hyper-parameters (Tables 3-6).
    task = f"{local.group(1)}-{local.group(2)}" if local else None
    src = (f"Minari dataset {env_id}" if not env_id.startswith(LOCAL_NAMESPACE + "/") else
           "generated locally by ilq_jax.py (uniform random policy; not D4RL data)" if local and local.group(2) == "random"
           else f"generated locally ({LOCAL_NAMESPACE} namespace; not D4RL data): {meta.get('description') or ''}")
    info = DatasetInfo(name=env_id, source=src, task=task, family=family_of(env_id), eval_env=eval_spec,
                       ref_min=meta.get("ref_min_score"), ref_max=meta.get("ref_max_score"),
                       obs_dim=arrays["observations"].shape[1], act_dim=arrays["actions"].shape[1],
                       episode_returns=arrays.pop("episode_returns"), fingerprint="")
    return arrays, info


def load_dataset(args: Args) -> tuple[Transitions, DatasetInfo]:
    """The one data entry point: --env-id (+ --dataset-path) -> device-resident float32 transitions."""
    d4rl = parse_d4rl_name(args.env_id)
    if d4rl:
        arrays, info = load_d4rl(args, *d4rl)
    elif "/" in args.env_id:
        arrays, info = load_minari(args)
    else:
        close = difflib.get_close_matches(args.env_id, D4RL_NAMES + [f"{LOCAL_NAMESPACE}/hopper/random-v0"], n=3)
        raise ILQError(f"Unknown --env-id '{args.env_id}'. Use a D4RL name (e.g. hopper-medium-replay), a Minari id "
                       f"(namespace/name-vN, e.g. mujoco/hopper/medium-v0) or {LOCAL_NAMESPACE}/hopper/random-v0."
                       + (f" Did you mean: {', '.join(close)}?" if close else ""))
    validate_arrays(arrays, args.env_id)
    info.fingerprint = _fingerprint(arrays)
    if args.eval_env_id:
        info.eval_env = args.eval_env_id
    return Transitions(**{k: jnp.asarray(arrays[k], jnp.float32) for k in Transitions._fields}), info


def make_env(info: DatasetInfo, num_envs: int = 1):
    """A vectorised evaluation env, checked against the dataset's observation and action sizes."""
    spec = info.eval_env
    sid = spec if isinstance(spec, str) else spec.id
    if any(k in sid for k in ("PointMaze", "AdroitHand")):
        try:
            import gymnasium_robotics  # noqa: F401  (registers the envs)
        except ImportError:
            raise ILQError(f"Evaluating on {sid} needs Gymnasium-Robotics: `pip install gymnasium-robotics`.") from None
    try:
        envs = gym.vector.SyncVectorEnv([lambda: gym.make(spec) for _ in range(num_envs)])
    except Exception as e:
        raise ILQError(f"Could not create the evaluation env {sid} ({type(e).__name__}: {e}). "
                       f"Pass a working one with --eval-env-id.") from None
    obs_dim = flatten_obs(envs.single_observation_space.sample()).shape[-1]
    act_dim = int(np.prod(envs.single_action_space.shape))
    if (obs_dim, act_dim) != (info.obs_dim, info.act_dim):
        envs.close()
        raise ILQError(f"Evaluation env {sid} has observation size {obs_dim} and action size {act_dim}, but the "
                       f"dataset '{info.name}' has {info.obs_dim} and {info.act_dim}. Pick the matching env with "
                       f"--eval-env-id (D4RL maze2d/pen data were recorded on envs whose observations differ "
                       f"from today's Gymnasium-Robotics versions).")
    return envs


def describe_dataset(data: Transitions, info: DatasetInfo) -> str:
    r = info.episode_returns
    norm = info.normalize(r)
    lines = [f"[data] {info.name}: {info.source}",
             f"[data] {len(data.rewards)} transitions, {len(r)} episodes, obs dim {info.obs_dim}, action dim "
             f"{info.act_dim}, terminals {int(np.asarray(data.terminals).sum())}",
             f"[data] episode return mean {r.mean():.1f} / std {r.std():.1f} / min {r.min():.1f} / max {r.max():.1f}",
             f"[data] evaluation env {info.eval_env if isinstance(info.eval_env, str) else info.eval_env.id}; "
             + (f"reference scores min {info.ref_min:g} / max {info.ref_max:g}; dataset mean normalised return "
                f"{norm.mean():.2f}" if norm is not None else "no reference scores: raw returns only")]
    return "\n".join(lines)


# =====================================================================================
# Networks: SAC actor, twin critics, dynamics ensemble, diffusion noise network
# =====================================================================================

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """SAC tanh-Gaussian policy pi_phi ("vanilla SAC", Eq. 21), input-256-256-256-output (Table 3)."""
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
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(log_std) + 1.0)
        return mean, log_std


def sample_action(actor: Actor, params, obs, key):
    """a ~ pi(.|s) with its log-probability (tanh change of variables, in the stable softplus form)."""
    mean, log_std = actor.apply(params, obs)
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    logp = jnp.sum(-0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), -1)
    logp -= jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), -1)
    return jnp.tanh(u), logp


def deterministic_action(actor: Actor, params, obs):
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


# Q_theta1, Q_theta2 as one module: params carry a leading axis of 2, output (2, batch).
TwinCritic = nn.vmap(QNetwork, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=None, out_axes=0, axis_size=2)


class EnsembleDense(nn.Module):
    """A dense layer for all ensemble members at once: one batched matmul, weights (E, in, out)."""
    features: int
    members: int

    @nn.compact
    def __call__(self, x):  # (E, N, in)
        fan_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.truncated_normal(1.0 / (2.0 * math.sqrt(fan_in))),
                            (self.members, fan_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.members, 1, self.features))
        return jnp.einsum("eni,eio->eno", x, kernel) + bias


class DynamicsEnsemble(nn.Module):
    """MOPO's probabilistic ensemble T_psi(s', r | s, a) (Eq. 5): each member a swish MLP giving a diagonal
    Gaussian over [s' - s, r], its log-variance softly bounded by learned limits."""
    out_dim: int
    members: int = 7
    hidden: int = 200
    layers: int = 4

    @nn.compact
    def __call__(self, x):  # standardised (N, in) or (E, N, in) -> mean, logvar (E, N, out)
        if x.ndim == 2:
            x = jnp.broadcast_to(x, (self.members,) + x.shape)
        for _ in range(self.layers):
            x = nn.swish(EnsembleDense(self.hidden, self.members)(x))
        mean, logvar = jnp.split(EnsembleDense(2 * self.out_dim, self.members)(x), 2, axis=-1)
        max_logvar = self.param("max_logvar", nn.initializers.constant(0.5), (self.out_dim,))
        min_logvar = self.param("min_logvar", nn.initializers.constant(-10.0), (self.out_dim,))
        logvar = max_logvar - jax.nn.softplus(max_logvar - logvar)
        logvar = min_logvar + jax.nn.softplus(logvar - min_logvar)
        return mean, logvar


def mish(x):
    """x * tanh(softplus(x)) with one exp, since tanh(log(1 + e)) = e(e + 2) / (e(e + 2) + 2) for e = exp(x): the same
    values as jax.nn.mish (to float rounding) at about a quarter of its cost on CPU, where exp/log1p/tanh dominate
    the diffusion sampler (benchmarks/speed.py)."""
    e = jnp.exp(jnp.minimum(x, 20.0))
    n = e * (e + 2.0)
    return jnp.where(x > 20.0, x, x * n / (n + 2.0))


class NoiseNet(nn.Module):
    """Diffusion-QL's epsilon-network xi_omega(a^k, s, k): [noisy action, time embedding, state] -> 3x256 Mish."""
    act_dim: int
    hidden: int = 256
    t_dim: int = 16

    @nn.compact
    def __call__(self, x, t, obs):
        half = self.t_dim // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / (half - 1))
        emb = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], -1)
        emb = nn.Dense(self.t_dim)(mish(nn.Dense(2 * self.t_dim)(emb)))
        h = jnp.concatenate([x, emb, obs], -1)
        for _ in range(3):
            h = mish(nn.Dense(self.hidden)(h))
        return nn.Dense(self.act_dim)(h)


# =====================================================================================
# Pretraining 1: the dynamics model (Algorithm 1, line 2; MOPO recipe, paper Sec. 3 / A.2)
# =====================================================================================

DYNAMICS_WEIGHT_DECAY = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)  # MOPO, per layer (hidden..., output)


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

    @property
    def net(self) -> DynamicsEnsemble:
        return DynamicsEnsemble(self.obs_dim + 1, self.members, self.hidden, self.layers)


def terminated(family: str, next_obs):
    """Hand-written termination of imagined transitions (MOPO's functions; paper.md A3). Any non-finite
    state is terminal so it can never feed a bootstrap."""
    finite = jnp.all(jnp.isfinite(next_obs), -1)
    height, angle = next_obs[..., 0], next_obs[..., 1]
    if family == "hopper":  # |obs[1:]| < 100 elementwise (the common port applies abs to a boolean)
        healthy = jnp.all(jnp.abs(next_obs[..., 1:]) < 100, -1) & (height > 0.7) & (jnp.abs(angle) < 0.2)
    elif family == "walker2d":
        healthy = (height > 0.8) & (height < 2.0) & (angle > -1.0) & (angle < 1.0)
    elif family == "halfcheetah":  # never falls; only a blown-up imagined state ends the rollout
        healthy = jnp.all(jnp.abs(next_obs) < 100, -1)
    elif family == "pen":  # obs[24:27] is the pen's position (after 24 hand joints); dropped when z < 0.075
        healthy = next_obs[..., 26] >= 0.075
    else:  # maze2d / pointmaze and unknown envs: never terminal
        healthy = jnp.ones(next_obs.shape[:-1], bool)
    return ~(finite & healthy)


def dynamics_step(dyn: DynamicsModel, obs, act, key):
    """One imagined step (s_hat', r_hat) ~ T_psi(.|s, a) from a random elite per transition (A2, A7).
    Returns next_obs, reward, MOPO penalty max_i ||sigma_i(s, a)||_2 over all members, done."""
    n = obs.shape[0]
    mean, logvar = dyn.net.apply(dyn.params, (jnp.concatenate([obs, act], -1) - dyn.input_mean) / dyn.input_std)
    std = jnp.exp(0.5 * logvar)
    k_member, k_noise = jax.random.split(key)
    member = dyn.elites[jax.random.randint(k_member, (n,), 0, dyn.elites.shape[0])]
    sample = mean[member, jnp.arange(n)] + std[member, jnp.arange(n)] * jax.random.normal(k_noise, (n, obs.shape[1] + 1))
    next_obs = obs + sample[:, :-1]
    penalty = jnp.max(jnp.linalg.norm(std, axis=-1), axis=0)
    return next_obs, sample[:, -1], penalty, terminated(dyn.family, next_obs)


def dynamics_loss(net: DynamicsEnsemble, params, x, y):
    """Gaussian negative log-likelihood of Eq. 5 per member (up to constants), MOPO's weight decay and
    the 0.01 penalty that keeps the learned log-variance bounds tight."""
    mean, logvar = net.apply(params, x)
    nll = jnp.mean((mean - y) ** 2 * jnp.exp(-logvar), (1, 2)) + jnp.mean(logvar, (1, 2))
    p = params["params"]
    decay = sum(wd * 0.5 * jnp.sum(p[f"EnsembleDense_{i}"]["kernel"] ** 2) for i, wd in enumerate(DYNAMICS_WEIGHT_DECAY))
    return jnp.sum(nll) + decay + 0.01 * (jnp.sum(p["max_logvar"]) - jnp.sum(p["min_logvar"]))


def train_dynamics(data: Transitions, family: str, *, members=7, elites=5, hidden=200, layers=4, epochs=40,
                   lr=1e-3, seed=0, batch_size=256, log=None) -> tuple[DynamicsModel, dict]:
    """Fit the ensemble for a fixed number of epochs (Table 3), each member on its own bootstrap of the
    training split; holdout = min(20%, 1000) transitions; elites = lowest holdout MSE."""
    if elites > members or len(DYNAMICS_WEIGHT_DECAY) != layers + 1:
        raise ILQError(f"Need elites <= members and {len(DYNAMICS_WEIGHT_DECAY) - 1} layers (MOPO's weight decays); "
                       f"got {elites} elites of {members} members, {layers} layers.")
    obs, act = np.asarray(data.observations), np.asarray(data.actions)
    x = np.concatenate([obs, act], -1)
    y = np.concatenate([np.asarray(data.next_observations) - obs, np.asarray(data.rewards)[:, None]], -1)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_hold = min(int(0.2 * len(x)), 1000)
    hold, train = perm[:n_hold], perm[n_hold:]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std < 1e-12] = 1.0
    xs, ys = jnp.asarray((x - mean) / std, jnp.float32), jnp.asarray(y, jnp.float32)
    boot = jnp.asarray(train[rng.integers(0, len(train), size=(members, len(train)))])
    n_batches = max(1, len(train) // batch_size)
    net = DynamicsEnsemble(y.shape[1], members, hidden, layers)
    params = net.init(jax.random.PRNGKey(seed), xs[:1])
    opt = optax.adam(lr)

    @jax.jit
    def epoch(params, opt_state, key, xs, ys, boot, hold):
        shuffled = jax.vmap(lambda k, b: jax.random.permutation(k, b))(jax.random.split(key, members), boot)
        batches = shuffled[:, : n_batches * batch_size].reshape(members, n_batches, -1).transpose(1, 0, 2)

        def step(carry, idx):  # idx: (E, batch), each member its own minibatch
            params, opt_state = carry
            loss, grads = jax.value_and_grad(partial(dynamics_loss, net))(params, xs[idx], ys[idx])
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        holdout_mean, _ = net.apply(params, xs[hold])
        return params, opt_state, losses.mean(), jnp.mean((holdout_mean - ys[hold]) ** 2, (1, 2))

    opt_state, key = opt.init(params), jax.random.PRNGKey(seed + 1)
    t0 = time.time()
    for ep in range(1, epochs + 1):
        key, sub = jax.random.split(key)
        params, opt_state, train_loss, holdout_mse = epoch(params, opt_state, sub, xs, ys, boot, jnp.asarray(hold))
        holdout_mse = np.asarray(holdout_mse)
        elite_idx = np.sort(np.argsort(holdout_mse)[:elites])
        print(f"[dynamics] epoch {ep:3d}/{epochs} | train loss {float(train_loss):9.4f} | holdout MSE per member "
              f"{np.array2string(holdout_mse, precision=4, separator=' ')} | elites {elite_idx.tolist()} | "
              f"{time.time() - t0:6.1f}s", flush=True)
        if log:
            log("dynamics/train_loss", float(train_loss), ep)
            log("dynamics/holdout_mse_elites", float(holdout_mse[elite_idx].mean()), ep)
            for i, m in enumerate(holdout_mse):
                log(f"dynamics/holdout_mse_member_{i}", float(m), ep)
    model = DynamicsModel(params, jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32),
                          jnp.asarray(elite_idx, jnp.int32), obs.shape[1], members, hidden, layers, family)
    metrics = dict(train_loss=float(train_loss), holdout_mse=holdout_mse.tolist(),
                   holdout_mse_elites=float(holdout_mse[elite_idx].mean()), elites=elite_idx.tolist(),
                   wall_time_s=time.time() - t0)
    return model, metrics


# =====================================================================================
# Pretraining 2: the diffusion behaviour model (Algorithm 1, line 3; Eq. 6-8, Diffusion-QL settings)
# =====================================================================================

def vp_schedule(k: int, beta_min: float = 0.1, beta_max: float = 10.0) -> dict:
    """Diffusion-QL's variance-preserving schedule for K steps and the DDPM posterior coefficients."""
    t = np.arange(1, k + 1)
    alphas = np.exp(-beta_min / k - 0.5 * (beta_max - beta_min) * (2 * t - 1) / k**2)
    betas = 1.0 - alphas
    ac = np.cumprod(alphas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {name: jnp.asarray(v, jnp.float32) for name, v in dict(
        betas=betas, sqrt_ac=np.sqrt(ac), sqrt_one_minus_ac=np.sqrt(1.0 - ac),
        sqrt_recip_ac=np.sqrt(1.0 / ac), sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1.0),
        post_log_var=np.log(np.maximum(post_var, 1e-20)),
        post_coef_x0=betas * np.sqrt(ac_prev) / (1.0 - ac), post_coef_xt=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    ).items()}


@flax.struct.dataclass
class BehaviorModel:
    params: Any
    act_dim: int = flax.struct.field(pytree_node=False)
    k: int = flax.struct.field(pytree_node=False)
    hidden: int = flax.struct.field(pytree_node=False)

    @property
    def net(self) -> NoiseNet:
        return NoiseNet(self.act_dim, self.hidden)


def diffusion_loss(beh: BehaviorModel, params, obs, act, key):
    """Eq. 8: || xi - xi_omega(sqrt(abar_k) a + sqrt(1 - abar_k) xi, s, k) ||^2, k ~ U{1..K}."""
    sch = vp_schedule(beh.k)
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (obs.shape[0],), 0, beh.k)
    eps = jax.random.normal(k_eps, act.shape)
    noisy = sch["sqrt_ac"][t, None] * act + sch["sqrt_one_minus_ac"][t, None] * eps
    return jnp.mean((beh.net.apply(params, noisy, t, obs) - eps) ** 2)


def diffusion_sample(beh: BehaviorModel, obs, key, num_samples: int):
    """a_hat_m ~ Diff_omega(.|s), m = 1..M (Eq. 6-7, Diffusion-QL's sampler, A9): the reverse chain from
    N(0, I) as a lax.scan over K steps; x0 predicted from epsilon and clipped to [-1, 1], DDPM posterior
    variance, no noise at the last step. Pure and jittable: (N, obs) -> (N, M, act)."""
    sch = vp_schedule(beh.k)
    n = obs.shape[0]
    obs_rep = jnp.repeat(obs, num_samples, axis=0)
    k_init, k_chain = jax.random.split(key)
    x = jax.random.normal(k_init, (n * num_samples, beh.act_dim))

    def reverse_step(x, inp):
        t, k = inp
        eps = beh.net.apply(beh.params, x, jnp.full((x.shape[0],), t), obs_rep)
        x0 = jnp.clip(sch["sqrt_recip_ac"][t] * x - sch["sqrt_recipm1_ac"][t] * eps, -1.0, 1.0)
        mean = sch["post_coef_x0"][t] * x0 + sch["post_coef_xt"][t] * x
        noise = jnp.where(t > 0, 1.0, 0.0) * jax.random.normal(k, x.shape)
        return mean + jnp.exp(0.5 * sch["post_log_var"][t]) * noise, None

    x, _ = jax.lax.scan(reverse_step, x, (jnp.arange(beh.k - 1, -1, -1), jax.random.split(k_chain, beh.k)))
    return jnp.clip(x, -1.0, 1.0).reshape(n, num_samples, beh.act_dim)


def train_diffusion(data: Transitions, *, k=5, hidden=256, steps=300_000, lr=3e-4, seed=0, batch_size=256,
                    steps_per_call=1000, log=None) -> tuple[BehaviorModel, dict]:
    """Behaviour cloning with the diffusion loss (Eq. 8), minibatches sampled inside jit."""
    act_dim = data.actions.shape[1]
    net = NoiseNet(act_dim, hidden)
    key = jax.random.PRNGKey(seed)
    beh = BehaviorModel(net.init(key, data.actions[:1], jnp.zeros(1, jnp.int32), data.observations[:1]),
                        act_dim, k, hidden)
    opt = optax.adam(lr)

    @partial(jax.jit, static_argnums=3)
    def run(beh, opt_state, key, n_steps, data):
        def step(carry, key):
            beh, opt_state = carry
            k_idx, k_loss = jax.random.split(key)
            idx = jax.random.randint(k_idx, (batch_size,), 0, data.rewards.shape[0])
            loss, grads = jax.value_and_grad(partial(diffusion_loss, beh))(
                beh.params, data.observations[idx], data.actions[idx], k_loss)
            updates, opt_state = opt.update(grads, opt_state, beh.params)
            return (beh.replace(params=optax.apply_updates(beh.params, updates)), opt_state), loss

        (beh, opt_state), losses = jax.lax.scan(step, (beh, opt_state), jax.random.split(key, n_steps))
        return beh, opt_state, losses.mean()

    opt_state, t0, done = opt.init(beh.params), time.time(), 0
    while done < steps:
        n = min(steps_per_call, steps - done)
        key, sub = jax.random.split(key)
        beh, opt_state, loss = run(beh, opt_state, sub, n, data)
        done += n
        rate = done / (time.time() - t0)
        if done == steps or (done // steps_per_call) % 5 == 0:
            print(f"[diffusion] step {done:7d}/{steps} | loss {float(loss):.4f} | {rate:6.0f} steps/s | "
                  f"eta {(steps - done) / rate:5.0f}s", flush=True)
        if log:
            log("diffusion/loss", float(loss), done)
    return beh, dict(final_loss=float(loss), wall_time_s=time.time() - t0)


# =====================================================================================
# Pretrained-model artifacts: Flax msgpack + JSON sidecar, cached by dataset and settings
# =====================================================================================

def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for p in ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "gymnasium", "mujoco", "minari"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def _atomic_write(path: str, payload: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def save_artifact(path: str, model, sidecar: dict) -> None:
    _atomic_write(path, flax.serialization.to_bytes(model))
    _atomic_write(os.path.splitext(path)[0] + ".json", json.dumps(sidecar, indent=2).encode())


def model_settings(args: Args, kind: str) -> dict:
    """The settings that define a model (its training length is recorded, not part of the key)."""
    if kind == "dynamics":
        return dict(members=args.dynamics_members, elites=args.dynamics_elites, hidden=args.dynamics_hidden,
                    layers=args.dynamics_layers, lr=args.dynamics_lr, seed=args.pretrain_seed)
    return dict(k=args.diffusion_k, hidden=256, lr=args.diffusion_lr, seed=args.pretrain_seed)


def artifact_path(args: Args, info: DatasetInfo, kind: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", info.name)
    key = hashlib.sha1(json.dumps(model_settings(args, kind), sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser(args.model_dir), f"{slug}-{info.fingerprint[:12]}", f"{kind}-{key}.msgpack")


def load_artifact(path: str, kind: str, info: DatasetInfo):
    """Load a saved model, refusing one made for another dataset or with other shapes."""
    side_path = os.path.splitext(path)[0] + ".json"
    if not (os.path.exists(path) and os.path.exists(side_path)):
        raise ILQError(f"No {kind} model at '{path}' (both the .msgpack and its .json sidecar are needed). Train one "
                       f"with `python pretrain_models.py --env-id {info.name}` or drop the path to train inline.")
    try:
        side = json.load(open(side_path))
        ds = side.get("dataset", {})
    except Exception as e:  # a truncated or hand-edited sidecar (JSONDecodeError, a non-object, ...)
        raise ILQError(f"The sidecar '{side_path}' of '{path}' is damaged ({type(e).__name__}: {e}). Delete both "
                       f"and pretrain again.") from None
    if side.get("kind") != kind:
        raise ILQError(f"'{path}' holds a {side.get('kind')} model, not a {kind} model.")
    if (ds.get("obs_dim"), ds.get("act_dim")) != (info.obs_dim, info.act_dim) or ds.get("fingerprint") != info.fingerprint:
        raise ILQError(f"The {kind} model '{path}' was made for dataset '{ds.get('name')}' (obs {ds.get('obs_dim')}, "
                       f"act {ds.get('act_dim')}, fingerprint {str(ds.get('fingerprint'))[:12]}), not for "
                       f"'{info.name}' (obs {info.obs_dim}, act {info.act_dim}, fingerprint {info.fingerprint[:12]}). "
                       f"Pretrain for this dataset with `python pretrain_models.py --env-id {info.name}`.")
    c = side["config"]
    if kind == "dynamics":
        net = DynamicsEnsemble(info.obs_dim + 1, c["members"], c["hidden"], c["layers"])
        template = DynamicsModel(jax.eval_shape(net.init, jax.random.PRNGKey(0),
                                                jnp.zeros((1, info.obs_dim + info.act_dim))),
                                 jnp.zeros(info.obs_dim + info.act_dim), jnp.zeros(info.obs_dim + info.act_dim),
                                 jnp.zeros(c["elites"], jnp.int32), info.obs_dim, c["members"], c["hidden"],
                                 c["layers"], info.family)
    else:
        net = NoiseNet(info.act_dim, c["hidden"])
        template = BehaviorModel(jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, info.act_dim)),
                                                jnp.zeros(1, jnp.int32), jnp.zeros((1, info.obs_dim))),
                                 info.act_dim, c["k"], c["hidden"])
    try:  # the template only gives structure and shapes (eval_shape: no eager init); from_bytes does not check shapes
        model = flax.serialization.from_bytes(template, open(path, "rb").read())
        if [x.shape for x in jax.tree_util.tree_leaves(model)] != [x.shape for x in jax.tree_util.tree_leaves(template)]:
            raise ValueError("its arrays have other shapes than the sidecar's architecture")
        return model, side
    except Exception as e:
        raise ILQError(f"'{path}' does not match its sidecar's architecture or is damaged ({e}). "
                       f"Delete it and pretrain again.") from None


def load_or_pretrain(args: Args, data: Transitions, info: DatasetInfo, log=None, force: bool = False):
    """Algorithm 1, lines 2-3: the frozen dynamics and behaviour models, from --*-path, from the cache when
    one trained at least as long as asked exists, or trained now and cached."""
    wanted = dict(dynamics=args.dynamics_epochs, behavior=args.diffusion_steps)
    models = {}
    for kind, given in (("dynamics", args.dynamics_path), ("behavior", args.behavior_path)):
        path = given or artifact_path(args, info, kind)
        if given or (os.path.exists(path) and not force):
            try:
                model, side = load_artifact(path, kind, info)
            except ILQError:
                if given:
                    raise
                model, side = None, None  # a damaged cache entry is retrained
            if side is not None and (given or side["trained"] >= wanted[kind]):
                quality = (f"holdout MSE of elites {side['metrics']['holdout_mse_elites']:.4f}" if kind == "dynamics"
                           else f"final loss {side['metrics']['final_loss']:.4f}")
                print(f"[models] {kind}: loaded {path} (trained {side['trained']} "
                      f"{'epochs' if kind == 'dynamics' else 'steps'}; {quality})")
                models[kind] = model
                continue
        print(f"[models] {kind}: training ({wanted[kind]} {'epochs' if kind == 'dynamics' else 'steps'}) -> {path}")
        if kind == "dynamics":
            model, metrics = train_dynamics(data, info.family, members=args.dynamics_members,
                                            elites=args.dynamics_elites, hidden=args.dynamics_hidden,
                                            layers=args.dynamics_layers, epochs=args.dynamics_epochs,
                                            lr=args.dynamics_lr, seed=args.pretrain_seed, log=log)
        else:
            model, metrics = train_diffusion(data, k=args.diffusion_k, steps=args.diffusion_steps,
                                             lr=args.diffusion_lr, seed=args.pretrain_seed, log=log)
        # The sidecar repeats what a reader needs without loading the msgpack: scaler, elites, schedule.
        state = (dict(input_mean=np.asarray(model.input_mean).tolist(), input_std=np.asarray(model.input_std).tolist(),
                      elites=np.asarray(model.elites).tolist()) if kind == "dynamics" else
                 dict(schedule={k: np.asarray(v).tolist() for k, v in vp_schedule(model.k).items()}))
        save_artifact(path, model, dict(
            kind=kind, config=model_settings(args, kind), trained=wanted[kind], metrics=metrics, **state,
            dataset=dict(name=info.name, fingerprint=info.fingerprint, obs_dim=info.obs_dim, act_dim=info.act_dim,
                         transitions=int(data.rewards.shape[0])),
            family=info.family, created=time.strftime("%Y-%m-%d %H:%M:%S"), versions=package_versions()))
        models[kind] = model
    return models["dynamics"], models["behavior"]


# =====================================================================================
# ILQ hyper-parameters per dataset (Tables 3-6 and A.2 of the paper)
# =====================================================================================

# task: (eta, delta, reward-penalty coefficient, critic lr, actor lr)
PAPER_HPARAMS = {
    "halfcheetah-random":        (0.95, 2.0, 0.0, 5e-4, 3e-4),
    "hopper-random":             (0.90, 1.0, 1.0, 3e-4, 1e-4),
    "walker2d-random":           (0.70, 1.0, 0.0, 5e-4, 3e-4),
    "halfcheetah-medium":        (0.95, 1.0, 0.0, 5e-4, 3e-4),
    "hopper-medium":             (0.95, -2.0, 2.0, 5e-4, 3e-4),
    "walker2d-medium":           (0.90, 0.5, 1.0, 5e-4, 3e-4),
    "halfcheetah-medium-replay": (0.95, 2.0, 0.0, 5e-4, 3e-4),
    "hopper-medium-replay":      (0.80, -0.5, 1.0, 3e-4, 1e-4),
    "walker2d-medium-replay":    (0.90, 1.0, 2.0, 3e-4, 1e-4),
    "halfcheetah-medium-expert": (0.60, 1.0, 0.0, 5e-4, 3e-4),
    "hopper-medium-expert":      (0.40, -0.5, 0.0, 5e-4, 3e-4),
    "walker2d-medium-expert":    (0.80, 1.0, 0.0, 5e-4, 3e-4),
    "maze2d-umaze":              (0.95, -0.5, 0.0, 5e-4, 3e-4),
    "maze2d-umaze-dense":        (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "maze2d-medium":             (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "maze2d-medium-dense":       (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "maze2d-large":              (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "maze2d-large-dense":        (0.95, 0.0, 0.0, 5e-4, 3e-4),
    "pen-human":                 (0.80, -1.0, 0.0, 3e-4, 1e-4),
    "pen-cloned":                (0.80, 0.0, 0.0, 3e-4, 1e-4),
}
# Datasets the paper does not list: eta ~0.9 is "a typically safe choice" and delta = 0 "a solid choice"
# (Sec. 5.3), learning rates of "all others" (Table 3).
DEFAULT_HPARAMS = (0.90, 0.0, 0.0, 5e-4, 3e-4)
ADROIT_TASKS = ("pen-human", "pen-cloned")  # entropy off and a cosine learning-rate schedule (Table 3)


def effective_hparams(args: Args, info: DatasetInfo) -> dict:
    row = PAPER_HPARAMS.get(info.task, DEFAULT_HPARAMS)
    adroit = info.task in ADROIT_TASKS
    paper = dict(eta=row[0], delta=row[1], penalty_coef=row[2], critic_lr=row[3], actor_lr=row[4],
                 entropy=not adroit, cosine_lr=adroit)
    hp = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in paper.items()}
    hp["source"] = (f"paper Tables 3-6 row '{info.task}'" if info.task in PAPER_HPARAMS
                    else "defaults (dataset not in the paper's tables)")
    hp["overridden"] = [k for k in paper if getattr(args, k) is not None]
    return hp


# =====================================================================================
# The ILB target (Eq. 17-20) and the fused update (Eq. 16, 21; Algorithm 1 lines 5-12)
# =====================================================================================

@dataclass(frozen=True)
class ILQConfig:
    """Static settings of the update (hashable: it is part of the compiled function)."""
    obs_dim: int
    act_dim: int
    eta: float
    delta: float
    penalty_coef: float
    critic_lr: float
    actor_lr: float
    entropy: bool
    cosine_lr: bool
    total_steps: int
    gamma: float = 0.99
    tau: float = 0.005
    batch_size: int = 256
    num_behavior_samples: int = 10
    num_ood_actions: int = 1
    imagination: bool = True
    limitation: bool = True
    behavior_bank: bool = False
    target_entropy_bonus: bool = False
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


@flax.struct.dataclass
class TrainState:
    actor_params: Any
    critic_params: Any
    target_critic_params: Any
    log_alpha: jax.Array
    actor_opt_state: Any
    critic_opt_state: Any
    alpha_opt_state: Any


class Frozen(NamedTuple):
    """What the update reads but never changes: the device-resident dataset and the pretrained models."""
    data: Transitions
    dynamics: DynamicsModel
    behavior: BehaviorModel
    bank: Optional[jax.Array] = None  # (N, M, act) behaviour actions per dataset state, with --behavior-bank


class Targets(NamedTuple):
    y_in: jax.Array  # (B,)      Eq. 17
    s_ood: jax.Array  # (B*N, obs) dataset states, each repeated for its N OOD actions
    a_ood: jax.Array  # (B*N, act) a_oos ~ pi(.|s), treated as out-of-sample (Eq. 16)
    y_ood: jax.Array  # (B*N,)    Eq. 18
    y_img: Optional[jax.Array]  # (B*N,) Eq. 19 (None with --no-imagination)
    y_lmt: Optional[jax.Array]  # (B*N,) Eq. 20 (None with --no-limitation)


def init_train_state(cfg: ILQConfig, key) -> TrainState:
    k_actor, k_critic = jax.random.split(key)
    obs, act = jnp.zeros((1, cfg.obs_dim)), jnp.zeros((1, cfg.act_dim))
    actor_params = cfg.actor.init(k_actor, obs)
    critic_params = cfg.critic.init(k_critic, obs, act)
    log_alpha = jnp.zeros(())
    target_params = jax.tree_util.tree_map(jnp.copy, critic_params)  # own buffers: the state is donated
    return TrainState(actor_params, critic_params, target_params, log_alpha,
                      cfg.optimizer(cfg.actor_lr).init(actor_params), cfg.optimizer(cfg.critic_lr).init(critic_params),
                      cfg.optimizer(cfg.actor_lr).init(log_alpha))


def ilb_targets(cfg: ILQConfig, state: TrainState, frozen: Frozen, batch: Transitions, behavior_actions, key) -> Targets:
    """The Imagination-Limited Bellman targets for one minibatch, under stop-gradient (A8).

    behavior_actions: (B, M, act) from the bank, or None to sample them here from the diffusion model.
    Key convention (the reference test repeats it): next, ood, imagine, imagine_next, behaviour = split(key, 5).
    """
    b, n, m = batch.rewards.shape[0], cfg.num_ood_actions, cfg.num_behavior_samples
    actor, critic, target = cfg.actor, cfg.critic, state.target_critic_params
    alpha = jnp.exp(state.log_alpha) if (cfg.entropy and cfg.target_entropy_bonus) else 0.0
    k_next, k_ood, k_img, k_img_next, k_beh = jax.random.split(key, 5)

    # Eq. 17, in-sample: r + gamma * (1 - done) * min_j Q_target_j(s', a'), a' ~ pi(.|s')
    a_next, logp_next = sample_action(actor, state.actor_params, batch.next_observations, k_next)
    v_next = critic.apply(target, batch.next_observations, a_next).min(0) - alpha * logp_next
    y_in = batch.rewards + cfg.gamma * (1.0 - batch.terminals) * v_next

    # OOD actions: "we directly treat policy pi as the sampling distribution u" (Eq. 16)
    s_ood = jnp.repeat(batch.observations, n, axis=0)
    a_ood, _ = sample_action(actor, state.actor_params, s_ood, k_ood)

    y_img = y_lmt = None
    if cfg.imagination:  # Eq. 19: one imagined step from a random elite, reward penalty, termination mask
        s_img, r_img, penalty, done_img = dynamics_step(frozen.dynamics, s_ood, a_ood, k_img)
        a_img, logp_img = sample_action(actor, state.actor_params, s_img, k_img_next)
        v_img = critic.apply(target, s_img, a_img).min(0) - alpha * logp_img
        y_img = r_img - cfg.penalty_coef * penalty + cfg.gamma * jnp.where(done_img, 0.0, v_img)
    if cfg.limitation:  # Eq. 20: per target critic the max over M behaviour actions at s, then min over critics
        a_beh = behavior_actions if behavior_actions is not None else diffusion_sample(
            frozen.behavior, batch.observations, k_beh, m)
        chex.assert_shape(a_beh, (b, m, cfg.act_dim))
        q_beh = critic.apply(target, jnp.repeat(batch.observations, m, axis=0), a_beh.reshape(b * m, -1))
        y_lmt = jnp.repeat(q_beh.reshape(2, b, m).max(-1).min(0), n)

    # Eq. 18: min{y_img, y_lmt} + delta (delta after the min); the ablations keep one branch
    if y_img is not None and y_lmt is not None:
        y_ood = jnp.minimum(y_img, y_lmt) + cfg.delta
    else:
        y_ood = (y_img if y_img is not None else y_lmt) + cfg.delta
    chex.assert_shape([y_in], (b,))
    chex.assert_shape([y_ood, a_ood[:, 0], s_ood[:, 0]], (b * n,))
    return jax.lax.stop_gradient(Targets(y_in, s_ood, a_ood, y_ood, y_img, y_lmt))


def critic_loss(cfg: ILQConfig, critic_params, batch: Transitions, t: Targets):
    """Eq. 16: eta * in-sample TD error + (1 - eta) * OOD error, each averaged over its own set (A11),
    summed over the twin critics (each regresses to the same target)."""
    q_data = cfg.critic.apply(critic_params, batch.observations, batch.actions)  # (2, B)
    q_ood = cfg.critic.apply(critic_params, t.s_ood, t.a_ood)  # (2, B*N)
    loss_in = jnp.mean((q_data - t.y_in) ** 2, axis=1).sum()
    loss_ood = jnp.mean((q_ood - t.y_ood) ** 2, axis=1).sum()
    return cfg.eta * loss_in + (1.0 - cfg.eta) * loss_ood, (loss_in, loss_ood, q_data.mean(), q_ood.mean())


def actor_alpha_update(cfg: ILQConfig, state: TrainState, observations, key):
    """Eq. 21: max E[min_j Q_theta_j(s, a) - alpha log pi(a|s)] with the state's (just updated) critics,
    then SAC's automatic temperature with target entropy -|A| (A5). Returns (state, (actor loss, log pi))."""
    alpha = jnp.exp(state.log_alpha) if cfg.entropy else 0.0

    def actor_loss(actor_params):
        a, logp = sample_action(cfg.actor, actor_params, observations, key)
        return jnp.mean(alpha * logp - cfg.critic.apply(state.critic_params, observations, a).min(0)), logp

    (loss_pi, logp), grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor_params)
    updates, actor_opt_state = cfg.optimizer(cfg.actor_lr).update(grads, state.actor_opt_state)
    state = state.replace(actor_params=optax.apply_updates(state.actor_params, updates), actor_opt_state=actor_opt_state)
    if cfg.entropy:
        target_entropy = -float(cfg.act_dim)
        grad = jax.grad(lambda la: -la * jnp.mean(jax.lax.stop_gradient(logp) + target_entropy))(state.log_alpha)
        updates, alpha_opt_state = cfg.optimizer(cfg.actor_lr).update(grad, state.alpha_opt_state)
        state = state.replace(log_alpha=optax.apply_updates(state.log_alpha, updates), alpha_opt_state=alpha_opt_state)
    return state, (loss_pi, logp)


def ilq_update(cfg: ILQConfig, state: TrainState, frozen: Frozen, key):
    """One step of Algorithm 1: minibatch (inside jit) -> targets -> critics (Eq. 16) -> actor and alpha
    (Eq. 21) -> soft target update."""
    k_batch, k_target, k_actor = jax.random.split(key, 3)
    idx = jax.random.randint(k_batch, (cfg.batch_size,), 0, frozen.data.rewards.shape[0])
    batch = jax.tree_util.tree_map(lambda x: x[idx], frozen.data)
    t = ilb_targets(cfg, state, frozen, batch, None if frozen.bank is None else frozen.bank[idx], k_target)

    (loss_q, (loss_in, loss_ood, q_data, q_ood)), grads = jax.value_and_grad(
        partial(critic_loss, cfg), has_aux=True)(state.critic_params, batch, t)
    updates, critic_opt_state = cfg.optimizer(cfg.critic_lr).update(grads, state.critic_opt_state)
    critic_params = optax.apply_updates(state.critic_params, updates)

    state = state.replace(critic_params=critic_params, critic_opt_state=critic_opt_state)
    state, (loss_pi, logp) = actor_alpha_update(cfg, state, batch.observations, k_actor)
    state = state.replace(target_critic_params=optax.incremental_update(
        state.critic_params, state.target_critic_params, cfg.tau))
    metrics = {"losses/critic_loss": loss_q, "losses/critic_loss_in_sample": loss_in, "losses/critic_loss_ood": loss_ood,
               "losses/actor_loss": loss_pi, "losses/alpha": jnp.exp(state.log_alpha) if cfg.entropy else jnp.zeros(()),
               "losses/entropy": -jnp.mean(logp), "losses/q_data": q_data, "losses/q_ood": q_ood,
               "ilq/y_in": t.y_in.mean(), "ilq/y_ood": t.y_ood.mean()}
    if t.y_img is not None and t.y_lmt is not None:  # the paper's health check (Fig. 10a)
        metrics["ilq/y_img_minus_y_lmt"] = jnp.mean(t.y_img - t.y_lmt)
        metrics["ilq/ood_clip_frac"] = jnp.mean(t.y_lmt < t.y_img)
    return state, metrics


def make_update_fn(cfg: ILQConfig, batched: bool = False):
    """Many updates per host call: a lax.scan over ilq_update, jitted, with the train state donated.

    batched=True: the state and the keys carry a leading seed axis and jax.vmap runs that many independent
    learners in the same call (purejaxrl's pattern); they share the device-resident data and frozen models."""
    def update_many(state: TrainState, frozen: Frozen, keys):
        return jax.lax.scan(lambda s, k: ilq_update(cfg, s, frozen, k), state, keys)
    return jax.jit(jax.vmap(update_many, in_axes=(0, None, 0)) if batched else update_many, donate_argnums=0)


def make_behavior_bank(behavior: BehaviorModel, observations, m: int, seed: int, chunk: int = 8192):
    """--behavior-bank: M behaviour actions per dataset state, sampled once (they stay fixed in training)."""
    sample = jax.jit(partial(diffusion_sample, behavior), static_argnums=2)
    key, parts, t0 = jax.random.PRNGKey(seed), [], time.time()
    for i in range(0, observations.shape[0], chunk):
        parts.append(sample(observations[i:i + chunk], jax.random.fold_in(key, i), m))
    bank = jnp.concatenate(parts)
    print(f"[models] behaviour bank: {bank.shape[0]} states x {m} actions in {time.time() - t0:.1f}s")
    return bank


# =====================================================================================
# Evaluation
# =====================================================================================

def evaluate(envs, policy, params, seed) -> np.ndarray:
    """One episode per vectorised env with the deterministic action tanh(mean); returns (num_envs,).
    seed: an int (env i starts from seed + i) or a list with one seed per env."""
    obs, _ = envs.reset(seed=seed)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    returns = np.zeros(envs.num_envs)
    done = np.zeros(envs.num_envs, bool)
    while not done.all():
        act = np.clip(np.asarray(policy(params, jnp.asarray(flatten_obs(obs)))), low, high)
        obs, reward, term, trunc, _ = envs.step(act)
        returns += np.where(done, 0.0, reward)
        done |= term | trunc
    return returns


def evaluation_seeds(eval_seed: int, index: int, episodes: int, num_seeds: int) -> list:
    """Fresh start states at every evaluation: episode e of evaluation `index` (0, 1, ...) starts from
    eval_seed + index * episodes + e, the same states for every learner seed of the batch."""
    return [eval_seed + index * episodes + e for _ in range(num_seeds) for e in range(episodes)]


# =====================================================================================
# Logging, checkpoints, and the training loop
# =====================================================================================

class TensorBoard:
    """Scalars in TensorBoard's event format, without TensorFlow or torch."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self.writer = EventFileWriter(logdir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        self.writer.add_event(Event(wall_time=time.time(), step=int(step),
                                    summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])))

    def close(self) -> None:
        self.writer.close()


POSITIVE_INTS = ("total_steps", "eval_interval", "updates_per_call", "eval_episodes", "batch_size", "num_seeds",
                 "num_behavior_samples", "num_ood_actions", "hidden_dim", "num_hidden", "dynamics_members",
                 "dynamics_elites", "dynamics_hidden", "dynamics_layers", "dynamics_epochs", "diffusion_steps",
                 "diffusion_k", "random_dataset_steps")


def resolve_args(args: Args) -> Args:
    """Fill budget defaults and check every numeric flag before any work starts."""
    args = dataclasses.replace(args, **{k: v for k, v in BUDGETS[args.budget].items() if getattr(args, k) is None})
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    bad = [f"{flag(n)} ({getattr(args, n)}) must be a positive integer" for n in POSITIVE_INTS if getattr(args, n) <= 0]
    if args.stop_after is not None and args.stop_after <= 0:
        bad.append(f"--stop-after ({args.stop_after}) must be a positive integer")
    for name in ("critic_lr", "actor_lr", "dynamics_lr", "diffusion_lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            bad.append(f"{flag(name)} ({getattr(args, name)}) must be positive")
    for name in ("eta", "gamma", "tau"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            bad.append(f"{flag(name)} ({value}) must lie in [0, 1]")
    if args.penalty_coef is not None and args.penalty_coef < 0:
        bad.append(f"--penalty-coef ({args.penalty_coef}) must be >= 0")
    if args.dynamics_elites > args.dynamics_members:
        bad.append(f"--dynamics-elites ({args.dynamics_elites}) cannot exceed --dynamics-members ({args.dynamics_members})")
    if not (args.imagination or args.limitation):
        bad.append("--no-imagination and --no-limitation together leave no OOD target; keep at least one")
    if bad:
        raise ILQError("; ".join(bad) + ".")
    return args


def _read_run_file(run_dir: str, name: str, what: str):
    """A file of a run folder, or one clear error naming it (never a traceback, never a deletion)."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise ILQError(f"--resume {run_dir}: {path} is missing, so there is {what} to continue.")
    try:
        raw = open(path, "rb").read()
        return raw if name.endswith(".msgpack") else json.loads(raw)
    except (OSError, ValueError) as e:
        raise ILQError(f"--resume {run_dir}: {path} is damaged ({type(e).__name__}: {e}).") from None


def resume_args(args: Args) -> Args:
    """The saved settings of the run in --resume; flags that would change them are refused."""
    changed = [f.name for f in dataclasses.fields(Args) if f.name not in ("resume", "stop_after")
               and getattr(args, f.name) != f.default]
    if changed:
        raise ILQError(f"--resume continues a run with its saved settings; drop {', '.join('--' + c.replace('_', '-') for c in changed)} "
                       f"(to train longer, start a new run with a larger --total-steps).")
    saved = _read_run_file(args.resume, "args.json", "no run of ilq_jax.py")
    try:
        saved = Args(**saved)
    except TypeError as e:
        raise ILQError(f"--resume {args.resume}: args.json does not hold this version's settings ({e}).") from None
    if os.path.exists(os.path.join(args.resume, "summary.json")):
        raise ILQError(f"--resume {args.resume}: the run has finished; its results are in "
                       f"{os.path.join(args.resume, 'summary.json')}.")
    return dataclasses.replace(saved, resume=args.resume, stop_after=args.stop_after)


def save_checkpoint(run_dir: str, state: TrainState, progress: dict) -> None:
    _atomic_write(os.path.join(run_dir, "checkpoint.msgpack"), flax.serialization.to_bytes(state))
    _atomic_write(os.path.join(run_dir, "checkpoint.json"), json.dumps(progress).encode())


def load_checkpoint(run_dir: str, template: TrainState) -> tuple[TrainState, dict]:
    progress = _read_run_file(run_dir, "checkpoint.json", "no checkpoint")
    raw = _read_run_file(run_dir, "checkpoint.msgpack", "no checkpoint")
    try:
        state = flax.serialization.from_bytes(template, raw)
        if [x.shape for x in jax.tree_util.tree_leaves(state)] != [x.shape for x in jax.tree_util.tree_leaves(template)]:
            raise ValueError("its arrays have other shapes than this run's networks")
    except Exception as e:
        raise ILQError(f"--resume {run_dir}: {os.path.join(run_dir, 'checkpoint.msgpack')} is damaged ({e}).") from None
    return state, progress


def check_finite(metrics: dict, first_update: int, run_dir: str, seeds=None) -> None:
    """Stop on a non-finite loss or Q value, naming the update (and seed) and the last good checkpoint.
    metrics: arrays of shape (updates,) or (seeds, updates)."""
    bad = np.zeros_like(np.asarray(metrics["losses/critic_loss"]), bool)
    for k in ("losses/critic_loss", "losses/actor_loss", "losses/q_data", "losses/q_ood"):
        bad |= ~np.isfinite(np.asarray(metrics[k]))
    if bad.any():
        bad = bad.reshape(-1, bad.shape[-1])
        which, offset = np.unravel_index(int(np.argmax(bad)), bad.shape)
        ckpt = os.path.join(run_dir, "checkpoint.msgpack")
        raise ILQError(f"Non-finite loss or Q value at update {first_update + offset}"
                       + (f" of seed {seeds[which]}" if seeds is not None else "") + ". "
                       + (f"The last good checkpoint is {ckpt}; resume with --resume {run_dir} after changing "
                          f"the settings that diverged (e.g. a smaller --delta or learning rate)."
                          if os.path.exists(ckpt) else "No checkpoint was saved before it."))


def summarize(progress: dict, seeds: list) -> dict:
    """Per seed: the mean of the last 10 evaluations (never the best); then mean and std over seeds."""
    per_seed = []
    for i, seed in enumerate(seeds):
        scores = [e[i] for e in progress["normalized_scores"] if e is not None]
        per_seed.append(dict(
            seed=seed, final_normalized_score=float(np.mean(scores[-10:])) if scores else None,
            final_return=float(np.mean([np.mean(r[i]) for r in progress["returns"][-10:]])),
            normalized_scores=[None if e is None else e[i] for e in progress["normalized_scores"]],
            returns=[r[i] for r in progress["returns"]], q_data=[q[i] for q in progress["q_data"]]))
    finals = [p["final_normalized_score"] for p in per_seed if p["final_normalized_score"] is not None]
    return dict(final_normalized_score=float(np.mean(finals)) if finals else None,
                final_normalized_score_std=float(np.std(finals)) if finals else None,
                final_return=float(np.mean([p["final_return"] for p in per_seed])), seeds=per_seed)


def train(args: Args) -> dict:
    t_invocation = time.time()
    args = resolve_args(resume_args(args) if args.resume else args)
    data, info = load_dataset(args)
    print(describe_dataset(data, info))
    hp = effective_hparams(args, info)
    run_name = args.run_name or f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.env_id)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or os.path.join("runs", run_name)
    if not args.resume and os.path.exists(run_dir):
        raise ILQError(f"Run folder {run_dir} already exists; pick another --run-name or continue it with --resume {run_dir}.")
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    n_seeds, n_eval = len(seeds), args.eval_episodes
    print(f"[ilq] {hp['source']}; effective: eta {hp['eta']}, delta {hp['delta']}, penalty {hp['penalty_coef']}, "
          f"lr critic {hp['critic_lr']} / actor {hp['actor_lr']}, entropy {hp['entropy']}, cosine lr {hp['cosine_lr']}"
          + (f" (overridden by flags: {', '.join(hp['overridden'])})" if hp["overridden"] else ""))
    print(f"[ilq] budget '{args.budget}': {args.total_steps} updates, eval every {args.eval_interval} "
          f"({n_eval} episodes), M={args.num_behavior_samples}, K={args.diffusion_k}, OOD actions/state "
          f"{args.num_ood_actions}, imagination {args.imagination}, limitation {args.limitation}, "
          f"behaviour {'bank' if args.behavior_bank else 'fresh samples every update'}; "
          f"seed{'s' if n_seeds > 1 else ''} {', '.join(map(str, seeds))}; run folder {run_dir}")
    envs = make_env(info, n_seeds * n_eval)  # fail on a mismatched env before any training
    os.makedirs(run_dir, exist_ok=True)
    if not args.resume:
        _atomic_write(os.path.join(run_dir, "args.json"), json.dumps(dataclasses.asdict(args), indent=2).encode())
    pretrain_tb = TensorBoard(os.path.join(run_dir, "pretrain"))
    try:
        dynamics, behavior = load_or_pretrain(args, data, info, log=pretrain_tb.scalar)
    finally:
        pretrain_tb.close()
    bank = make_behavior_bank(behavior, data.observations, args.num_behavior_samples, args.pretrain_seed) \
        if args.behavior_bank and args.limitation else None
    cfg = ILQConfig(info.obs_dim, info.act_dim, hp["eta"], hp["delta"], hp["penalty_coef"], hp["critic_lr"],
                    hp["actor_lr"], hp["entropy"], hp["cosine_lr"], args.total_steps, args.gamma, args.tau,
                    args.batch_size, args.num_behavior_samples, args.num_ood_actions, args.imagination,
                    args.limitation, bank is not None, args.target_entropy_bonus, args.hidden_dim, args.num_hidden)
    frozen = Frozen(data, dynamics, behavior, bank)
    # Seed i of the batch is exactly the learner a single run with --seed i would be.
    state = jax.vmap(partial(init_train_state, cfg))(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    progress = dict(updates=0, eval_steps=[], returns=[], normalized_scores=[], q_data=[], train_time_s=0.0,
                    wall_time_s=0.0)
    if args.resume:
        state, progress = load_checkpoint(run_dir, state)
        print(f"[ilq] resumed {run_dir} at update {progress['updates']}")
    seed_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) // n_seeds
    print(f"[ilq] {n_seeds} learner{'s' if n_seeds > 1 else ''} in one jitted call; train state "
          f"{seed_bytes / 2**20:.1f} MiB per seed")
    update = make_update_fn(cfg, batched=True)
    run_keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), 1) for s in seeds])
    # The key of update u depends on u alone, so calls of any length (and resumes) give the same learner.
    update_keys = jax.jit(jax.vmap(lambda rk, us: jax.vmap(partial(jax.random.fold_in, rk))(us), in_axes=(0, None)))
    policy = jax.jit(lambda p, o: jax.vmap(partial(deterministic_action, cfg.actor))(
        p, o.reshape(n_seeds, n_eval, -1)).reshape(n_seeds * n_eval, -1))
    writers = [TensorBoard(os.path.join(run_dir, f"seed_{s}")) for s in seeds]
    wall_before, start_updates, last_print = progress["wall_time_s"], progress["updates"], time.time()

    def checkpoint():
        progress["wall_time_s"] = wall_before + time.time() - t_invocation
        save_checkpoint(run_dir, state, progress)

    stop = {"requested": False}
    def on_sigint(signum, frame):  # finish the running call, checkpoint, then stop; a 2nd Ctrl-C aborts
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        while progress["updates"] < args.total_steps:
            u0 = progress["updates"]
            next_eval = min(args.total_steps, (u0 // args.eval_interval + 1) * args.eval_interval)
            n = min(args.updates_per_call, next_eval - u0)
            if args.stop_after:
                n = min(n, start_updates + args.stop_after - u0)
            t0 = time.time()
            state, metrics = update(state, frozen, update_keys(run_keys, jnp.arange(u0, u0 + n)))
            metrics = jax.device_get(metrics)  # (seeds, n) per metric: one host transfer per call
            check_finite(metrics, u0 + 1, run_dir, seeds)
            progress["updates"] = step = u0 + n
            progress["train_time_s"] += time.time() - t0
            rate = step / max(progress["train_time_s"], 1e-9)  # updates/s of each learner (all run at once)
            for i, w in enumerate(writers):
                for name, values in metrics.items():
                    w.scalar(name, float(np.mean(values[i])), step)
                w.scalar("charts/SPS", n / (time.time() - t0), step)
            line = (f"[ilq] update {step:8d}/{args.total_steps} | {rate:6.1f} updates/s"
                    + (f" per seed x {n_seeds}" if n_seeds > 1 else "")
                    + f" | Q(data) {float(np.mean(metrics['losses/q_data'])):8.2f}"
                    f" | alpha {float(np.mean(metrics['losses/alpha'])):.3f}"
                    f" | time left {(args.total_steps - step) / rate:5.0f}s")
            if step == next_eval:
                index = len(progress["eval_steps"])
                returns = evaluate(envs, policy, state.actor_params,
                                   evaluation_seeds(args.eval_seed, index, n_eval, n_seeds)).reshape(n_seeds, n_eval)
                norm = info.normalize(returns)
                progress["eval_steps"].append(step)
                progress["returns"].append(returns.tolist())
                progress["normalized_scores"].append(None if norm is None else norm.mean(1).tolist())
                progress["q_data"].append(np.mean(metrics["losses/q_data"], 1).tolist())  # over-optimism (Fig. 10)
                for i, w in enumerate(writers):
                    w.scalar("eval/episodic_return", returns[i].mean(), step)
                    if norm is not None:
                        w.scalar("eval/normalized_score", norm[i].mean(), step)
                checkpoint()
                spread = (f" +- {norm.mean(1).std():.2f} over seeds" if n_seeds > 1 else "") if norm is not None else ""
                print(line.replace(" | Q(data)", f" | return {returns.mean():8.1f}"
                                   + (f" | normalised {norm.mean():6.2f}{spread}" if norm is not None else "")
                                   + " | Q(data)"), flush=True)
                last_print = time.time()
            elif time.time() - last_print >= 30:  # a sign of life between evaluations
                print(line, flush=True)
                last_print = time.time()
            if stop["requested"]:
                checkpoint()
                print(f"[ilq] interrupted at update {step}; checkpoint saved. Continue with: "
                      f"python ilq_jax.py --resume {run_dir}", flush=True)
                raise KeyboardInterrupt
            if args.stop_after and step - start_updates >= args.stop_after and step < args.total_steps:
                checkpoint()
                print(f"[ilq] stopped at update {step} (--stop-after) with a checkpoint; continue with: "
                      f"python ilq_jax.py --resume {run_dir}")
                return {}
    finally:
        signal.signal(signal.SIGINT, old_handler)
        for w in writers:
            w.close()
        envs.close()

    ds_norm = info.normalize(info.episode_returns)
    summary = dict(
        **summarize(progress, seeds), num_seeds=n_seeds,
        dataset_mean_normalized_return=None if ds_norm is None else float(ds_norm.mean()),
        dataset_mean_return=float(info.episode_returns.mean()), eval_steps=progress["eval_steps"],
        evaluation=dict(env=info.eval_env if isinstance(info.eval_env, str) else info.eval_env.id,
                        episodes=n_eval, policy="deterministic tanh(mean)",
                        start_seeds=f"eval_seed + index * episodes + e with eval_seed {args.eval_seed}, index = "
                                    f"0, 1, ... per evaluation, e = 0..{n_eval - 1} per episode; same for every seed"),
        updates_per_second=progress["updates"] / progress["train_time_s"], train_time_s=progress["train_time_s"],
        wall_time_s=wall_before + time.time() - t_invocation, train_state_bytes_per_seed=int(seed_bytes),
        dataset=dict(name=info.name, source=info.source, fingerprint=info.fingerprint, ref_min=info.ref_min,
                     ref_max=info.ref_max),
        hyperparameters={k: v for k, v in hp.items() if k != "overridden"}, args=dataclasses.asdict(args),
        versions=package_versions(), devices=[str(d) for d in jax.devices()])
    _atomic_write(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    if summary["final_normalized_score"] is not None:
        spread = f" +- {summary['final_normalized_score_std']:.2f} over {n_seeds} seeds" if n_seeds > 1 else ""
        print(f"[ilq] final normalised score (mean of the last {min(10, len(progress['eval_steps']))} evaluations): "
              f"{summary['final_normalized_score']:.2f}{spread} | dataset mean normalised return "
              f"{summary['dataset_mean_normalized_return']:.2f} | {run_dir}/summary.json")
    return summary


def main(argv=None) -> None:
    args = tyro.cli(Args, args=argv)
    try:
        train(args)
    except ILQError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("[ilq] interrupted (Ctrl-C); exit code 130", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
