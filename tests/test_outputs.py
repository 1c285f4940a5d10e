"""What a researcher looks at after a run: curves.png (plot_curves, `--plot`)."""

import json

import numpy as np
import pytest
from conftest import tiny_args

import ilq_jax as ilq

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_run_draws_its_curves_from_its_summary(tmp_path, monkeypatch):
    """One tiny 2-method x 2-seed run: curves.png from its summary, redrawn by --plot."""
    monkeypatch.chdir(tmp_path)
    summary = ilq.train(tiny_args(tmp_path, run_name="two", methods="ilq,no-limitation", num_seeds=2))
    run = tmp_path / "runs" / "two"
    png = (run / "curves.png").read_bytes()
    assert png[:8] == PNG and 10_000 < len(png) < 500_000

    drawn = ilq.plot_curves(json.loads((run / "summary.json").read_text()), str(tmp_path / "again.png"))
    assert list(drawn) == ["ilq", "no-limitation"]
    for m, series in drawn.items():
        seeds = summary["methods"][m]["seeds"]
        assert series["steps"] == summary["eval_steps"] == [20, 40]
        np.testing.assert_allclose(series["mean"], np.mean([s["normalized_scores"] for s in seeds], 0), rtol=1e-6)
        np.testing.assert_allclose(series["q_std"], np.std([s["q_data"] for s in seeds], 0), rtol=1e-6)
        assert len(series["std"]) == len(series["q_mean"]) == 2
    assert max(max(s["std"]) for s in drawn.values()) > 0  # two seeds differ

    (run / "curves.png").unlink()
    ilq.main(["--plot", str(run)])
    assert (run / "curves.png").read_bytes()[:8] == PNG


def test_curves_without_reference_scores_show_raw_returns_and_one_seed_has_no_band(tmp_path):
    summary = dict(eval_steps=[10, 20], num_seeds=1, updates=20, args=dict(total_steps=40), dataset=dict(name="d"))
    summary.update(dataset_mean_normalized_return=None, dataset_mean_return=5.0)
    seed = dict(normalized_scores=[None, None], returns=[[1.0, 3.0], [4.0, 6.0]], q_data=[0.5, 0.7])
    drawn = ilq.plot_curves(dict(summary, methods=dict(ilq=dict(seeds=[seed]))), str(tmp_path / "c.png"))
    assert drawn == dict(ilq=dict(steps=[10, 20], mean=[2.0, 5.0], std=[0.0, 0.0], q_mean=[0.5, 0.7], q_std=[0.0, 0.0]))
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG


def test_plot_is_documented_and_checked():
    assert "--plot" in ilq.Args.__doc__  # --help's description
    with pytest.raises(SystemExit) as e:
        ilq.main(["--plot"])
    assert e.value.code == 2
