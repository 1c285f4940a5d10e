"""The two pretrained models learn what they should, and their artifacts round-trip and refuse mismatches."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ilq_jax as ilq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------------------------
# Dynamics ensemble on a known linear-Gaussian system
# ------------------------------------------------------------------------------------------------------------------

OBS, ACT = 3, 2
SIGMA = np.array([0.05, 0.1, 0.2, 0.1])  # true noise std of [delta s (3), r]


def linear_gaussian(n, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, OBS))
    a = rng.uniform(-1, 1, size=(n, ACT))
    A = np.array([[0.1, -0.2, 0.0], [0.0, 0.3, 0.1], [-0.1, 0.0, 0.2]])
    B = np.array([[0.5, 0.0, -0.3], [0.0, 0.4, 0.2]])
    ds = s @ A.T + a @ B + rng.normal(size=(n, OBS)) * SIGMA[:3]
    r = s @ np.array([0.3, -0.2, 0.1]) + a @ np.array([0.5, -0.5]) + rng.normal(size=n) * SIGMA[3]
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return ilq.Transitions(f(s), f(a), f(r), f(s + ds), f(np.zeros(n)))


@pytest.fixture(scope="module")
def fitted():
    data = linear_gaussian(6000)
    model, metrics = ilq.train_dynamics(data, "hopper", members=4, elites=2, hidden=64, layers=4, epochs=40,
                                        lr=3e-3, seed=0)
    return data, model, metrics


def test_ensemble_fits_a_linear_gaussian_system_to_its_noise_floor(fitted):
    data, model, metrics = fitted
    floor = float(np.mean(SIGMA ** 2))
    assert metrics["holdout_mse_elites"] < 1.15 * floor, (metrics["holdout_mse_elites"], floor)
    # the predicted sigma is the true one, per output dimension (averaged over states)
    x = (jnp.concatenate([data.observations, data.actions], -1)[:2000] - model.input_mean) / model.input_std
    _, logvar = model.net.apply(model.params, x)
    sigma = np.asarray(jnp.exp(0.5 * logvar)[model.elites].mean((0, 1)))
    np.testing.assert_allclose(sigma, SIGMA, rtol=0.15)


def test_elites_are_the_members_with_the_lowest_holdout_error(fitted):
    data, model, metrics = fitted
    # recompute the holdout MSE per member from the model itself (same split rule: seed-0 permutation, min(20%, 1000))
    n = data.rewards.shape[0]
    hold = np.random.default_rng(0).permutation(n)[: min(int(0.2 * n), 1000)]
    x = jnp.concatenate([data.observations, data.actions], -1)[hold]
    y = jnp.concatenate([data.next_observations - data.observations, data.rewards[:, None]], -1)[hold]
    mean, _ = model.net.apply(model.params, (x - model.input_mean) / model.input_std)
    mse = np.asarray(jnp.mean((mean - y) ** 2, (1, 2)))
    np.testing.assert_allclose(mse, metrics["holdout_mse"], rtol=1e-4)
    assert sorted(np.asarray(model.elites).tolist()) == sorted(np.argsort(mse)[:2].tolist())
    assert len(set(np.round(mse, 8))) == 4  # members differ (own bootstraps and inits), so the choice means something


def planted_model(elites=(1, 3), members=4):
    """An ensemble whose member i predicts reward exactly 10 * i (and delta s = 0) with tiny variance."""
    model, _ = ilq.train_dynamics(linear_gaussian(50), "hopper", members=members, elites=2, hidden=8, layers=4, epochs=1)
    p = jax.tree_util.tree_map(lambda x: x, model.params)
    last = p["params"]["EnsembleDense_4"]
    out = OBS + 1
    last["kernel"] = jnp.zeros_like(last["kernel"])
    bias = np.zeros(last["bias"].shape, np.float32)
    bias[:, 0, OBS] = 10.0 * np.arange(members)  # reward mean of member i
    bias[:, 0, out:] = -8.0  # log-variance (then softly bounded)
    last["bias"] = jnp.asarray(bias)
    return model.replace(params=p, elites=jnp.asarray(elites, jnp.int32))


def test_dynamics_step_uses_a_random_elite_per_transition_and_mopo_penalty():
    model = planted_model()
    obs = jnp.full((4000, OBS), 0.0).at[:, 0].set(1.25)
    act = jnp.zeros((4000, ACT))
    nxt, r, penalty, done = jax.jit(ilq.dynamics_step)(model, obs, act, jax.random.PRNGKey(3))
    assert nxt.shape == (4000, OBS) and r.shape == penalty.shape == done.shape == (4000,)
    member = np.round(np.asarray(r) / 10.0).astype(int)
    counts = np.bincount(member, minlength=4)
    assert counts[0] == counts[2] == 0  # non-elites are never sampled
    assert 1700 < counts[1] < 2300 and 1700 < counts[3] < 2300  # each elite about half of the time
    # penalty = max over ALL members of ||sigma_i(s, a)||_2, computed here independently
    _, logvar = model.net.apply(model.params, (jnp.concatenate([obs, act], -1) - model.input_mean) / model.input_std)
    expected = jnp.max(jnp.linalg.norm(jnp.exp(0.5 * logvar), axis=-1), axis=0)
    np.testing.assert_allclose(np.asarray(penalty), np.asarray(expected), rtol=1e-5)
    # a different key picks differently; done comes from the hopper termination function
    _, r2, _, _ = ilq.dynamics_step(model, obs, act, jax.random.PRNGKey(4))
    assert np.mean(np.asarray(r2) != np.asarray(r)) > 0.3
    np.testing.assert_array_equal(np.asarray(done), np.asarray(ilq.terminated("hopper", nxt)))


# ------------------------------------------------------------------------------------------------------------------
# Termination functions on hand-made states
# ------------------------------------------------------------------------------------------------------------------

def _states(dim, rows):
    out = np.zeros((len(rows), dim), np.float32)
    for i, entries in enumerate(rows):
        for j, v in entries.items():
            out[i, j] = v
    return jnp.asarray(out)


def test_hopper_termination():
    s = _states(11, [{0: 1.25}, {0: 0.69}, {0: 1.25, 1: 0.21}, {0: 1.25, 1: -0.21}, {0: 1.25, 1: 0.19},
                     {0: 1.25, 5: 150.0}, {0: 1.25, 5: -150.0}, {0: 1.25, 5: 99.0}, {0: np.nan}, {0: 1.25, 3: np.inf}])
    # -150 in obs[1:] must be unhealthy: the common port computes abs(obs < 100) and misses it
    np.testing.assert_array_equal(np.asarray(ilq.terminated("hopper", s)),
                                  [False, True, True, True, False, True, True, False, True, True])


def test_walker2d_termination():
    s = _states(17, [{0: 1.2}, {0: 0.79}, {0: 2.01}, {0: 1.2, 1: 1.01}, {0: 1.2, 1: -1.01}, {0: 1.2, 1: 0.99},
                     {0: 1.2, 8: 500.0}])
    np.testing.assert_array_equal(np.asarray(ilq.terminated("walker2d", s)), [False, True, True, True, True, False,
                                                                              False])


def test_halfcheetah_pointmaze_and_pen_termination():
    cheetah = _states(17, [{0: -5.0, 1: 3.0}, {8: 50.0}, {8: 150.0}, {3: np.nan}])
    np.testing.assert_array_equal(np.asarray(ilq.terminated("halfcheetah", cheetah)), [False, False, True, True])
    maze = _states(6, [{0: 100.0}, {1: -1e6}, {}])
    assert not np.asarray(ilq.terminated("maze2d", maze)).any()
    pen = _states(45, [{26: 0.2}, {26: 0.07}, {26: 0.2, 32: 0.0}, {26: 0.08}])  # obs[26]: the pen's height
    np.testing.assert_array_equal(np.asarray(ilq.terminated("pen", pen)), [False, True, False, False])
    batched = jnp.stack([_states(11, [{0: 1.25}, {0: 0.5}])] * 3)  # any leading batch shape
    np.testing.assert_array_equal(np.asarray(ilq.terminated("hopper", batched)), [[False, True]] * 3)


# ------------------------------------------------------------------------------------------------------------------
# Diffusion behaviour model on a bimodal action distribution
# ------------------------------------------------------------------------------------------------------------------

def bimodal_data(n=4096):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    sign = rng.choice([-1.0, 1.0], size=(n, 1))
    act = (0.7 * sign * np.ones((n, 2))).astype(np.float32)  # per state: (0.7, 0.7) or (-0.7, -0.7)
    return ilq.Transitions(jnp.asarray(obs), jnp.asarray(act), jnp.zeros(n), jnp.asarray(obs), jnp.zeros(n))


@pytest.fixture(scope="module")
def bimodal():
    data = bimodal_data()
    beh, metrics = ilq.train_diffusion(data, k=5, hidden=64, steps=4000, lr=1e-3, seed=0)
    return data, beh, metrics


def mode_shares(beh, data):
    samples = np.asarray(ilq.diffusion_sample(beh, data.observations[:300], jax.random.PRNGKey(1), 20))
    assert samples.shape == (300, 20, 2) and np.all(np.abs(samples) <= 1.0)
    first = samples[..., 0].ravel()
    same_mode = np.mean(np.sign(samples[..., 0]) == np.sign(samples[..., 1]))
    return np.mean(np.abs(first - 0.7) < 0.2), np.mean(np.abs(first + 0.7) < 0.2), np.mean(np.abs(first) < 0.35), same_mode


def test_diffusion_reproduces_both_modes_and_stays_in_the_box(bimodal):
    data, beh, _ = bimodal
    pos, neg, between, same_mode = mode_shares(beh, data)
    assert 0.3 < pos < 0.7 and 0.3 < neg < 0.7 and pos + neg > 0.75, (pos, neg)
    assert same_mode > 0.95  # the two action dimensions stay on the same mode, as in the data
    # K = 5 (Diffusion-QL's setting) leaves some mass between the modes: its last reverse step returns the
    # posterior mean E[a | a_1], and a_1 still carries noise of std sqrt(1 - abar_1) = 0.44. Measured here ~10 %.
    assert between < 0.15, between


def test_diffusion_with_more_steps_leaves_almost_no_mass_between_the_modes():
    """The same sampler with K = 20: the in-between mass of K = 5 is discretisation, not a sampler bug."""
    data = bimodal_data()
    beh, _ = ilq.train_diffusion(data, k=20, hidden=64, steps=4000, lr=1e-3, seed=0)
    pos, neg, between, same_mode = mode_shares(beh, data)
    assert 0.3 < pos < 0.7 and 0.3 < neg < 0.7 and between < 0.02 and same_mode > 0.99, (pos, neg, between)


def test_diffusion_sample_is_pure_and_usable_inside_jit(bimodal):
    data, beh, _ = bimodal

    @jax.jit
    def q_like(obs, key):  # as inside the ILB target: static M, traced states and key
        return ilq.diffusion_sample(beh, obs, key, 7).max(1)

    out = q_like(data.observations[:16], jax.random.PRNGKey(0))
    assert out.shape == (16, 2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(q_like(data.observations[:16], jax.random.PRNGKey(0))))


# ------------------------------------------------------------------------------------------------------------------
# Artifacts
# ------------------------------------------------------------------------------------------------------------------

def tiny_setup(tmp_path, **kw):
    data = linear_gaussian(600)
    info = ilq.DatasetInfo(name="tests/linear-v0", source="test", task=None, family="hopper", eval_env="none",
                           ref_min=None, ref_max=None, obs_dim=OBS, act_dim=ACT, episode_returns=np.zeros(1),
                           fingerprint="f" * 40)
    args = ilq.Args(model_dir=str(tmp_path / "models"), dynamics_members=3, dynamics_elites=2, dynamics_hidden=16,
                    dynamics_epochs=2, diffusion_steps=200, **kw)
    return data, info, args


def test_artifacts_round_trip_bit_identical_and_the_cache_is_reused(tmp_path, monkeypatch, capsys):
    data, info, args = tiny_setup(tmp_path)
    dyn, beh = ilq.load_or_pretrain(args, data, info)
    d_path, b_path = ilq.artifact_path(args, info, "dynamics"), ilq.artifact_path(args, info, "behavior")
    dyn2, side = ilq.load_artifact(d_path, "dynamics", info)
    beh2, bside = ilq.load_artifact(b_path, "behavior", info)
    key = jax.random.PRNGKey(0)
    for a, b in zip(ilq.dynamics_step(dyn, data.observations, data.actions, key),
                    ilq.dynamics_step(dyn2, data.observations, data.actions, key)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(ilq.diffusion_sample(beh, data.observations, key, 4)),
                                  np.asarray(ilq.diffusion_sample(beh2, data.observations, key, 4)))
    # the sidecar tells what a reader needs without loading the weights
    assert side["kind"] == "dynamics" and side["config"]["members"] == 3 and side["config"]["seed"] == 0
    assert side["elites"] == np.asarray(dyn.elites).tolist() and len(side["input_mean"]) == OBS + ACT
    assert side["dataset"]["fingerprint"] == info.fingerprint and "jax" in side["versions"]
    assert len(side["metrics"]["holdout_mse"]) == 3 and side["trained"] == 2
    assert len(bside["schedule"]["betas"]) == 5 and "final_loss" in bside["metrics"]
    # a second call loads both instead of training
    capsys.readouterr()
    monkeypatch.setattr(ilq, "train_dynamics", lambda *a, **k: pytest.fail("retrained the dynamics model"))
    monkeypatch.setattr(ilq, "train_diffusion", lambda *a, **k: pytest.fail("retrained the behaviour model"))
    ilq.load_or_pretrain(args, data, info)
    assert capsys.readouterr().out.count("loaded") == 2


def test_a_cached_model_trained_for_less_than_asked_is_retrained(tmp_path, monkeypatch):
    data, info, args = tiny_setup(tmp_path)
    ilq.load_or_pretrain(args, data, info)
    calls = []
    real = ilq.train_dynamics
    monkeypatch.setattr(ilq, "train_dynamics", lambda *a, **k: calls.append(k["epochs"]) or real(*a, **k))
    longer = ilq.Args(**{**args.__dict__, "dynamics_epochs": 3})
    ilq.load_or_pretrain(longer, data, info)
    assert calls == [3]


def test_mismatched_or_damaged_artifacts_are_refused(tmp_path):
    data, info, args = tiny_setup(tmp_path)
    ilq.load_or_pretrain(args, data, info)
    d_path = ilq.artifact_path(args, info, "dynamics")
    other = ilq.DatasetInfo(**{**info.__dict__, "name": "other", "fingerprint": "0" * 40})
    with pytest.raises(ilq.ILQError, match="made for dataset 'tests/linear-v0'.*pretrain_models.py --env-id other"):
        ilq.load_artifact(d_path, "dynamics", other)
    wider = ilq.DatasetInfo(**{**info.__dict__, "obs_dim": OBS + 1})
    with pytest.raises(ilq.ILQError, match=r"obs 3, act 2"):
        ilq.load_artifact(d_path, "dynamics", wider)
    with pytest.raises(ilq.ILQError, match="holds a dynamics model, not a behavior model"):
        ilq.load_artifact(d_path, "behavior", info)
    blob = open(d_path, "rb").read()
    open(d_path, "wb").write(blob[: len(blob) // 3])
    with pytest.raises(ilq.ILQError, match="damaged"):
        ilq.load_artifact(d_path, "dynamics", info)
    with pytest.raises(ilq.ILQError, match="No behavior model at"):
        ilq.load_artifact(str(tmp_path / "nothing.msgpack"), "behavior", info)
    # given explicitly, a wrong artifact stops the run instead of being retrained silently
    with pytest.raises(ilq.ILQError, match="damaged"):
        ilq.load_or_pretrain(ilq.Args(**{**args.__dict__, "dynamics_path": d_path}), data, info)


def test_pretrain_models_cli_trains_then_reuses(tmp_path):
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"))
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_models.py"), "--random-dataset-steps", "1000",
           "--dynamics-epochs", "1", "--diffusion-steps", "50", "--dynamics-hidden", "16",
           "--model-dir", str(tmp_path / "models")]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[dynamics] epoch   1/1" in first.stdout and "[diffusion] step      50/50" in first.stdout
    saved = sorted(p for p in os.listdir(next((tmp_path / "models").iterdir())))
    assert [p.split("-")[0] + os.path.splitext(p)[1] for p in saved] == [
        "behavior.json", "behavior.msgpack", "dynamics.json", "dynamics.msgpack"]
    assert json.load(open(next((tmp_path / "models").iterdir()) / [p for p in saved if p.startswith("dyn")][0]))
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout.count("loaded") == 2 and "[dynamics] epoch" not in second.stdout
    assert any(d.startswith("pretrain__") for d in os.listdir(tmp_path / "runs"))  # TensorBoard logs
