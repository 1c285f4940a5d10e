"""What a researcher looks at after a run: curves.png (plot_curves, `--plot`) and --capture-video's mp4s."""

import json
import re

import numpy as np
import pytest
from conftest import tiny_args

import ilq_jax as ilq

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One model cache for the module's runs: the second run loads the tiny models the first one trained."""
    return str(tmp_path_factory.mktemp("models"))


def test_a_run_draws_its_curves_and_films_the_first_seed_of_each_method(tmp_path, monkeypatch, capsys, models):
    """One tiny 2-method x 2-seed run: curves.png from its summary, redrawn by --plot, and one mp4 per method of the
    final evaluation's first episode (the reset frame, then one frame per step)."""
    import imageio

    monkeypatch.chdir(tmp_path)
    args = tiny_args(tmp_path, run_name="two", methods="ilq,no-limitation", num_seeds=2, capture_video=True, model_dir=models)
    summary = ilq.train(args)
    out, run = capsys.readouterr().out, tmp_path / "runs" / "two"
    png = (run / "curves.png").read_bytes()
    assert png[:8] == PNG and 10_000 < len(png) < 500_000

    drawn = ilq.plot_curves(json.loads((run / "summary.json").read_text()), str(tmp_path / "again.png"))
    assert list(drawn) == ["ilq", "no-limitation"]
    for m, series in drawn.items():
        seeds = summary["methods"][m]["seeds"]
        assert series["steps"] == summary["eval_steps"] == [20, 40]
        np.testing.assert_allclose(series["mean"], np.mean([s["normalized_scores"] for s in seeds], 0), rtol=1e-6)
        np.testing.assert_allclose(series["q_std"], np.std([s["q_data"] for s in seeds], 0, ddof=1), rtol=1e-6)
        assert len(series["std"]) == len(series["q_mean"]) == 2
    assert max(max(s["std"]) for s in drawn.values()) > 0  # two seeds differ

    (run / "curves.png").unlink()
    ilq.main(["--plot", str(run)])
    assert (run / "curves.png").read_bytes()[:8] == PNG

    for m in ("ilq", "no-limitation"):  # only at the end (no --capture-video-every), the first seed of each method
        found = re.findall(rf"video runs/two/videos/{m}-update40\.mp4: (\d+) steps, return (\S+)", out)
        assert len(found) == 1, out[-3000:]
        steps, total = int(found[0][0]), float(found[0][1])
        # the evaluated episode: seed row 0 of the method, the first start state of the last evaluation
        assert total == pytest.approx(summary["methods"][m]["seeds"][0]["returns"][-1][0], rel=1e-3, abs=0.02)
        with imageio.get_reader(run / "videos" / f"{m}-update40.mp4") as video:
            frames = [frame for frame in video]  # (list() asks its length: infinite for a stream)
        assert len(frames) == steps + 1  # the reset frame, then one per step
        assert frames[0].std() > 1 and np.abs(frames[-1].astype(int) - frames[0]).mean() > 0.01
    assert sorted(p.name for p in (run / "videos").iterdir()) == ["ilq-update40.mp4", "no-limitation-update40.mp4"]


def test_without_rendering_the_run_says_so_once_and_finishes(tmp_path, monkeypatch, capsys, models):
    from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

    def no_opengl(self):
        raise RuntimeError("an OpenGL platform library has not been loaded")

    monkeypatch.setattr(MujocoEnv, "render", no_opengl)
    monkeypatch.chdir(tmp_path)
    summary = ilq.train(tiny_args(tmp_path, run_name="blind", capture_video_every=1, model_dir=models))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "--capture-video" in line]
    assert len(warnings) == 1 and "OpenGL platform library" in warnings[0], out[-3000:]
    assert "MUJOCO_GL=egl" in warnings[0] and "imageio-ffmpeg" in warnings[0] and warnings[0].count(". ") == 0
    assert summary["eval_steps"] == [20, 40] and (tmp_path / "runs" / "blind" / "summary.json").exists()
    assert not (tmp_path / "runs" / "blind" / "videos").exists()


def test_curves_without_reference_scores_show_raw_returns_and_one_seed_has_no_band(tmp_path):
    summary = dict(eval_steps=[10, 20], num_seeds=1, updates=20, args=dict(total_steps=40), dataset=dict(name="d"))
    summary.update(dataset_mean_normalized_return=None, dataset_mean_return=5.0)
    seed = dict(normalized_scores=[None, None], returns=[[1.0, 3.0], [4.0, 6.0]], q_data=[0.5, 0.7])
    drawn = ilq.plot_curves(dict(summary, methods=dict(ilq=dict(seeds=[seed]))), str(tmp_path / "c.png"))
    assert drawn == dict(ilq=dict(steps=[10, 20], mean=[2.0, 5.0], std=[0.0, 0.0], q_mean=[0.5, 0.7], q_std=[0.0, 0.0]))
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG


def test_plot_and_capture_video_every_are_checked():
    assert "--plot" in ilq.Args.__doc__  # --help's description
    with pytest.raises(SystemExit) as e:
        ilq.main(["--plot"])
    assert e.value.code == 2
    with pytest.raises(ilq.ILQError, match="--capture-video-every"):
        ilq.resolve_args(ilq.Args(capture_video_every=0))
