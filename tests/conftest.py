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


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after 20 of 40 updates (--stop-after), with its checkpoint (one per test module)."""
    from test_learner import _tiny_args

    import ilq_jax as ilq

    tmp = tmp_path_factory.mktemp("stopped")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert ilq.train(_tiny_args(tmp, run_name="half", stop_after=20)) == {}
    finally:
        os.chdir(cwd)
    return tmp / "runs" / "half"
