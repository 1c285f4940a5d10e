"""Tabular theory lab: the exact Imagination-Limited Bellman (ILB) operator on finite MDPs.

Executable check of the tabular claims of the ILQ paper (Liu et al., IJCAI 2025, Sec. 4.3 and
Appendix A.1). Equation numbers are the paper's. Only numpy (and matplotlib for the figure).

Objects (S states, A actions):
    P[s, a, s']  true kernel          r[s, a]      true reward
    P_hat, r_hat the learned model (P̂, r̂) used by the imagined value (Eq. 3)
    support[s, a] True iff beta(a|s) > 0, i.e. a in Supp(beta(.|s))

Definition 1 (Eq. 2-4):
    T Q(s,a) = r(s,a) + γ E_{s'~P}  [V_Q(s')]               if a in Supp(beta(.|s))
             = min{ y_img(s,a), y_lmt(s) } + delta           otherwise
    y_img(s,a) = r_hat(s,a) + γ E_{s'~P_hat}[V_Q(s')]        (Eq. 3)
    y_lmt(s)   = max_{a' in Supp(beta(.|s))} Q(s,a')          (Eq. 4)

"max over a'~pi" (V_Q above) is read in one of two ways (project notes, Sec. 7.4):
    (a) pi=None : V_Q(s') = max_{a'} Q(s',a') over ALL actions   -- optimality form
    (b) pi=array: V_Q(s') = Q(s', pi[s']) for a fixed deterministic pi -- the reading of the proofs

All norms are the sup-norm over every (s, a) entry of Q unless a docstring says otherwise.

Findings this file checks (see tests/test_tabular_ilb.py and main()):
  * Theorem 1 says T is a γ-contraction in sup-norm. It is not: the limitation value y_lmt(s) reads Q at
    the same state with no discount, so a one-step ratio ||TQ1-TQ2|| / ||Q1-Q2|| of exactly 1 is reached
    (counterexample_mdp(); on random MDPs, adversarial_pair() reaches 1 wherever the limit branch is active).
    What holds, for both readings and any model and delta: T is a sup-norm non-expansion, T∘T is a
    γ-contraction (and T a sqrt(γ)-contraction in weighted_norm), so value iteration converges to a unique
    fixed point with ||Q_k - Q*|| <= γ^floor(k/2) ||Q_0 - Q*||. The per-iteration rate sqrt(γ) is attained by
    the counterexample and, asymptotically, on random MDPs (median over MDPs ~ sqrt(γ) for reading (a) with
    delta >= 0; the slowest MDP ~ sqrt(γ) for both readings).
  * Theorem 4 bounds ||Q_ILB - Q_beta*||_inf. Over the pairs its proof handles (in-support pairs and
    OOD pairs (s, pi(s))) the bound holds, loosely; over ALL pairs, as stated, it fails: an OOD action that
    is better than beta is capped at y_lmt(s) + delta, an error the right-hand side does not contain
    (theorem4_counterexample()). Its in-support part (Eq. 41) has no delta term, yet with delta > 0 the
    in-support error reaches γ·delta/(1-γ).

Run:  python benchmarks/tabular_ilb.py   (writes benchmarks/figures/tabular_ilb.png, prints Markdown tables)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# The MDP and the operators
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TabularMDP:
    """A finite MDP with a behaviour-support mask and a learned model (P̂, r̂).

    P, P_hat: (S, A, S) row-stochastic kernels; r, r_hat: (S, A); support: (S, A) bool with at least one True
    per state; gamma: discount.
    """

    P: np.ndarray
    r: np.ndarray
    P_hat: np.ndarray
    r_hat: np.ndarray
    support: np.ndarray
    gamma: float

    @property
    def n_states(self) -> int:
        return self.r.shape[0]

    @property
    def n_actions(self) -> int:
        return self.r.shape[1]


def next_state_value(Q: np.ndarray, pi: np.ndarray | None = None) -> np.ndarray:
    """V_Q(s') = "max_{a'~pi} Q(s', a')" of Eq. 2-3.

    pi=None: reading (a), max over all actions. pi: int array (S,): reading (b), Q(s', pi(s')).
    """
    if pi is None:
        return Q.max(axis=1)
    return Q[np.arange(Q.shape[0]), pi]


def one_step_backup(Q: np.ndarray, P: np.ndarray, r: np.ndarray, gamma: float, pi: np.ndarray | None = None) -> np.ndarray:
    """r(s,a) + gamma * E_{s'~P(.|s,a)}[V_Q(s')] for every (s, a).

    With the true (P, r) it is the in-sample branch of Eq. 2; with (P̂, r̂) it is the imagined value y_img (Eq. 3).
    """
    return r + gamma * P @ next_state_value(Q, pi)


def limitation_value(Q: np.ndarray, support: np.ndarray) -> np.ndarray:
    """y_lmt(s) = max_{a in Supp(beta(.|s))} Q(s, a)  (Eq. 4): same state s, no discount. Shape (S,)."""
    return np.where(support, Q, -np.inf).max(axis=1)


def ilb_operator(
    Q: np.ndarray, mdp: TabularMDP, delta: float = 0.0, pi: np.ndarray | None = None, limit: bool = True
) -> np.ndarray:
    """The Imagination-Limited Bellman operator T_ILB of Definition 1 (Eq. 2), applied to a table Q (S, A).

    In-support pairs get the true Bellman backup; out-of-support pairs get min{y_img, y_lmt} + delta, with delta
    added after the min. limit=False drops y_lmt (the "w/o limitation" ablation of Sec. 5.4), for comparison only.
    """
    in_sample = one_step_backup(Q, mdp.P, mdp.r, mdp.gamma, pi)
    y_img = one_step_backup(Q, mdp.P_hat, mdp.r_hat, mdp.gamma, pi)
    y_lmt = limitation_value(Q, mdp.support)[:, None] if limit else np.inf
    return np.where(mdp.support, in_sample, np.minimum(y_img, y_lmt) + delta)


def support_operator(Q: np.ndarray, mdp: TabularMDP) -> np.ndarray:
    """T_Supp of Lemma 1: r(s,a) + gamma E_{s'~P}[max_{a' in Supp(beta(.|s'))} Q(s',a')] for every (s, a).

    The plain support-constrained backup; a gamma-contraction whose fixed point is Q_beta*.
    """
    return mdp.r + mdp.gamma * mdp.P @ limitation_value(Q, mdp.support)


def value_iteration(operator, Q0: np.ndarray, tol: float = 1e-12, max_iter: int = 5000):
    """Q_{k+1} = operator(Q_k) until ||Q_{k+1} - Q_k||_inf <= tol. Returns (Q, list of all iterates)."""
    iterates = [np.asarray(Q0, dtype=float)]
    for _ in range(max_iter):
        iterates.append(operator(iterates[-1]))
        if np.max(np.abs(iterates[-1] - iterates[-2])) <= tol:
            break
    return iterates[-1], iterates


def ilb_fixed_point(
    mdp: TabularMDP, delta: float = 0.0, pi: np.ndarray | None = None, Q0: np.ndarray | None = None, limit: bool = True
) -> np.ndarray:
    """Q_ILB, the fixed point of T_ILB (Theorem 1), by value iteration from Q0 (default zeros)."""
    Q0 = np.zeros_like(mdp.r) if Q0 is None else Q0
    return value_iteration(lambda Q: ilb_operator(Q, mdp, delta, pi, limit), Q0)[0]


def q_beta_star(mdp: TabularMDP) -> np.ndarray:
    """Q_beta*, the fixed point of T_Supp (Lemma 1), on every (s, a) pair."""
    return value_iteration(lambda Q: support_operator(Q, mdp), np.zeros_like(mdp.r))[0]


def sup_norm(X: np.ndarray, where: np.ndarray | None = None) -> float:
    """max |X| over all entries, or over the entries where `where` is True."""
    return float(np.max(np.abs(X if where is None else X[where]))) if (where is None or where.any()) else 0.0


def step_ratio(operator, Q1: np.ndarray, Q2: np.ndarray, steps: int = 1) -> float:
    """||T^n Q1 - T^n Q2||_inf / ||Q1 - Q2||_inf for n = steps."""
    A, B = Q1, Q2
    for _ in range(steps):
        A, B = operator(A), operator(B)
    return sup_norm(A - B) / sup_norm(Q1 - Q2)


# ----------------------------------------------------------------------------------------------------------------
# MDP generators and the counterexamples
# ----------------------------------------------------------------------------------------------------------------


def random_kernel(rng: np.random.Generator, S: int, A: int, branching: int | None = None) -> np.ndarray:
    """A random (S, A, S) row-stochastic kernel; with `branching`, each row has that many nonzero entries."""
    P = rng.exponential(size=(S, A, S))
    if branching is not None:
        keep = np.argsort(rng.random((S, A, S)), axis=-1) < branching
        P = P * keep
    return P / P.sum(-1, keepdims=True)


def random_mdp(
    rng: np.random.Generator,
    S: int = 6,
    A: int = 4,
    n_support: int = 2,
    gamma: float = 0.9,
    model_error: float = 0.1,
    adversarial: bool = False,
) -> TabularMDP:
    """A random MDP with rewards in [0, 1], n_support behaviour actions per state and a perturbed model.

    Model: P̂ = (1-e) P + e P', r̂ = r + e U(-1, 1) with e = model_error. adversarial=True makes the limitation
    branch active: OOD actions get high true rewards and the model is optimistic on them (r̂ += 1).
    """
    P = random_kernel(rng, S, A, branching=rng.integers(1, S + 1))
    r = rng.random((S, A))
    support = np.zeros((S, A), bool)
    for s in range(S):
        support[s, rng.choice(A, n_support, replace=False)] = True
    if adversarial:
        r = np.where(support, 0.5 * r, 0.5 + 0.5 * r)
    P_hat = (1 - model_error) * P + model_error * random_kernel(rng, S, A)
    r_hat = r + model_error * rng.uniform(-1, 1, (S, A)) + 1.0 * (adversarial & ~support)
    return TabularMDP(P, r, P_hat, r_hat, support, gamma)


def counterexample_mdp(gamma: float = 0.9) -> TabularMDP:
    """The smallest MDP where one step of T_ILB is not a gamma-contraction.

    One state, two actions, self-loop. a0 is in the support (r = 0), a1 is OOD (r = 1). Exact model, delta = 0.
    With Q1 = [0, 0] and Q2 = [1, 0]: T Q1 = [0, 0], T Q2 = [gamma, 1], so the one-step ratio is 1 > gamma.
    Value iteration from Q2 (reading (a)) has errors 1, 1, gamma, gamma, gamma^2, ...: gamma^floor(k/2) is attained.
    """
    P = np.ones((1, 2, 1))
    r = np.array([[0.0, 1.0]])
    return TabularMDP(P, r, P.copy(), r.copy(), np.array([[True, False]]), gamma)


def deterministic_beta_mdp(
    rng: np.random.Generator, S: int = 6, A: int = 4, gamma: float = 0.9, model_error: float = 0.1, pi_differs: float = 0.5
):
    """The setting of the proofs of Theorems 2-4: deterministic beta (support = {beta(s)}) and deterministic pi.

    Returns (mdp, beta, pi): pi differs from beta on about a fraction `pi_differs` of the states.
    """
    mdp = random_mdp(rng, S, A, 1, gamma, model_error)
    beta = mdp.support.argmax(axis=1)
    pi = np.where(rng.random(S) < pi_differs, rng.integers(0, A, S), beta)
    return mdp, beta, pi


def theorem4_counterexample(gamma: float = 0.9) -> tuple[TabularMDP, np.ndarray, np.ndarray]:
    """Theorem 4 over all (s, a) pairs fails: exact model, delta = 0, pi = beta, so its right-hand side is 0.

    One state, self-loop, a0 = beta(s) with r = 0, a1 OOD with r = 1. Q_beta*(s, a1) = 1 but Q_ILB(s, a1) =
    min(1, 0) = 0: ||Q_ILB - Q_beta*||_inf = 1 > 0.
    """
    mdp = counterexample_mdp(gamma)
    return mdp, np.array([0]), np.array([0])


def theorem4_rhs(
    mdp: TabularMDP, beta: np.ndarray, pi: np.ndarray, delta: float, action_embedding: np.ndarray | None = None
) -> dict:
    """The right-hand side of Theorem 4 (Eq. 14) and its terms, for deterministic beta and pi.

    Assumption constants, made concrete: r_max = max|r|; actions embedded as scalars (default evenly in [-1, 1]);
    l = Lipschitz constant of r in that embedding; eps_pi = max_s |x_pi(s) - x_beta(s)|; eps_P = max entry of
    |P^pi - P^beta| (the |S| factor in the theorem sums over s'); zeta_r/sqrt(D) = max|r_hat - r|;
    zeta_P/sqrt(D) = max_{s,a} ||P_hat(.|s,a) - P(.|s,a)||_1.
    """
    S, A, g = mdp.n_states, mdp.n_actions, mdp.gamma
    x = np.linspace(-1, 1, A) if action_embedding is None else action_embedding
    dx = np.abs(x[:, None] - x[None, :])
    dr = np.abs(mdp.r[:, :, None] - mdp.r[:, None, :])
    ell = float(np.max(np.where(dx > 0, dr / np.where(dx > 0, dx, 1), 0)))
    idx = np.arange(S)
    eps_pi = float(np.max(np.abs(x[pi] - x[beta])))
    eps_P = float(np.max(np.abs(mdp.P[idx, pi] - mdp.P[idx, beta])))
    zr = float(np.max(np.abs(mdp.r_hat - mdp.r)))
    zP = float(np.max(np.abs(mdp.P_hat - mdp.P).sum(-1)))
    r_max = float(np.max(np.abs(mdp.r)))
    terms = dict(
        reward_model=zr / (1 - g),
        policy_shift=ell * eps_pi / (1 - g),
        transition_shift=g * S * r_max * eps_P / (1 - g) ** 2,
        kernel_model=g * r_max * zP / (1 - g) ** 2,
        delta=abs(delta) / (1 - g),
    )
    return dict(terms, total=sum(terms.values()), ell=ell, eps_pi=eps_pi, eps_P=eps_P, r_max=r_max)


# ----------------------------------------------------------------------------------------------------------------
# Experiments behind the figure and the tables
# ----------------------------------------------------------------------------------------------------------------


def adversarial_pair(mdp: TabularMDP, delta: float = 0.0, pi: np.ndarray | None = None, eps: float = 2.0**-6):
    """(Q1, Q2) with a one-step ILB ratio of 1: Q1 = Q_ILB, Q2 = Q1 + eps on every in-support entry.

    y_lmt rises by eps (no discount); wherever the limit branch is active with margin >= eps, T Q rises by eps too.
    """
    Q1 = ilb_fixed_point(mdp, delta, pi)
    return Q1, Q1 + eps * mdp.support


def weighted_norm(X: np.ndarray, mdp: TabularMDP) -> float:
    """max(||X_in||_inf, sqrt(gamma) ||X_ood||_inf): a norm in which T_ILB is a sqrt(gamma)-contraction."""
    return max(sup_norm(X, mdp.support), np.sqrt(mdp.gamma) * sup_norm(X, ~mdp.support))


def ratio_study(rng: np.random.Generator, n_mdps: int = 100, pairs_per_mdp: int = 5) -> dict:
    """One- and two-step sup-norm ratios of T_ILB (both readings, delta in {-0.5, 0, 0.5}) and of T_Supp.

    Random pairs (Q1 ~ N(0, 5^2), Q2 = Q1 + noise on half the entries) and one adversarial_pair per (MDP, reading).
    Half the MDPs are adversarial (limit branch active). "weighted" is the one-step ratio in weighted_norm.
    """
    out = {k: [] for k in ("ilb1", "ilb2", "ilb1_adv", "ilb2_adv", "supp1", "weighted")}
    for i in range(n_mdps):
        mdp = random_mdp(rng, 8, 4, 2, adversarial=i % 2 == 1)
        for pi in (None, rng.integers(0, mdp.n_actions, mdp.n_states)):
            delta = float(rng.choice([-0.5, 0.0, 0.5]))
            T = lambda Q: ilb_operator(Q, mdp, delta, pi)
            for _ in range(pairs_per_mdp):
                Q1 = rng.normal(0, 5, mdp.r.shape)
                Q2 = Q1 + rng.normal(0, 1, Q1.shape) * (rng.random(Q1.shape) < 0.5)
                out["ilb1"].append(step_ratio(T, Q1, Q2))
                out["ilb2"].append(step_ratio(T, Q1, Q2, 2))
                out["supp1"].append(step_ratio(lambda Q: support_operator(Q, mdp), Q1, Q2))
                out["weighted"].append(weighted_norm(T(Q1) - T(Q2), mdp) / weighted_norm(Q1 - Q2, mdp))
            Q1, Q2 = adversarial_pair(mdp, delta, pi)
            out["ilb1_adv"].append(step_ratio(T, Q1, Q2))
            out["ilb2_adv"].append(step_ratio(T, Q1, Q2, 2))
    return {k: np.array(v) for k, v in out.items()}


def convergence_curves(rng: np.random.Generator, n_mdps: int = 40, n_iter: int = 150, delta: float = 0.0) -> dict:
    """Value iteration from Q0 ~ N(0, 50^2) on random MDPs (S=8, A=4, 2 support actions, half adversarial).

    For ILB reading (a), ILB reading (b) (random pi) and T_Supp: ||Q_k - Q_fix|| / ||Q_0 - Q_fix|| with Q_fix the
    operator's own fixed point, and the asymptotic rate per iteration (e_120 / e_60)^(1/60).
    "*_to_qb": ||Q_k - Q_beta*|| (not normalised).
    """
    curves = {k: [] for k in ("ilb_a", "ilb_b", "supp", "ilb_a_to_qb", "supp_to_qb")}
    for i in range(n_mdps):
        mdp = random_mdp(rng, 8, 4, 2, adversarial=i % 2 == 1)
        pi = rng.integers(0, mdp.n_actions, mdp.n_states)
        Q0 = rng.normal(0, 50, mdp.r.shape)
        Qb = q_beta_star(mdp)
        for key, T, Qf in (
            ("ilb_a", lambda Q: ilb_operator(Q, mdp, delta), ilb_fixed_point(mdp, delta)),
            ("ilb_b", lambda Q: ilb_operator(Q, mdp, delta, pi), ilb_fixed_point(mdp, delta, pi)),
            ("supp", lambda Q: support_operator(Q, mdp), Qb),
        ):
            its = value_iteration(T, Q0, tol=-1.0, max_iter=n_iter)[1]
            curves[key].append([sup_norm(Q - Qf) / sup_norm(Q0 - Qf) for Q in its])
            if key != "ilb_b":
                curves[key + "_to_qb"].append([sup_norm(Q - Qb) for Q in its])
    out = {k: np.array(v) for k, v in curves.items()}
    for key in ("ilb_a", "ilb_b", "supp"):
        out[key + "_rate"] = (out[key][:, 120] / out[key][:, 60]) ** (1 / 60)
    return out


def fixed_point_errors(mdp: TabularMDP, beta: np.ndarray, pi: np.ndarray, delta: float) -> dict:
    """Fixed-point errors for one MDP in the setting of Theorem 4 (deterministic beta and pi).

    model_and_delta_*: ||Q_ILB - Q_ILB(exact model, delta=0)||, the part of the error caused by (P̂, r̂) and delta.
    thm4_lhs_*: ||Q_ILB - Q_beta*|| over the pairs Theorem 4's proof covers (in-support and (s, pi(s))).
    all_pairs_*: ||Q_ILB - Q_beta*|| over every (s, a).  rhs_*: Theorem 4's right-hand side.
    Reading (a) uses pi := greedy(Q_ILB), with which Q_ILB is also the reading-(b) fixed point.
    no_limit_*: the model_and_delta error of the "w/o limitation" ablation (y_img only), reading (b).
    """
    exact = replace(mdp, P_hat=mdp.P, r_hat=mdp.r)
    Qb = q_beta_star(mdp)
    res = {}
    for name, p in (("a", None), ("b", pi)):
        Q = ilb_fixed_point(mdp, delta, p)
        p_eff = Q.argmax(axis=1) if p is None else p
        covered = mdp.support.copy()
        covered[np.arange(mdp.n_states), p_eff] = True
        res["model_and_delta_" + name] = sup_norm(Q - ilb_fixed_point(exact, 0.0, p))
        res["thm4_lhs_" + name] = sup_norm(Q - Qb, covered)
        res["all_pairs_" + name] = sup_norm(Q - Qb)
        res["rhs_" + name] = theorem4_rhs(mdp, beta, p_eff, delta)["total"]
    Qn = ilb_fixed_point(mdp, delta, pi, limit=False)
    res["no_limit_b"] = sup_norm(Qn - ilb_fixed_point(exact, 0.0, pi, limit=False))
    res["model_err_P"] = float(np.max(np.abs(mdp.P_hat - mdp.P).sum(-1)))
    res["model_err_r"] = float(np.max(np.abs(mdp.r_hat - mdp.r)))
    return res


def sweep(seed: int, n_mdps: int, grid: list[tuple[float, float]]) -> list[dict]:
    """Mean fixed_point_errors over n_mdps MDPs (S=8, A=4, one support action) at each (model_error, delta).

    MDP i is drawn from the same seed at every grid point, so along a sweep only (P̂, r̂) or delta changes.
    """
    rows = []
    for e, d in grid:
        per = [
            fixed_point_errors(*deterministic_beta_mdp(np.random.default_rng([seed, i]), 8, 4, model_error=e), d)
            for i in range(n_mdps)
        ]
        row = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
        for name in ("a", "b"):
            row["holds_" + name] = sum(p["thm4_lhs_" + name] <= p["rhs_" + name] + 1e-9 for p in per)
            row["all_holds_" + name] = sum(p["all_pairs_" + name] <= p["rhs_" + name] + 1e-9 for p in per)
        rows.append(dict(row, model_error=e, delta=d, n=n_mdps))
    return rows


def counterexample_report(gamma: float = 0.9) -> dict:
    """The numbers of counterexample_mdp(): T Q1, T Q2, one- and two-step ratios, the value-iteration staircase."""
    mdp = counterexample_mdp(gamma)
    Q1, Q2 = np.zeros((1, 2)), np.array([[1.0, 0.0]])
    rep = {}
    for name, pi in (("a", None), ("b", np.array([0])), ("supp", "supp")):
        T = (lambda Q: support_operator(Q, mdp)) if name == "supp" else (lambda Q: ilb_operator(Q, mdp, 0.0, pi))
        rep["TQ1_" + name], rep["TQ2_" + name] = T(Q1)[0].tolist(), T(Q2)[0].tolist()
        rep["ratio1_" + name], rep["ratio2_" + name] = step_ratio(T, Q1, Q2), step_ratio(T, Q1, Q2, 2)
        Qf, its = value_iteration(T, Q2)
        rep["staircase_" + name] = [sup_norm(Q - Qf) for Q in its]
    return rep


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; floats with 3 decimals."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def plot(path: str, ratios: dict, curves: dict, rep: dict, model_rows: list[dict], delta_rows: list[dict], gamma: float):
    """The six-panel figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11})
    fig, ax = plt.subplots(2, 3, figsize=(17, 10))
    box = dict(boxstyle="round", fc="white", ec="0.7")
    k = np.arange(curves["ilb_a"].shape[1])

    a = ax[0, 0]
    for key, label, c in (
        ("ilb_a", "ILB (a): max over all a'", "C0"),
        ("ilb_b", "ILB (b): fixed π", "C1"),
        ("supp", "T_Supp (Lemma 1)", "C2"),
    ):
        a.semilogy(k, np.median(curves[key], 0), c=c, label=f"{label}, median")
        a.semilogy(k, curves[key].max(0), c=c, ls=":", lw=1.2)
    a.semilogy(k, gamma**k, "k--", lw=1, label="γ^k (Theorem 1's rate)")
    a.semilogy(k, gamma ** np.floor(k / 2), "k-.", lw=1, label="γ^⌊k/2⌋ (guaranteed by T∘T)")
    a.set(
        ylim=(1e-7, 2),
        xlabel="iteration k",
        ylabel="‖Q_k − Q_fix‖∞ / ‖Q_0 − Q_fix‖∞",
        title="(a) value iteration: distance to the operator's own fixed point\n"
        f"{len(curves['ilb_a'])} random MDPs (S=8, A=4, 2 support actions), δ=0; dotted = slowest MDP",
    )
    a.legend(fontsize=8.5, loc="upper right")

    a = ax[0, 1]
    n = 30
    a.semilogy(np.arange(n), rep["staircase_a"][:n], "o-", c="C0", label="ILB (a)")
    a.semilogy(np.arange(n), rep["staircase_b"][:n], "^-", c="C1", ms=4, label="ILB (b), π(s)=a0")
    a.semilogy(np.arange(n), rep["staircase_supp"][:n], "s-", c="C2", ms=3, label="T_Supp")
    a.semilogy(np.arange(n), gamma ** np.arange(n), "k--", lw=1, label="γ^k")
    a.set(
        xlabel="iteration k (from Q_0 = Q2)",
        ylabel="‖Q_k − Q_fix‖∞",
        title="(b) counterexample to Theorem 1's one-step γ-contraction",
    )
    a.text(
        0.03,
        0.04,
        "1 state, self-loop; a0 in support (r=0), a1 OOD (r=1);\nexact model, δ=0, γ=%g\n"
        "Q1=[0,0] → TQ1=[0,0];  Q2=[1,0] → TQ2=[%g,1]\none-step ratio ‖TQ1−TQ2‖/‖Q1−Q2‖ = %.3f,"
        "  two-step %.3f" % (gamma, gamma, rep["ratio1_a"], rep["ratio2_a"]),
        transform=a.transAxes,
        fontsize=8.5,
        bbox=box,
    )
    a.legend(fontsize=8.5, loc="upper right")

    a = ax[0, 2]
    bins = np.linspace(0, 1.05, 43)
    a.hist(ratios["supp1"], bins, alpha=0.5, color="C2", label="T_Supp, one step")
    a.hist(ratios["ilb1"], bins, alpha=0.5, color="C0", label="ILB, one step")
    a.hist(ratios["ilb2"], bins, histtype="step", lw=2, color="C3", label="ILB, two steps (T²)")
    a.hist(ratios["ilb1_adv"], bins, color="k", label="ILB, one step, adversarial pairs")
    a.axvline(gamma, c="k", ls="--", lw=1)
    a.set(
        xlabel="sup-norm ratio ‖TQ1 − TQ2‖∞ / ‖Q1 − Q2‖∞",
        ylabel="count (log)",
        yscale="log",
        title="(c) step ratios on random MDPs and pairs",
    )
    a.text(gamma - 0.01, 0.97, "γ", transform=a.get_xaxis_transform(), ha="right", va="top")
    a.set_ylim(0.8, 30 * a.get_ylim()[1])
    a.text(
        0.02,
        0.74,
        "max one step: %.3f (random), %.3f (adversarial)\nmax two steps: %.3f\n"
        "one step > γ: %.0f%% of random pairs"
        % (
            ratios["ilb1"].max(),
            ratios["ilb1_adv"].max(),
            max(ratios["ilb2"].max(), ratios["ilb2_adv"].max()),
            100 * np.mean(ratios["ilb1"] > gamma + 1e-12),
        ),
        transform=a.transAxes,
        fontsize=8.5,
        va="top",
        bbox=box,
    )
    a.legend(fontsize=8.5, loc="upper left")

    a = ax[1, 0]
    for key, label, c in (("ilb_a_to_qb", "ILB (a)", "C0"), ("supp_to_qb", "T_Supp", "C2")):
        a.semilogy(k, np.median(curves[key], 0), c=c, label=label + ", median")
        a.fill_between(k, np.percentile(curves[key], 10, 0), np.percentile(curves[key], 90, 0), color=c, alpha=0.2)
    a.set(
        ylim=(1e-6, None),
        xlabel="iteration k",
        ylabel="‖Q_k − Q_β*‖∞",
        title="(d) value iteration: distance to Q_β* (fixed point of T_Supp)\nsame MDPs as (a), "
        "model error e=0.1, band = 10–90 %: ILB stops at its bias",
    )
    a.legend(fontsize=8.5, loc="upper right")

    for a, rows, xkey, xlabel, title in (
        (
            ax[1, 1],
            model_rows,
            "model_error",
            "model error e:  P̂ = (1−e)P + eP′,  r̂ = r + e·U(−1,1)",
            "(e) fixed-point error vs model error (δ = 0)",
        ),
        (ax[1, 2], delta_rows, "delta", "δ", "(f) fixed-point error vs δ (model error e = 0.1)"),
    ):
        x = [r[xkey] for r in rows]
        a.plot(x, [r["model_and_delta_b"] for r in rows], "o-", c="C1", label="‖Q_ILB − Q_ILB(exact, δ=0)‖∞, (b)")
        a.plot(x, [r["model_and_delta_a"] for r in rows], "o--", c="C0", label="same, (a)")
        a.plot(x, [r["no_limit_b"] for r in rows], "x:", c="C4", label="same, w/o limitation, (b)")
        a.plot(x, [r["thm4_lhs_b"] for r in rows], "s-", c="C3", label="‖Q_ILB − Q_β*‖∞ (Thm 4's pairs), (b)")
        rhs = [r["rhs_b"] for r in rows]
        top = max(max(r[key] for r in rows) for key in ("model_and_delta_a", "model_and_delta_b", "no_limit_b", "thm4_lhs_b"))
        a.set(
            xlabel=xlabel,
            ylabel=f"mean over {rows[0]['n']} MDPs",
            ylim=(0, 1.45 * top),
            title=f"{title}\nS=8, A=4, deterministic β (1 support action), π≠β on ~½ of states\n"
            f"Theorem 4's right-hand side (b): {min(rhs):.0f}–{max(rhs):.0f}, far off the chart",
        )
        a.legend(fontsize=8.5, loc="upper left" if xkey == "model_error" else "upper center")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    """Run the checks, write the figure, print the Markdown tables."""
    p = argparse.ArgumentParser(description="Tabular checks of the ILB operator (ILQ, Sec. 4.3 / App. A.1).")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "tabular_ilb.png"),
        help="output PNG path",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-mdps", type=int, default=30, help="random MDPs per point of the error sweeps")
    args = p.parse_args(argv)
    gamma = 0.9
    rng = np.random.default_rng(args.seed)

    rep = counterexample_report(gamma)
    ratios = ratio_study(rng)
    curves = {d: convergence_curves(rng, delta=d) for d in (-0.5, 0.0, 0.5)}
    model_rows = sweep(args.seed, args.n_mdps, [(e, 0.0) for e in (0.0, 0.05, 0.1, 0.2, 0.3, 0.4)])
    delta_rows = sweep(args.seed, args.n_mdps, [(0.1, d) for d in (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)])
    plot(args.out, ratios, curves[0.0], rep, model_rows, delta_rows, gamma)

    print(f"## Tabular ILB checks (gamma = {gamma}, seed = {args.seed}; all norms: sup-norm over (s, a))\n")
    print(
        "**Counterexample to Theorem 1's one-step gamma-contraction.** One state with a self-loop; a0 in "
        "Supp(beta) with r = 0, a1 out of support with r = 1; exact model (P̂ = P, r̂ = r), delta = 0. "
        "Q1 = [0, 0], Q2 = [1, 0].\n"
    )
    print(
        markdown_table(
            ["operator", "T Q1", "T Q2", "one-step ratio", "two-step ratio", "‖Q_k − Q_fix‖, k = 0..6, from Q2"],
            [
                [
                    name,
                    rep["TQ1_" + key],
                    rep["TQ2_" + key],
                    rep["ratio1_" + key],
                    rep["ratio2_" + key],
                    ", ".join(f"{v:.3g}" for v in rep["staircase_" + key][:7]),
                ]
                for name, key in (("ILB (a) max over all a'", "a"), ("ILB (b) π(s) = a0", "b"), ("T_Supp", "supp"))
            ],
        )
    )
    n_pairs = len(ratios["ilb1"])
    share = lambda x: f"{np.mean(x > gamma + 1e-12):.1%}"
    print(
        f"\n**Step ratios** on {len(ratios['ilb1_adv']) // 2} random MDPs (S=8, A=4, 2 support actions, half "
        "adversarial), both readings, delta in {-0.5, 0, 0.5}.\n"
    )
    ilb2 = np.r_[ratios["ilb2"], ratios["ilb2_adv"]]
    print(
        markdown_table(
            ["ratio", "pairs", "max", "share > gamma"],
            [
                ["ILB one step, random pairs", n_pairs, ratios["ilb1"].max(), share(ratios["ilb1"])],
                [
                    "ILB one step, adversarial pairs",
                    len(ratios["ilb1_adv"]),
                    ratios["ilb1_adv"].max(),
                    share(ratios["ilb1_adv"]),
                ],
                ["ILB two steps, all pairs", len(ilb2), ilb2.max(), share(ilb2)],
                [
                    f"ILB one step, weighted norm (bound sqrt(gamma) = {np.sqrt(gamma):.3f})",
                    n_pairs,
                    ratios["weighted"].max(),
                    "–",
                ],
                ["T_Supp one step", n_pairs, ratios["supp1"].max(), share(ratios["supp1"])],
            ],
        )
    )
    print(
        f"\n**Asymptotic convergence rate** of value iteration per iteration, (e_120 / e_60)^(1/60), "
        f"{len(curves[0.0]['ilb_a'])} random MDPs per delta (gamma = {gamma}, sqrt(gamma) = {np.sqrt(gamma):.4f}).\n"
    )
    print(
        markdown_table(
            ["delta", "ILB (a) median", "ILB (a) max", "ILB (b) median", "ILB (b) max", "T_Supp max"],
            [
                [
                    d,
                    *(f"{f(c[key + '_rate']):.4f}" for key in ("ilb_a", "ilb_b") for f in (np.median, np.max)),
                    f"{c['supp_rate'].max():.4f}",
                ]
                for d, c in curves.items()
            ],
        )
    )
    print(
        f"\n**Fixed-point error** (mean over {args.n_mdps} MDPs; S=8, A=4, deterministic beta, pi != beta on "
        "~half the states). Q_exact: ILB fixed point with P̂ = P, r̂ = r, delta = 0. Thm 4 LHS: ‖Q_ILB − Q_β*‖ "
        "over in-support pairs and (s, pi(s)); 'all pairs': over every (s, a).\n"
    )
    hdr = [
        "e",
        "delta",
        "max‖P̂−P‖₁",
        "max abs(r̂−r)",
        "‖Q−Q_exact‖ (a)",
        "‖Q−Q_exact‖ (b)",
        "w/o limit (b)",
        "Thm 4 LHS (b)",
        "all pairs (b)",
        "Thm 4 RHS (b)",
        "RHS ≥ LHS (a), (b)",
        "RHS ≥ all pairs (b)",
    ]
    print(
        markdown_table(
            hdr,
            [
                [
                    r["model_error"],
                    r["delta"],
                    r["model_err_P"],
                    r["model_err_r"],
                    r["model_and_delta_a"],
                    r["model_and_delta_b"],
                    r["no_limit_b"],
                    r["thm4_lhs_b"],
                    r["all_pairs_b"],
                    r["rhs_b"],
                    f"{r['holds_a']}/{r['n']}, {r['holds_b']}/{r['n']}",
                    f"{r['all_holds_b']}/{r['n']}",
                ]
                for r in model_rows + delta_rows
            ],
        )
    )
    mdp, beta, pi = theorem4_counterexample(gamma)
    Q, Qb = ilb_fixed_point(mdp, 0.0, pi), q_beta_star(mdp)
    print(
        f"\n**Theorem 4 over all pairs** fails on the counterexample MDP with pi = beta = a0: RHS = "
        f"{theorem4_rhs(mdp, beta, pi, 0.0)['total']:.3f}, but Q_ILB = {Q[0].tolist()}, Q_β* = {Qb[0].tolist()}, "
        f"‖Q_ILB − Q_β*‖∞ = {sup_norm(Q - Qb):.3f}."
    )
    print(f"\nfigure written to {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
