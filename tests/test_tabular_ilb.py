"""Tabular checks of the Imagination-Limited Bellman operator (Definition 1, Eq. 2-4; Theorems 1 and 4).

All norms are sup-norms over every (s, a) entry. "(a)" is the optimality reading of "max over a'~pi" (max over
all actions), "(b)" the fixed deterministic pi of the proofs. Every MDP comes from a seeded generator; half are
adversarial (the limitation branch min{y_img, y_lmt} = y_lmt is active), and the tests assert that it is.
"""

import numpy as np
import pytest

from benchmarks.tabular_ilb import (
    TabularMDP,
    adversarial_pair,
    counterexample_mdp,
    deterministic_beta_mdp,
    ilb_fixed_point,
    ilb_operator,
    limitation_value,
    one_step_backup,
    q_beta_star,
    random_mdp,
    replace,
    step_ratio,
    sup_norm,
    support_operator,
    theorem4_counterexample,
    theorem4_rhs,
    value_iteration,
    weighted_norm,
)

GAMMA = 0.9


def cases(n, seed):
    """n random (mdp, pi, delta) cases: sizes, support sizes, model errors and delta vary; readings alternate."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        S, A = int(rng.integers(2, 9)), int(rng.integers(2, 6))
        mdp = random_mdp(rng, S, A, int(rng.integers(1, A)), GAMMA, float(rng.choice([0.0, 0.1, 0.4])), adversarial=i % 2 == 1)
        pi = None if i % 4 < 2 else rng.integers(0, A, S)
        yield mdp, pi, float(rng.choice([-0.5, 0.0, 0.3])), rng


def pairs(mdp, pi, delta, rng, n=4):
    """Random pairs, pairs that differ only on in-support entries, and the fixed-point adversarial pair."""
    for _ in range(n):
        Q1 = rng.normal(0, 5, mdp.r.shape)
        yield Q1, Q1 + rng.normal(0, 1, Q1.shape) * (rng.random(Q1.shape) < 0.5)
        yield Q1, Q1 + rng.normal(0, 1, Q1.shape) * mdp.support
    yield adversarial_pair(mdp, delta, pi)


def limit_active(mdp, Q, pi):
    """OOD entries where y_lmt < y_img at Q (the limitation branch is the strict minimum)."""
    y_img = one_step_backup(Q, mdp.P_hat, mdp.r_hat, mdp.gamma, pi)
    return ~mdp.support & (limitation_value(Q, mdp.support)[:, None] < y_img - 1e-9)


def test_non_expansion_and_ratio_one_is_reached():
    """||TQ1 - TQ2|| <= ||Q1 - Q2|| always, and wherever the limit is active the bound 1 is attained."""
    worst, n_tight, n_active = 0.0, 0, 0
    for mdp, pi, delta, rng in cases(60, seed=1):
        T = lambda Q: ilb_operator(Q, mdp, delta, pi)
        for Q1, Q2 in pairs(mdp, pi, delta, rng):
            worst = max(worst, step_ratio(T, Q1, Q2))
        if limit_active(mdp, ilb_fixed_point(mdp, delta, pi), pi).any():
            n_active += 1
            n_tight += step_ratio(T, *adversarial_pair(mdp, delta, pi)) == pytest.approx(1.0, abs=1e-9)
    assert worst <= 1 + 1e-12
    assert n_active >= 25 and n_tight == n_active  # one step of T_ILB is NOT a gamma-contraction on these MDPs


def test_two_step_gamma_contraction():
    """||T^2 Q1 - T^2 Q2|| <= gamma ||Q1 - Q2||, and T is a sqrt(gamma)-contraction in the weighted norm."""
    worst2, worst_w, worst1 = 0.0, 0.0, 0.0
    for mdp, pi, delta, rng in cases(60, seed=2):
        T = lambda Q: ilb_operator(Q, mdp, delta, pi)
        for Q1, Q2 in pairs(mdp, pi, delta, rng):
            worst1 = max(worst1, step_ratio(T, Q1, Q2))
            worst2 = max(worst2, step_ratio(T, Q1, Q2, steps=2))
            worst_w = max(worst_w, weighted_norm(T(Q1) - T(Q2), mdp) / weighted_norm(Q1 - Q2, mdp))
    assert worst2 <= GAMMA + 1e-9
    assert worst_w <= np.sqrt(GAMMA) + 1e-9
    assert worst1 > GAMMA + 0.05  # the pairs include ones where a single step is not a gamma-contraction


def test_counterexample_one_step_ratio_exceeds_gamma():
    """Theorem 1's one-step gamma-contraction fails: 1 state, a0 in support (r=0), a1 OOD (r=1), exact model."""
    mdp = counterexample_mdp(GAMMA)
    Q1, Q2 = np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]])
    for pi, TQ2 in ((None, [[GAMMA, 1.0]]), (np.array([0]), [[GAMMA, 1.0]]), (np.array([1]), [[0.0, 1.0]])):
        T = lambda Q: ilb_operator(Q, mdp, 0.0, pi)
        np.testing.assert_allclose(T(Q1), [[0.0, 0.0]])
        np.testing.assert_allclose(T(Q2), TQ2)
        assert step_ratio(T, Q1, Q2) == pytest.approx(1.0, abs=1e-15) and step_ratio(T, Q1, Q2) > GAMMA
        assert step_ratio(T, Q1, Q2, steps=2) <= GAMMA + 1e-12
    assert step_ratio(lambda Q: support_operator(Q, mdp), Q1, Q2) <= GAMMA + 1e-12  # Lemma 1 does hold
    # reading (a): value iteration from Q2 loses a factor gamma only every second step, the worst case T∘T allows
    Qf, its = value_iteration(lambda Q: ilb_operator(Q, mdp), Q2)
    errors = [sup_norm(Q - Qf) for Q in its[:21]]
    np.testing.assert_allclose(errors, GAMMA ** (np.arange(21) // 2), rtol=1e-9)


@pytest.mark.parametrize("seed", [3, 4])
def test_unique_fixed_point_from_several_starts(seed):
    """Value iteration from zeros, N(0, 50^2) and +-100 reaches the same table, and it is a fixed point."""
    for mdp, pi, delta, rng in cases(12, seed):
        T = lambda Q: ilb_operator(Q, mdp, delta, pi)
        starts = [
            np.zeros_like(mdp.r),
            rng.normal(0, 50, mdp.r.shape),
            np.full(mdp.r.shape, 100.0),
            np.full(mdp.r.shape, -100.0),
        ]
        fixed = [value_iteration(T, Q0)[0] for Q0 in starts]
        for Q in fixed:
            assert sup_norm(T(Q) - Q) <= 1e-11
            assert sup_norm(Q - fixed[0]) <= 1e-9


def test_fixed_point_ood_values_capped():
    """At Q_ILB every OOD value <= max in-support value of its state + delta, with equality where the limit binds."""
    n_active = n_ood = 0
    for mdp, pi, delta, _rng in cases(60, seed=5):
        Q = ilb_fixed_point(mdp, delta, pi)
        cap = limitation_value(Q, mdp.support)[:, None] + delta
        ood = ~mdp.support
        assert np.all(Q[ood] <= np.broadcast_to(cap, Q.shape)[ood] + 1e-9)
        active = limit_active(mdp, Q, pi)
        np.testing.assert_allclose(Q[active], np.broadcast_to(cap, Q.shape)[active], atol=1e-9)
        n_active, n_ood = n_active + active.sum(), n_ood + ood.sum()
    assert n_active >= 0.25 * n_ood  # the limitation branch is exercised, not only the imagination branch


def test_exact_model_zero_delta_ood_is_min_of_true_backup_and_limit():
    """P̂ = P, r̂ = r, delta = 0: Q_ILB(s, a_ood) = min(r + gamma E_P V(s'), max_{in} Q_ILB(s, .)), both readings."""
    branches = np.zeros(2, int)
    for mdp, pi, _, _rng in cases(40, seed=6):
        mdp = replace(mdp, P_hat=mdp.P, r_hat=mdp.r)
        Q = ilb_fixed_point(mdp, 0.0, pi)
        backup = one_step_backup(Q, mdp.P, mdp.r, mdp.gamma, pi)
        lmt = limitation_value(Q, mdp.support)[:, None]
        ood = ~mdp.support
        np.testing.assert_allclose(Q[ood], np.minimum(backup, lmt)[ood], atol=1e-9)
        branches += [(backup < lmt - 1e-6)[ood].sum(), (backup > lmt + 1e-6)[ood].sum()]
    assert branches.min() >= 20  # both sides of the min occur


def test_reading_a_closed_form_for_nonpositive_delta():
    """Reading (a), delta <= 0, any model: Q_ILB = Q_beta* on in-support pairs (model error never reaches them)
    and Q_ILB(s, a_ood) = min(r̂ + gamma E_P̂ V_beta*, V_beta*(s)) + delta, with V_beta* = max_{in} Q_beta*."""
    for mdp, _, delta, _rng in cases(40, seed=7):
        delta = -abs(delta)
        Q, Qb = ilb_fixed_point(mdp, delta), q_beta_star(mdp)
        Vb = limitation_value(Qb, mdp.support)
        np.testing.assert_allclose(Q[mdp.support], Qb[mdp.support], atol=1e-9)
        ood_formula = np.minimum(mdp.r_hat + mdp.gamma * mdp.P_hat @ Vb, Vb[:, None]) + delta
        np.testing.assert_allclose(Q[~mdp.support], ood_formula[~mdp.support], atol=1e-9)


def test_theorem4_bound_smoke():
    """Theorem 4 (Eq. 14) on the pairs its proof covers: in-support pairs and (s, pi(s)). Deterministic beta and pi;
    reading (a) with pi = greedy(Q_ILB), under which Q_ILB is also the reading-(b) fixed point. Loose by ~100x."""
    worst = 0.0
    for i in range(40):
        rng = np.random.default_rng([8, i])
        mdp, beta, pi = deterministic_beta_mdp(
            rng,
            int(rng.integers(2, 8)),
            int(rng.integers(2, 5)),
            GAMMA,
            float(rng.choice([0.0, 0.1, 0.4])),
            float(rng.choice([0.0, 0.5, 1.0])),
        )
        if i % 2:
            mdp = replace(mdp, r_hat=mdp.r_hat + ~mdp.support)  # optimistic model on OOD actions
        delta = float(rng.choice([-1.0, 0.0, 0.5]))
        Qb = q_beta_star(mdp)
        for p in (pi, None):
            Q = ilb_fixed_point(mdp, delta, p)
            p = Q.argmax(axis=1) if p is None else p
            covered = mdp.support.copy()
            covered[np.arange(mdp.n_states), p] = True
            lhs, rhs = sup_norm(Q - Qb, covered), theorem4_rhs(mdp, beta, p, delta)["total"]
            assert lhs <= rhs + 1e-9
            worst = max(worst, lhs / rhs if rhs > 0 else 0.0)
    assert worst > 0.005  # the check is not vacuous: some left-hand sides are far from zero


def test_theorem4_fails_over_all_pairs():
    """As stated (sup over every (s, a)), Theorem 4 is false: with pi = beta, an exact model and delta = 0 its
    right-hand side is 0, but an OOD action better than beta is capped at y_lmt: Q_ILB(s, a1) = 0, Q_beta*(s, a1) = 1."""
    mdp, beta, pi = theorem4_counterexample(GAMMA)
    assert theorem4_rhs(mdp, beta, pi, 0.0)["total"] == 0.0
    Q, Qb = ilb_fixed_point(mdp, 0.0, pi), q_beta_star(mdp)
    np.testing.assert_allclose(Q, [[0.0, 0.0]], atol=1e-9)
    np.testing.assert_allclose(Qb, [[0.0, 1.0]], atol=1e-9)
    assert sup_norm(Q - Qb) == pytest.approx(1.0, abs=1e-9)


def test_theorem4_delta_term_is_tight_but_eq41_omits_delta():
    """1 state, self-loop, r = 0 for both actions, a0 = beta(s) in support, pi(s) = a1 OOD, exact model, delta > 0.
    Q_ILB = [g d/(1-g), d/(1-g)], Q_beta* = 0: the full bound |d|/(1-g) of Theorem 4 is met with equality, but the
    in-support part (Eq. 41), gamma l eps_pi/(1-g) + ..., is 0 here (l = 0, eps_P = 0) while the error is g d/(1-g)."""
    P, r, d = np.ones((1, 2, 1)), np.zeros((1, 2)), 0.5
    mdp = TabularMDP(P, r, P.copy(), r.copy(), np.array([[True, False]]), GAMMA)
    for pi in (None, np.array([1])):  # reading (a) picks a1 greedily, so both readings give the same fixed point
        Q = ilb_fixed_point(mdp, d, pi)
        np.testing.assert_allclose(Q, [[GAMMA * d / (1 - GAMMA), d / (1 - GAMMA)]], atol=1e-9)
    rhs = theorem4_rhs(mdp, np.array([0]), np.array([1]), d)
    assert rhs["ell"] == 0.0 and rhs["eps_P"] == 0.0  # so Eq. 41's right-hand side is 0
    assert sup_norm(Q - q_beta_star(mdp)) == pytest.approx(rhs["total"], abs=1e-9)
