"""After training (issue 36): a run's policy loaded in a few lines and scoring what the run scored, --evaluate with
more episodes (finished and stopped runs), damaged or foreign folders refused in one paragraph, and the run's record:
what a paper needs (the std's ddof, the evaluation window, commands and git commits, the effective settings written
when the run starts, folder names from the dataset and the methods)."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
from conftest import train_in

import ilq_jax as ilq


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny finished run of two seeds: evaluations at updates 20 and 40, 2 episodes each."""
    tmp = tmp_path_factory.mktemp("finished")
    summary = train_in(tmp, num_seeds=2, seed=3)
    (run,) = glob.glob(str(tmp / "runs" / "*"))
    return run, summary


def test_a_loaded_policy_acts_in_the_runs_own_env_and_scores_its_last_evaluation(finished):
    run, summary = finished
    assert os.path.basename(run).startswith("ilq-local_hopper_random-3000steps-v0__ilq__ilq_jax__3__")  # dataset, methods
    for seed in (3, 4):
        policy = ilq.load_policy(run, "ilq", seed=seed)
        assert (policy.method, policy.seed, policy.updates) == ("ilq", seed, 40)
        returns = []
        for start in ilq.evaluation_seeds(ilq.Args().eval_seed, 1, 2, 1):  # the start states of the last evaluation
            with policy.env() as env:
                obs, _ = env.reset(seed=start)
                total, done = 0.0, False
                while not done:
                    obs, reward, term, trunc, _ = env.step(policy(obs))
                    total, done = total + reward, term or trunc
            returns.append(total)
        last = summary["seeds"][seed - 3]["returns"][-1]
        np.testing.assert_allclose(returns, last, rtol=1e-3, atol=0.02)
    batch = ilq.load_policy(run)(np.zeros((5, 11), np.float32))  # a batch of observations: a batch of actions
    assert batch.shape == (5, 3) and np.all(np.abs(batch) <= 1)


def test_evaluate_scores_every_learner_again_with_more_episodes_and_touches_nothing_else(finished, tmp_path):
    run, summary = finished
    before = {f: open(f, "rb").read() for f in glob.glob(os.path.join(run, "*")) if os.path.isfile(f)}
    start = ilq.evaluation_seeds(ilq.Args().eval_seed, 1, 2, 1)[0]  # the first start state of the last evaluation
    ilq.main(["--evaluate", run, "--eval-episodes", "3", "--eval-seed", str(start)])
    (path,) = glob.glob(os.path.join(run, "evaluation-*.json"))
    out = json.load(open(path))
    assert out["updates"] == 40 and out["episodes"] == 3 and out["start_seeds"] == [start, start + 1, start + 2]
    ilq_ = out["methods"]["ilq"]  # as summary.json's, for one evaluation of 3 episodes
    for i, s in enumerate(ilq_["seeds"]):
        (returns,) = s["returns"]
        assert len(returns) == 3 and s["seed"] == 3 + i
        np.testing.assert_allclose(returns[:2], summary["seeds"][i]["returns"][-1], rtol=1e-3, atol=0.02)
    finals = [s["final_normalized_score"] for s in ilq_["seeds"]]
    assert np.isclose(ilq_["final_normalized_score_std"], np.std(finals, ddof=1)) and ilq_["std"].endswith("(ddof=1)")
    assert {f: open(f, "rb").read() for f in before} == before  # the run's own files are untouched
    os.remove(path)
    with pytest.raises(ilq.ILQError, match="--evaluate reads a run folder .*drop --total-steps"):
        ilq.parse_args(["--evaluate", run, "--total-steps", "80"])


def test_evaluate_takes_a_stopped_run_and_refuses_a_foreign_or_damaged_folder(stopped_run, tmp_path):
    out = ilq.evaluate_run(ilq.parse_args(["--evaluate", str(stopped_run), "--eval-episodes", "1"]), None)
    assert out["updates"] == 20 and len(out["methods"]["ilq"]["seeds"][0]["returns"]) == 1
    for f in glob.glob(str(stopped_run / "evaluation-*.json")):
        os.remove(f)
    with pytest.raises(ilq.ILQError, match=r"checkpoint\.msgpack is missing"):
        ilq.load_policy(str(tmp_path))
    damaged = tmp_path / "damaged"
    shutil.copytree(stopped_run, damaged)
    (damaged / "checkpoint.msgpack").write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(ilq.ILQError, match=r"checkpoint\.msgpack is damaged") as e:
        ilq.load_policy(str(damaged))
    assert "\n" not in str(e.value)
    with pytest.raises(ilq.ILQError, match=r"trained methods \['ilq'\] with seeds \[1\]; it has no learner ilq seed 7"):
        ilq.load_policy(str(stopped_run), seed=7)


def test_the_record_says_what_a_paper_needs_and_is_written_when_the_run_starts(finished, stopped_run):
    run, summary = finished
    assert summary["std"] == "sample std over seeds (ddof=1)"
    finals = [s["final_normalized_score"] for s in summary["seeds"]]
    assert np.isclose(summary["final_normalized_score_std"], np.std(finals, ddof=1))
    assert summary["evaluation_window"] == dict(last=2, updates=[20, 40])
    (call,) = summary["invocations"]
    assert call["command"].startswith("python ") and call["time"]
    assert call["git_commit"] is None or len(call["git_commit"].split("-")[0]) == 40
    assert summary["hyperparameters"]["eta"] == 0.9 and summary["config"]["eta"] == 0.9  # hopper-random's row
    record = json.load(open(stopped_run / "run.json"))  # a stopped run has its record too
    assert record["hyperparameters"]["delta"] == 1.0 and record["protocol"]["methods"] == ["ilq"]
    assert record["inputs"]["dynamics"]["config"]["members"] == 7 and len(record["inputs"]["behavior"]["sha256"]) == 64
    assert os.path.isabs(json.load(open(stopped_run / "args.json"))["model_dir"])
