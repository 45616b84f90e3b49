"""Property tests of the SPEC §2 invariants, for every side and mode, on random shapes and dtypes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safeft.spf import projection as P

SIDES, MODES = P.SIDES, P.MODES
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def basis(m: int, n: int, r: int, gen: torch.Generator):
    """Random orthonormal U (m, r), V (n, r) and positive descending S (r,)."""
    U = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=gen))[0]
    S = torch.sort(torch.rand(r, generator=gen) + 0.1, descending=True).values
    return U, S, V


@st.composite
def problems(draw):
    """A gradient and a safety basis: full-rank, rank-deficient, zero or made to conflict; fp32/fp16/bf16."""
    m, n = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    r = draw(st.integers(1, min(m, n)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    U, S, V = basis(m, n, r, gen)
    kind = draw(st.sampled_from(["dense", "low_rank", "zero", "conflicting"]))
    if kind == "dense":
        G = torch.randn(m, n, generator=gen)
    elif kind == "low_rank":
        G = torch.randn(m, 1, generator=gen) @ torch.randn(1, n, generator=gen)
    elif kind == "zero":
        G = torch.zeros(m, n)
    else:  # push G against the safety gradient so the conflict test fires
        G = torch.randn(m, n, generator=gen) - 3 * (U * S) @ V.T
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    return (scale * G).to(dtype), U, S, V


def frob(a, b):
    return float((a.double() * b.double()).sum())


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=60, deadline=None)
@given(problem=problems())
def test_invariants(problem, side, mode):
    G, U, S, V = problem
    Gp = P.project(G, U, S, V, side=side, mode=mode)
    assert Gp.shape == G.shape and Gp.dtype == G.dtype
    Gd, Gpd = G.double(), Gp.double()
    Gs = ((U * S) @ V.T).double()
    scale = max(float(Gd.norm()), 1e-12)
    tol = TOL[G.dtype] * scale
    # no first-order safety increase
    assert frob(Gpd, Gs) >= -tol * float(Gs.norm())
    # still a descent direction: <G', G> = ||G'||^2 >= 0
    assert frob(Gpd, Gd) == pytest.approx(frob(Gpd, Gpd), abs=tol * scale)
    assert frob(Gpd, Gd) >= -tol * scale
    # never grows
    assert float(Gpd.norm()) <= scale * (1 + TOL[G.dtype])
    # idempotent, except where rounding G' to its dtype can flip a borderline decision: a kept direction (or, in
    # conflict mode, the whole test) within rounding of zero may then be removed on the second pass
    diag = torch.diagonal(P.core(G, U, V))
    margin = 10 * TOL[G.dtype] * scale * float(S.max())
    if mode == "directional":
        borderline = bool(((diag >= 0) & (diag.abs() * S < margin)).any())
    else:
        borderline = mode == "conflict" and 0 <= float((S * diag).sum()) < margin
    if not borderline:
        Gpp = P.project(Gp, U, S, V, side=side, mode=mode)
        assert float((Gpp.double() - Gpd).norm()) <= tol


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=30, deadline=None)
@given(problem=problems())
def test_removal_zeroes_the_safety_inner_product(problem, side, mode):
    G, U, S, V = problem
    G = G.float()
    Gp = G.clone()
    stats = P.project_(Gp, U, S, V, side=side, mode=mode)
    assert float(stats.removed_sq) == pytest.approx(float((G - Gp).pow(2).sum()), rel=1e-3, abs=1e-6)
    assert float(stats.inner_before) == pytest.approx(float(P.safety_inner(G, U, S, V)), rel=1e-4, abs=1e-5)
    if mode == "always" or (mode == "conflict" and stats.fired):
        assert abs(float(P.safety_inner(Gp, U, S, V))) <= 1e-4 * max(float(G.norm()), 1.0)
    if mode == "conflict" and float(P.safety_inner(G, U, S, V)) >= 0:
        assert not stats.fired and torch.equal(Gp, G)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 20), n=st.integers(2, 20))
def test_orthogonal_gradient_is_untouched(seed, m, n, side, mode):
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n) - 1
    U, S, V = basis(m, n, max(r, 1), gen)
    G = torch.randn(m, n, generator=gen)
    # make G invisible to the chosen side
    if side == "left":
        G = G - U @ (U.T @ G)
    elif side == "right":
        G = G - (G @ V) @ V.T
    else:
        G = G - U @ (U.T @ G @ V) @ V.T
    Gp = P.project(G, U, S, V, side=side, mode=mode)
    assert torch.allclose(Gp, G, atol=1e-5)


def test_conflict_and_directional_differ_as_specified():
    U, V = torch.eye(4, 2), torch.eye(3, 2)
    S = torch.tensor([2.0, 1.0])
    G = torch.zeros(4, 3)
    G[0, 0], G[1, 1] = -1.0, 1.0  # C = diag(-1, 1): sum_i S_i C_ii = -1 < 0, so the step conflicts
    assert float(P.safety_inner(G, U, S, V)) == -1.0
    conflict = P.project(G, U, S, V, side="two_sided", mode="conflict")
    assert torch.equal(conflict, torch.zeros(4, 3))  # the whole core goes
    directional = P.project(G, U, S, V, side="two_sided", mode="directional")
    assert directional[0, 0] == 0 and directional[1, 1] == 1  # only the conflicting direction goes
    G[1, 1] = 3.0  # now sum_i S_i C_ii = 1 > 0: no conflict
    assert torch.equal(P.project(G, U, S, V, mode="conflict"), G)


def test_rank_zero_basis_is_identity():
    G = torch.randn(5, 4)
    Gp = P.project(G, torch.zeros(5, 0), torch.zeros(0), torch.zeros(4, 0), side="left", mode="always")
    assert torch.equal(Gp, G)


def test_non_finite_gradient_is_a_clear_error():
    U, S, V = basis(6, 5, 2, torch.Generator().manual_seed(0))
    G = torch.randn(6, 5)
    G[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        P.project(G, U, S, V, mode="conflict")


def test_shape_mismatch_is_a_clear_error():
    U, S, V = basis(6, 5, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="another model"):
        P.project(torch.randn(5, 6), U, S, V)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 16), n=st.integers(2, 16), k=st.integers(1, 4))
def test_lora_rule(seed, m, n, k, mode):
    """The two-sided LoRA factor rule: the induced first-order change of W never raises the safety loss; with
    removal it has no U^T dW V component; the conflict test agrees with the dense one."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n, 3)
    U, S, V = basis(m, n, r, gen)
    B, A = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    gB, gA = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    dense = gB @ A + B @ gA  # the first-order weight change direction, (m, n)
    diag = P.lora_core_diagonal(gB, gA, B, A, U, V)
    assert torch.allclose(diag, torch.diagonal(P.core(dense, U, V)), atol=1e-4)
    nB, nA = P.project_lora(gB, gA, B, A, U, S, V, side="two_sided", mode=mode)
    induced = nB @ A + B @ nA
    assert float(P.safety_inner(induced, U, S, V)) >= -1e-4 * float(dense.norm())
    if mode == "always" or (mode == "conflict" and float((S * diag).sum()) < 0):
        assert torch.allclose(P.core(induced, U, V), torch.zeros(r, r), atol=1e-4)
    assert float(nB.norm()) <= float(gB.norm()) * (1 + 1e-5)
    assert float(nA.norm()) <= float(gA.norm()) * (1 + 1e-5)


@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 16), n=st.integers(2, 16), k=st.integers(1, 4))
def test_lora_sides_project_only_their_factor(seed, m, n, k, side):
    """``left`` makes B's step orthogonal to U, ``right`` A's step orthogonal to V, ``two_sided`` both; the factor a
    side does not project is returned unchanged; projecting twice changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n, 3)
    U, S, V = basis(m, n, r, gen)
    B, A = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    gB, gA = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    nB, nA = P.project_lora(gB, gA, B, A, U, S, V, side=side, mode="always")
    on_B, on_A = P.lora_projected_factors(side)
    assert torch.allclose(U.T @ nB, torch.zeros(r, k), atol=1e-5) if on_B else torch.equal(nB, gB)
    assert torch.allclose(nA @ V, torch.zeros(k, r), atol=1e-5) if on_A else torch.equal(nA, gA)
    again = P.project_lora(nB, nA, B, A, U, S, V, side=side, mode="always")
    assert torch.allclose(again[0], nB, atol=1e-5) and torch.allclose(again[1], nA, atol=1e-5)
