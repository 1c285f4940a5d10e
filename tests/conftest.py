"""Shared test setup: the repository root is importable, and every dataset/model cache lives in a
temporary folder so tests never touch (or depend on) the user's ~/.minari, ~/.d4rl or model cache."""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_CACHE = tempfile.mkdtemp(prefix="ilq-tests-")
os.environ["MINARI_DATASETS_PATH"] = os.path.join(_CACHE, "minari")
os.environ["D4RL_DATASET_DIR"] = os.path.join(_CACHE, "d4rl")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the test run, shared by the test processes and every CLI they start: the many tiny runs
# compile the same programs, and a cached program is the same program (same numbers), compiled once.
# (With pytest-xdist, all workers of one run share it: PYTEST_XDIST_TESTRUNUID is the run's.)
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_COMPILED = os.path.join(tempfile.gettempdir(), f"ilq-tests-jax-{_RUN}") if _RUN else os.path.join(_CACHE, "jax-compilation")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILED)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' programs are tiny and compiled hundreds of times: LLVM's optimisation of the CPU code costs more than it
# saves here (measured: a tiny CLI run 47 s -> 35 s). The same HLO, the same maths; speed figures never come from tests.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


def run_training_cli(tmp_path, run_name, *argv, timeout=900):
    """`python ilq_jax.py ARGV --run-name RUN_NAME` in tmp_path, with its own Minari folder and model cache; asserts
    exit code 0 and returns (the finished process, the run's summary.json)."""
    import json
    import subprocess

    env = dict(os.environ, MINARI_DATASETS_PATH=os.path.join(tmp_path, "minari"), JAX_PLATFORMS="cpu")
    argv = [*argv, "--run-name", run_name, "--model-dir", os.path.join(tmp_path, "models")]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "ilq_jax.py"), *argv], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out, json.load(open(os.path.join(tmp_path, "runs", run_name, "summary.json")))


import pytest  # noqa: E402

# The tiny run of the CLI tests: a 3000-step generated dataset, 40 updates, an evaluation every 20, small networks.
TINY_RUN = dict(random_dataset_steps=3000, total_steps=40, updates_per_call=10, eval_interval=20, eval_episodes=2,
                dynamics_epochs=1, diffusion_steps=100, hidden_dim=32, dynamics_hidden=32, batch_size=32,
                num_behavior_samples=3)  # fmt: skip


def tiny_flags(**kw) -> list:
    """The tiny run as command-line flags; kw: other values (None leaves a flag out)."""
    return [x for k, v in {**TINY_RUN, **kw}.items() if v is not None for x in ("--" + k.replace("_", "-"), str(v))]


TINY = tiny_flags()


def tiny_args(tmp_path, **kw):
    """The tiny run as ilq_jax.Args, its model cache in tmp_path."""
    import ilq_jax as ilq

    return ilq.Args(**{**TINY_RUN, "model_dir": str(tmp_path / "models"), **kw})


def with_params(state, actor=None, critic=None, target=None, log_alpha=None):
    """An ilq.ILQState with some parameters replaced (their Adam states kept): tests plant networks and alpha."""
    import jax.numpy as jnp

    if actor is not None:
        state = state.replace(actor=state.actor.replace(params=actor))
    if critic is not None:
        state = state.replace(critic=state.critic.replace(params=critic))
    if target is not None:
        state = state.replace(critic=state.critic.replace(target_params=target))
    if log_alpha is not None:
        state = state.replace(alpha=state.alpha.replace(params=dict(log_alpha=jnp.asarray(log_alpha, jnp.float32))))
    return state


def tiny_config(obs_dim=5, act_dim=2, total_steps=100, **overrides):
    """A small ILQConfig for the tests with random networks: ILQConfig.for_task with settings away from 0 and 1."""
    import ilq_jax as ilq

    kw = dict(eta=0.7, delta=0.3, penalty_coef=0.5, critic_lr=1e-3, actor_lr=1e-3, batch_size=8, num_behavior_samples=4,
              num_ood_actions=2, hidden_dim=32, num_hidden=2)  # fmt: skip
    return ilq.ILQConfig.for_task(None, obs_dim, act_dim, total_steps, **{**kw, **overrides})


def train_in(folder, **kw):
    """ilq_jax.train of the tiny run (kw: other settings) with `folder` as the current directory: its runs/ there."""
    import ilq_jax as ilq

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return ilq.train(tiny_args(folder, **kw))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after 20 of 40 updates (--stop-after), with its checkpoint (one per test module)."""
    tmp = tmp_path_factory.mktemp("stopped")
    assert train_in(tmp, run_name="half", stop_after=20) == {}
    return tmp / "runs" / "half"
