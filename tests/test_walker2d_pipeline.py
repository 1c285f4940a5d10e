"""The design card's command on walker2d data of the medium-replay protocol: benchmarks/make_datasets.py --robot
walker2d (quick mode) records on Walker2d-v4 with D4RL's -v2 masses and writes D4RL's HDF5 layout, labelled as
locally made; `ilq_jax.py --env-id walker2d-medium-replay --dataset-path FILE` then runs the paper's
walker2d-medium-replay row and evaluates on that robot."""

import os
import subprocess
import sys

import h5py
import numpy as np
from conftest import TINY, run_training_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_walker2d_data_run_the_design_cards_command_end_to_end(tmp_path):
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"), JAX_PLATFORMS="cpu")
    make = [sys.executable, os.path.join(ROOT, "benchmarks", "make_datasets.py"), "--robot", "walker2d", "--quick"]
    out = subprocess.run([*make, "--out-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "online SAC on Walker2d-v4 with the -v2 masses" in out.stdout
    path = tmp_path / "walker2d_medium_replay_quick-ilq-local.hdf5"
    with h5py.File(path) as f:
        assert "NOT a D4RL dataset" in f.attrs["ilq_local_description"]
        assert f["observations"].shape == (2000, 17) and f["next_observations"].shape == (2000, 17)
        assert f["actions"].shape == (2000, 6) and np.abs(f["actions"][:]).max() <= 1.0
        ends = f["terminals"][:] | f["timeouts"][:]
        # within an episode the next observation is the following row's observation
        cont = ~ends[:-1]
        np.testing.assert_array_equal(f["next_observations"][:-1][cont], f["observations"][1:][cont])
    assert (tmp_path / "walker2d_medium_quick-sac-policy.msgpack").exists()

    tiny = [x for x in TINY if x not in ("--random-dataset-steps", "3000")]
    args = ["--env-id", "walker2d-medium-replay", "--dataset-path", str(path), *tiny]
    _, summary = run_training_cli(tmp_path, "w2d", *args)
    hp = summary["hyperparameters"]
    assert (hp["eta"], hp["delta"], hp["penalty_coef"], hp["critic_lr"], hp["actor_lr"]) == (0.9, 1.0, 2.0, 3e-4, 1e-4)
    assert summary["evaluation"]["env"] == "Walker2d-v4" and "-v2 masses" in summary["evaluation"]["env_note"]
    assert "LOCALLY MADE" in summary["dataset"]["source"] and np.isfinite(summary["final_normalized_score"])
