"""The paper's protocol as one program (Part II's make_learners_update, built on Part I's ilq_update): every (method,
seed) learner of one jitted scan equals Part I's single run of that method and seed (make_update_fn, ilq_update
scanned); the behaviour samples of a chunk of updates drawn in one chain equal those drawn update by update (at the
paper's sizes); evaluation in a worker process equals evaluation in the training loop; the learner axis split over
two devices gives the same learners."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_args as _tiny_args
from test_learner import setup

import ilq_jax as ilq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ("ilq", "no-imagination", "no-limitation")


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def learner_keys(seeds, n):
    return jnp.stack([jax.random.split(jax.random.PRNGKey(100 + s), n) for s in seeds])


def test_each_method_seed_learner_of_the_batch_is_the_single_run_of_that_method_and_seed():
    """200 updates of 3 methods x 2 seeds in one call (behaviour samples drawn 4 updates at a time) against 6 single
    runs of Part I's make_update_fn (samples drawn inside each update): learner (m, s) == method m with seed s."""
    cfg, _, frozen, _ = setup()
    seeds, n = (3, 8), 200
    keys = learner_keys(seeds, n)
    init = jax.vmap(lambda k: ilq.init_train_state(cfg, k))(jnp.stack([jax.random.PRNGKey(s) for s in seeds * len(ALL)]))
    update = ilq.make_learners_update(cfg, ALL, sample_chunk=4)
    batched, m_batched = update(init, frozen, None, jnp.tile(keys, (3, 1, 1)))
    for g, (method, method_cfg) in enumerate(zip(ALL, ilq.method_configs(cfg, ALL))):
        single_run = ilq.make_update_fn(method_cfg)  # compiled once per method
        for i, s in enumerate(seeds):
            learner = g * len(seeds) + i
            single, m_single = single_run(ilq.init_train_state(cfg, jax.random.PRNGKey(s)), frozen, keys[i])
            assert_trees_close(jax.tree_util.tree_map(lambda x: x[learner], batched), single)
            for k in m_single:
                np.testing.assert_allclose(m_batched[k][learner], m_single[k], rtol=2e-4, atol=2e-4, err_msg=f"{method} {k}")
            assert {k for k in m_batched if np.isfinite(m_batched[k][learner]).all()} == set(m_single)
    # the methods really differ (ILQ's OOD target is neither ablation's), and only ILQ has the clip diagnostic
    q_ood = m_batched["losses/q_ood"]
    assert not np.allclose(q_ood[0], q_ood[2]) and not np.allclose(q_ood[0], q_ood[4]) and not np.allclose(q_ood[2], q_ood[4])
    clip = m_batched["ilq/ood_clip_frac"]
    assert np.isfinite(clip[:2]).all() and np.isnan(clip[2:]).all()


def paper_sized():
    """Hopper's sizes and the paper's networks (Table 3), random parameters and data."""
    obs, act = 11, 3
    cfg = ilq.ILQConfig.for_task("hopper-medium-replay", obs, act, total_steps=1000)  # eta 0.8, delta -0.5, penalty 1
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    n = 2000
    data = ilq.Transitions(jax.random.normal(k[0], (n, obs)), jax.random.uniform(k[1], (n, act), minval=-1, maxval=1),
                           jax.random.normal(k[2], (n,)), jax.random.normal(k[3], (n, obs)), jnp.zeros(n))  # fmt: skip
    dyn = ilq.init_dynamics(obs, act, "hopper")
    beh = ilq.init_behavior(obs, act)
    beh = beh.replace(params=jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(k[4], p.shape), beh.params))
    return cfg, ilq.Frozen(data, dyn, beh)


def test_chunk_sampled_update_equals_the_per_update_one_at_the_papers_sizes():
    """The run's update with the behaviour samples of 3 updates drawn in one batched chain (sample_chunk 3, then a
    remainder of 1) == Part I's make_update_fn, whose ilq_update draws them itself, at the paper's sizes."""
    cfg, frozen = paper_sized()
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    state = ilq.init_train_state(cfg, jax.random.PRNGKey(1))
    chunked, m_chunked = ilq.make_learners_update(cfg, ("ilq",), sample_chunk=3)(
        jax.tree_util.tree_map(lambda x: x[None], state), frozen, None, keys[None]
    )
    state = ilq.init_train_state(cfg, jax.random.PRNGKey(1))
    plain, m_plain = ilq.make_update_fn(cfg)(state, frozen, keys)
    assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], chunked), plain, rtol=1e-4, atol=1e-5)
    for k in m_plain:
        np.testing.assert_allclose(m_chunked[k][0], m_plain[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_two_methods_in_one_run_with_a_worker_evaluator_and_a_resume_equal_the_single_run(tmp_path, monkeypatch):
    """CLI level: --methods ilq,no-limitation with evaluation in a worker process, stopped after 20 updates and resumed;
    its no-limitation learner's evaluations == a plain --no-limitation run evaluated in the training loop."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    assert ilq.train(_tiny_args(tmp_path, run_name="two", methods="ilq,no-limitation", eval_workers=1, stop_after=20)) == {}
    assert ilq.read_checkpoint(tmp_path / "runs" / "two")[0]["updates"] == 20
    two = ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "two")))
    single = ilq.train(_tiny_args(tmp_path, run_name="one", limitation=False, eval_workers=0))
    np.testing.assert_allclose(
        two["methods"]["no-limitation"]["seeds"][0]["returns"], single["seeds"][0]["returns"], rtol=1e-3
    )
    assert set(two["methods"]) == {"ilq", "no-limitation"} and two["learners"] == 2
    assert [f for f in os.listdir(tmp_path / "runs" / "two") if "checkpoint" in f] == ["checkpoint.msgpack"]  # one file
    for m in ("ilq", "no-limitation"):
        assert any(f.startswith("events.out") for f in os.listdir(tmp_path / "runs" / "two" / m / "seed_1"))
    assert "final_normalized_score" not in two  # per method only: no number that mixes methods


def test_evaluation_in_a_worker_process_equals_evaluation_in_the_loop():
    cfg, _, _, _ = setup()
    info = ilq.DatasetInfo("x", "test", None, "hopper", ilq.gym_env("Hopper-v5"), None, None, 11, 3, np.zeros(1), "f")
    cfg = ilq.ILQConfig(**{**cfg.__dict__, "obs_dim": 11, "act_dim": 3})
    params = jax.vmap(lambda k: ilq.init_train_state(cfg, k).actor.params)(jnp.stack([jax.random.PRNGKey(s) for s in (1, 2)]))
    results = []
    for workers in (0, 1):
        ev = ilq.Evaluator(info, cfg, 2, 3, workers)
        try:
            for index, step in enumerate((10, 20)):
                ev.submit(step, params, ilq.evaluation_seeds(7, index, 3, 2), step)
            results.append(ev.ready(wait=True))
        finally:
            ev.close()
    assert [r[0] for r in results[1]] == [10, 20] and [r[2] for r in results[1]] == [10, 20]
    for (_, sync, _), (_, worker, _) in zip(*results, strict=True):
        assert sync.shape == (2, 3)
        np.testing.assert_array_equal(sync, worker)


SHARDED = """
import sys; sys.path[:0] = [{root!r}, {tests!r}]
import jax, jax.numpy as jnp, numpy as np
from test_learner import setup
import ilq_jax as ilq
assert len(jax.local_devices()) == 2
cfg, _, frozen, _ = setup()
methods = ("ilq", "no-imagination")
keys = jnp.tile(jnp.stack([jax.random.split(jax.random.PRNGKey(100 + s), 30) for s in (1, 2)]), (2, 1, 1))
init = lambda: jax.vmap(lambda k: ilq.init_train_state(cfg, k))(jnp.stack([jax.random.PRNGKey(s) for s in (1, 2, 1, 2)]))
update = ilq.make_learners_update(cfg, methods, sample_chunk=2)
plain, m_plain = update(init(), frozen, None, keys)
state, frozen_s, keys_s = ilq.shard_learners(init(), frozen, keys, 4)
assert len(state.alpha.params["log_alpha"].sharding.device_set) == 2
sharded, m_sharded = update(state, frozen_s, None, keys_s)
for a, b in zip(jax.tree_util.tree_leaves((plain, m_plain)), jax.tree_util.tree_leaves((sharded, m_sharded))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
print("SAME")
"""


def test_learners_split_over_two_devices_are_the_same_learners():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    code = SHARDED.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "SAME" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "learners split over 2 devices (2 each)" in out.stdout


def test_bf16_models_move_the_targets_a_little_and_nothing_else():
    """--bf16-models: the frozen models compute in bfloat16 (their activations half the bytes); the in-sample target
    does not touch them and is unchanged, the imagined and limitation values move by a few percent at most, all
    float32 (the behaviour samples drawn by each model from the same key)."""
    cfg, frozen = paper_sized()
    bf16 = dict(dtype=jnp.bfloat16)
    low = ilq.Frozen(frozen.data, frozen.dynamics.replace(**bf16), frozen.behavior.replace(**bf16))
    eps = jax.jit(lambda beh, x: beh.net.apply(beh.params, x, jnp.zeros(1, jnp.int32), frozen.data.observations[:8]))
    assert (
        eps(low.behavior, jnp.zeros((8, 3))).dtype == jnp.bfloat16
        and eps(frozen.behavior, jnp.zeros((8, 3))).dtype == jnp.float32
    )
    state = ilq.init_train_state(cfg, jax.random.PRNGKey(1))
    batch = jax.tree_util.tree_map(lambda x: x[:256], frozen.data)

    def targets(fr, k):
        a_beh = ilq.diffusion_sample(fr.behavior, batch.observations, jax.random.PRNGKey(4), cfg.num_behavior_samples)
        return ilq.ilb_targets(cfg, state, fr, batch, a_beh, k)

    targets = jax.jit(targets)
    f32, bf16 = targets(frozen, jax.random.PRNGKey(3)), targets(low, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(f32.y_in, bf16.y_in)
    for name in ("y_img", "y_lmt", "y_ood"):
        x, y = np.asarray(getattr(f32, name)), np.asarray(getattr(bf16, name))
        assert getattr(bf16, name).dtype == jnp.float32
        scale = np.abs(x).mean() + x.std()
        assert 0 < np.abs(x - y).max() <= 0.05 * scale, (name, np.abs(x - y).max(), scale)
