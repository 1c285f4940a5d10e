"""Training runs as a user meets them: N seeds in one process (jax.vmap) equal N single runs, Ctrl-C and
--resume (checkpoint, exit code 130, only the remaining updates, bit-identical result), and every way a run
folder can be damaged or misused ending in one clear error."""

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, run_training_cli
from conftest import tiny_args as _tiny_args
from test_learner import setup

import ilq_jax as ilq
import pretrain_models

REAL_LEARNERS_UPDATE = ilq.make_learners_update
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vmapped_seed_is_the_single_run_of_that_seed():
    """300 updates of two learners in one vmapped call (the run's update, no chunks); learner i == Part I's unbatched
    learner of seed i."""
    cfg, _, frozen, _ = setup()
    seeds, n = (3, 8), 300
    keys = jnp.stack([jax.random.split(jax.random.PRNGKey(100 + s), n) for s in seeds])
    batched = jax.vmap(lambda k: ilq.init_train_state(cfg, k))(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    batched, m_batched = ilq.make_learners_update(cfg, ("ilq",))(batched, frozen, None, keys)
    for i, s in enumerate(seeds):
        single, m_single = ilq.make_update_fn(cfg)(ilq.init_train_state(cfg, jax.random.PRNGKey(s)), frozen, keys[i])
        member = jax.tree_util.tree_map(lambda x: x[i], batched)
        for a, b in zip(jax.tree_util.tree_leaves(member), jax.tree_util.tree_leaves(single)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
        for k in m_single:
            np.testing.assert_allclose(m_batched[k][i], m_single[k], rtol=2e-4, atol=2e-4)
    # the two learners really differ (a broadcast of one state would pass the loop above for one seed only)
    assert not np.allclose(m_batched["losses/critic_loss"][0], m_batched["losses/critic_loss"][1])


def test_cli_num_seeds_2_gives_each_seeds_own_run(tmp_path, monkeypatch):
    _, summary = run_training_cli(tmp_path, "two", *TINY, "--num-seeds", "2", "--seed", "5")
    assert [s["seed"] for s in summary["seeds"]] == [5, 6] and summary["num_seeds"] == 2
    finals = [s["final_normalized_score"] for s in summary["seeds"]]
    assert np.isclose(summary["final_normalized_score"], np.mean(finals))
    assert np.isclose(summary["final_normalized_score_std"], np.std(finals, ddof=1)) and "ddof=1" in summary["std"]
    assert summary["train_state_bytes_per_seed"] > 0
    for s in (5, 6):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "runs" / "two" / f"seed_{s}"))
    # seed 6 of the batch is the run a user gets with --seed 6 alone
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    single = ilq.train(_tiny_args(tmp_path, seed=6, run_name="six"))
    np.testing.assert_allclose(single["seeds"][0]["returns"], summary["seeds"][1]["returns"], rtol=1e-3)
    assert summary["seeds"][0]["returns"] != summary["seeds"][1]["returns"]


def _counting_update_fn(monkeypatch, counter, interrupt_on_call=None):
    """Wrap ilq.make_learners_update: count the updates each call runs; optionally send Ctrl-C to ourselves."""

    def make(*a, **kw):
        fn = REAL_LEARNERS_UPDATE(*a, **kw)

        def run(state, frozen, bank, keys):
            counter.append(keys.shape[-2])
            if interrupt_on_call == len(counter):
                os.kill(os.getpid(), signal.SIGINT)
            return fn(state, frozen, bank, keys)

        return run

    monkeypatch.setattr(ilq, "make_learners_update", make)


def test_ctrl_c_checkpoints_exits_130_and_resume_runs_only_the_rest_bit_for_bit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    full = ilq.train(_tiny_args(tmp_path, run_name="full"))
    calls = []
    _counting_update_fn(monkeypatch, calls, interrupt_on_call=2)
    argv = [*TINY, "--run-name", "cut", "--model-dir", str(tmp_path / "models")]
    with pytest.raises(SystemExit) as exit_info:
        ilq.main(argv)
    assert exit_info.value.code == 130
    out = capsys.readouterr()
    assert "interrupted at update 20; checkpoint saved" in out.out and "Traceback" not in out.err
    assert ilq.read_checkpoint(tmp_path / "runs" / "cut")[0]["updates"] == 20
    assert not (tmp_path / "runs" / "cut" / "summary.json").exists()
    cut_wall = ilq.read_checkpoint(tmp_path / "runs" / "cut")[0]["wall_time_s"]
    calls.clear()
    _counting_update_fn(monkeypatch, calls)
    t0 = time.time()
    resumed = ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "cut")))
    resume_s = time.time() - t0
    assert sum(calls) == 20  # only the remaining updates ran
    assert resumed["seeds"] == full["seeds"]
    assert ilq.read_checkpoint(tmp_path / "runs" / "cut")[1] == ilq.read_checkpoint(tmp_path / "runs" / "full")[1]
    # the resumed run's wall time counts both invocations, and the finished run cannot be resumed again
    assert cut_wall > 0 and cut_wall + 0.5 * resume_s < resumed["wall_time_s"] <= cut_wall + resume_s + 0.5
    before = (tmp_path / "runs" / "cut" / "summary.json").read_bytes()
    with pytest.raises(ilq.ILQError, match="has finished"):
        ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "cut")))
    assert (tmp_path / "runs" / "cut" / "summary.json").read_bytes() == before


def test_ctrl_c_during_pretraining_exits_130_and_keeps_finished_models(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ilq, "train_diffusion", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        ilq.main([*TINY, "--run-name", "pre", "--model-dir", str(tmp_path / "models")])
    assert exit_info.value.code == 130 and "Traceback" not in capsys.readouterr().err
    kept = [f for _, _, files in os.walk(tmp_path / "models") for f in files]
    assert any(f.startswith("dynamics-") and f.endswith(".msgpack") for f in kept)


def _variant(stopped_run, tmp_path, damage=None, remove=None):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    if remove:
        os.remove(run / remove)
    if damage:
        name, payload = damage
        (run / name).write_bytes(payload)
    return run


@pytest.mark.parametrize(
    "name,payload",
    [
        ("checkpoint.msgpack", b"\x00garbage"),
        ("checkpoint.msgpack", b"{not msgpack"),
        ("checkpoint.msgpack", b"\x91\x14"),  # a msgpack list [20], not a checkpoint
        ("checkpoint.msgpack", b"\x81\xa7updates\x14"),  # {"updates": 20} alone
        ("args.json", b"[1, 2"),
        ("checkpoint.msgpack", b""),
    ],
)
def test_damaged_run_files_give_one_error_naming_the_file_and_nothing_is_deleted(stopped_run, tmp_path, name, payload):
    run = _variant(stopped_run, tmp_path, damage=(name, payload))
    files = sorted(os.listdir(run))
    with pytest.raises(ilq.ILQError, match=name.replace(".", r"\.")):
        ilq.train(ilq.Args(resume=str(run)))
    assert sorted(os.listdir(run)) == files


def test_resume_without_checkpoint_is_an_error_not_a_fresh_start(stopped_run, tmp_path):
    run = _variant(stopped_run, tmp_path, remove="checkpoint.msgpack")
    with pytest.raises(ilq.ILQError, match="checkpoint.msgpack is missing"):
        ilq.train(ilq.Args(resume=str(run)))


def test_flags_that_resume_cannot_honour_are_refused(stopped_run, tmp_path):
    run = _variant(stopped_run, tmp_path)
    with pytest.raises(ilq.ILQError, match="drop --total-steps"):
        ilq.train(ilq.Args(resume=str(run), total_steps=400))


# ------------------------------------------------------------------------------------------------------------------
# --help: every flag described, None defaults explained, one boolean style; pretrain_models.py shows only its own
# ------------------------------------------------------------------------------------------------------------------


def _help(script):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="120"),  # one column of boxes (a wider terminal puts them side by side)
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _options(text):
    """{flag: its help text} from tyro's --help box (each option starts a line with --flag; its text may wrap)."""
    blocks, current = {}, None
    for line in text.splitlines():
        body = line.strip().strip("│").strip()
        m = re.match(r"│ (--[a-z][\w-]*)", line.strip())  # an option starts at the box's first column
        if m:
            current = m.group(1)
            blocks[current] = body
        elif current and body and not body.startswith("╰"):
            blocks[current] += " " + body
    return blocks


def _description(block):
    """An option's help without its flag names, metavar and '(default: ...)'."""
    block = re.sub(r"\(default: [^)]*\)", "", block)
    return re.sub(r"^(--[\w-]+,? ?)+(\{[^}]*\}(\|[A-Z]+)?|[A-Z]+)?", "", block).strip()


def test_every_flag_of_ilq_jax_is_documented_none_is_explained_and_booleans_are_flags():
    text = _help("ilq_jax.py")
    options = _options(text)
    for f in dataclasses.fields(ilq.Args):
        name = "--" + f.name.replace("_", "-")
        assert name in options, name
        words = _description(options[name]).split()
        assert len(words) >= 3, (name, options[name])
        if f.default is None:  # None is never left unexplained
            assert "None:" in _description(options[name]), (name, options[name])
        if f.name in ("eta", "delta", "penalty_coef", "critic_lr", "actor_lr", "entropy", "cosine_lr"):
            assert "None: the paper's value for this dataset" in options[name], name
        if f.type in ("bool", "FlagOrPaper"):  # one style: --flag / --no-flag
            assert options[name].startswith(f"{name}, --no-{name[2:]}"), options[name]
    assert "{None,True,False}" not in text and "True|False" not in text
    assert "5-10 min on 2 CPU cores" in options["--budget"]  # measured: 4 min 55 s and 10 min 25 s (benchmarks/RESULTS.md)
    assert "(Tables 3-6)" in text  # the description says where None values come from


def test_boolean_flags_parse_in_the_one_style():
    args = ilq.parse_args(["--no-entropy", "--cosine-lr", "--no-imagination", "--behavior-bank"])
    assert (args.entropy, args.cosine_lr, args.imagination, args.behavior_bank) == (False, True, False, True)
    assert ilq.parse_args([]).entropy is None  # left out: the paper's value for the dataset
    assert ilq.parse_args([]) == ilq.Args()  # the grouped command line gives the flat Args, defaults unchanged


def test_pretrain_models_help_shows_only_its_own_flags_and_what_it_does():
    text = _help("pretrain_models.py")
    options = _options(text)
    own = {
        "--env-id",
        "--dataset-path",
        "--download",
        "--random-dataset-steps",
        "--budget",
        "--dynamics-epochs",
        "--diffusion-steps",
        "--dynamics-members",
        "--dynamics-elites",
        "--dynamics-hidden",
        "--dynamics-layers",
        "--dynamics-lr",
        "--diffusion-k",
        "--diffusion-lr",
        "--pretrain-seed",
        "--model-dir",
        "--force",
    }
    assert set(options) == own, set(options) ^ own
    for block in options.values():
        assert len(_description(block).split()) >= 3, block
    assert "Pretrain ILQ's two frozen models once" in text and "(Algorithm 1, lines 2-3)" in text


def test_help_is_grouped_and_both_scripts_share_one_definition_of_the_data_and_model_flags():
    """--help shows one box per flag group, each flag in its group's box; pretrain_models.py's data and model flags
    are ilq_jax's own fields (the same classes), not copies."""
    text = _help("ilq_jax.py")
    boxes = re.split(r"╭─ (\w+) options", text)
    box_of = {flag: boxes[i] for i in range(1, len(boxes), 2) for flag in re.findall(r"│ (--[a-z][\w-]*)", boxes[i + 1])}
    for base in ilq.Args.__bases__:
        for f in dataclasses.fields(base):
            assert box_of["--" + f.name.replace("_", "-")] == base.GROUP, f.name
    assert {b.GROUP for b in ilq.Args.__bases__} == {"run", "data", "ilq", "models", "evaluation"}
    assert issubclass(pretrain_models.PretrainArgs, ilq.DataFlags) and issubclass(pretrain_models.PretrainArgs, ilq.ModelFlags)
    shared = [f.name for f in dataclasses.fields(ilq.DataFlags) + dataclasses.fields(ilq.ModelFlags)]
    pretrain = {f.name: f for f in dataclasses.fields(pretrain_models.PretrainArgs)}
    args = {f.name: f for f in dataclasses.fields(ilq.Args)}
    assert all(pretrain[n].default == args[n].default and pretrain[n].type == args[n].type for n in shared)
    parsed = ilq.parse_flags(pretrain_models.PretrainArgs, ["--dynamics-members", "9", "--env-id", "x"], "")
    assert (parsed.dynamics_members, parsed.env_id, parsed.budget, parsed.force) == (9, "x", "paper", False)
