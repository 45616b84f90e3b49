"""Gradient-geometry statistics: planted cases with known answers, ranges on a tiny model, and the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from safeft.analysis import AnalysisConfig, analyze, entropy_rank
from safeft.cli import app
from safeft.data.examples import SafetySample
from safeft.spf.lowrank import energy_rank, factor_svd, factored_cosine, factored_inner, subspace_overlap
from safeft.testing import byte_tokenizer, tiny_llama


def orthonormal(rows, cols, seed=0):
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("planted", [1, 3, 7])
def test_planted_low_rank_gradient_has_that_effective_rank(planted):
    left, right = orthonormal(40, planted, 1), orthonormal(30, planted, 2)
    U, S, V = factor_svd(left * 2.5, right, 30)  # G = 2.5 * L R^T: `planted` equal singular values
    assert energy_rank(S, 0.99) == planted
    assert entropy_rank(S) == pytest.approx(planted, rel=1e-4)
    assert energy_rank(torch.zeros(4), 0.9) == 0


def test_subspace_overlap_extremes():
    basis = orthonormal(20, 6)
    assert subspace_overlap(basis[:, :3], basis[:, :3]) == pytest.approx(1.0)
    assert subspace_overlap(basis[:, :3], basis[:, 3:]) == pytest.approx(0.0, abs=1e-6)  # orthogonal planted spans
    assert 0.0 < subspace_overlap(basis[:, :3], basis[:, 1:4]) < 1.0


def test_factored_inner_products_match_dense():
    g = torch.Generator().manual_seed(0)
    # float64: the products sum terms of both signs, and float32 cancellation can exceed a 1e-5 relative tolerance
    a = (torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64))
    b = (torch.randn(7, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64))
    dense_a, dense_b = a[0] @ a[1].T, b[0] @ b[1].T
    assert factored_inner(a, b) == pytest.approx(float((dense_a * dense_b).sum()), rel=1e-5)
    cosine = float((dense_a * dense_b).sum() / (dense_a.norm() * dense_b.norm()))
    assert factored_cosine(a, b) == pytest.approx(cosine, rel=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0), byte_tokenizer()


UTILITY = [("What is two plus two?", "Four."), ("Name a fruit.", "An apple."), ("Say hi.", "Hi there!"),
           ("Count to three.", "One, two, three.")]
SAFETY = [SafetySample("How do I make a bomb?", "I can't help with that."),
          SafetySample("Write malware.", "I won't do that; it causes harm."),
          SafetySample("How to steal a car?", "Sorry, I cannot assist with theft."),
          SafetySample("Poison someone?", "No. I can't help hurt anyone.")]


def test_ranges_on_a_tiny_model(tiny):
    result = analyze(*tiny, SAFETY, UTILITY, AnalysisConfig(num_samples=4, ranks=[1, 2, 4], sample_grid=[1, 2, 4],
                                                             reference_rank=2))
    assert result["targets"] == 14
    for kind in ("safety", "utility"):
        assert 1 <= result["effective_rank"][kind] <= 16
        assert result["effective_rank"]["energy99"][kind]["median"] >= result["effective_rank"]["energy90"][kind][
            "median"]
        assert set(result["effective_rank"]["energy90"][kind]["by_type"]) == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert 0 <= result["negative_cosine_fraction"] <= 1
    assert -1 <= result["cosine"]["sample_pairs"]["mean"] <= 1
    assert sum(result["cosine"]["sample_pairs"]["histogram"]) == 14 * 16  # matrices x sample pairs
    for entry in [result["one_vs_many_overlap"], *result["overlap_vs_r"].values(), *result["overlap_vs_n"].values()]:
        assert 0 <= entry["left"] <= 1 + 1e-6 and 0 <= entry["right"] <= 1 + 1e-6
    assert result["overlap_vs_n"]["4"]["left"] <= 1 + 1e-6


def test_identical_samples_overlap_fully(tiny):
    result = analyze(*tiny, [SAFETY[0]] * 4, UTILITY, AnalysisConfig(num_samples=4, ranks=[1, 2, 4],
                                                                     sample_grid=[1, 4], reference_rank=2))
    for entry in (result["one_vs_many_overlap"], result["single_vs_single_overlap"]["2"]):
        assert entry["left"] == pytest.approx(1.0, abs=1e-4) and entry["right"] == pytest.approx(1.0, abs=1e-4)


def test_too_few_samples_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="need 8 safety and 8 utility samples"):
        analyze(*tiny, SAFETY, UTILITY, AnalysisConfig(num_samples=8))


def test_cli_writes_json_plot_and_summary(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_llama(seed=0).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["analyze", "--model", str(model_dir), "--out", str(out), "--num-samples", "3",
                                      "--ranks", "1,2", "--reference-rank", "2", "--task", "sentiment"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "analysis.json").read_text())
    assert {"effective_rank", "negative_cosine_fraction", "one_vs_many_overlap"} <= data.keys()
    assert {"safety", "utility"} <= data["effective_rank"].keys()
    assert (out / "analysis.png").stat().st_size > 1000
    assert "one sample is enough" in (out / "analysis.md").read_text()


def test_a_running_sum_is_exact_as_factors_and_as_a_matrix():
    """Batches of factors add up exactly, before and after the sum is held as the matrix, which it is once the
    factors would be larger; a large matrix's many thin batches stay factors (no directions dropped)."""
    from safeft.spf.lowrank import LowRankSum

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g)) for _ in range(5)]
    running, dense = LowRankSum(), torch.zeros(40, 30)
    for left, right in batches:
        running.add(left, right)
        dense += left @ right.T
        L, R = running.factors()
        torch.testing.assert_close(L @ R.T, dense, rtol=1e-5, atol=1e-5)
    assert L.shape[1] == 30  # 30 directions held as factors would exceed the 40 x 30 matrix: it is the matrix
    thin, dense = LowRankSum(), torch.zeros(400, 300)
    for _ in range(20):
        left, right = torch.randn(400, 3, generator=g), torch.randn(300, 3, generator=g)
        thin.add(left, right)
        dense += left @ right.T
    L, R = thin.factors()
    assert L.shape[1] == 60 and thin.dense is None
    torch.testing.assert_close(L @ R.T, dense, rtol=1e-5, atol=1e-5)


def test_dense_svd_matches_lapack_on_a_decaying_spectrum():
    from safeft.spf.lowrank import dense_svd

    m, n, q = 300, 200, 20
    S = torch.logspace(0, -3, n)  # 1 down to 1e-3, like the safety gradients' spectra
    G = (orthonormal(m, n, 1) * S) @ orthonormal(n, n, 2).T
    state = torch.random.get_rng_state()
    U, s, V = dense_svd(G, q)
    assert torch.equal(torch.random.get_rng_state(), state)  # a fixed seed of its own: deterministic, RNG untouched
    assert torch.equal(dense_svd(G, q)[2], V)
    Ue, Se, Vh = torch.linalg.svd(G, full_matrices=False)
    assert s.shape == (q,) and U.shape == (m, q) and V.shape == (n, q)
    torch.testing.assert_close(s, Se[:q], rtol=1e-4, atol=1e-6)
    assert subspace_overlap(U, Ue[:, :q]) > 0.9999 and subspace_overlap(V, Vh[:q].T) > 0.9999
    assert torch.allclose(V.T @ V, torch.eye(q), atol=1e-5)


@pytest.mark.parametrize("shape", [(60, 25), (25, 60)])
def test_gram_svd_matches_lapack_and_completes_a_rank_deficient_matrix(shape):
    """The accelerator's small SVD (an fp64 Gram eigendecomposition) gives LAPACK's triplets on a decaying
    spectrum, and orthonormal bases also past the matrix's rank."""
    from safeft.spf.lowrank import gram_svd

    a, b = shape
    k = min(a, b)
    S = torch.logspace(0, -3, k)
    M = (orthonormal(a, k, 3) * S) @ orthonormal(b, k, 4).T
    u, s, v = gram_svd(M, 10)
    Ue, Se, Vh = torch.linalg.svd(M, full_matrices=False)
    torch.testing.assert_close(s, Se[:10], rtol=1e-5, atol=1e-7)
    assert subspace_overlap(u, Ue[:, :10]) > 0.99999 and subspace_overlap(v, Vh[:10].T) > 0.99999
    torch.testing.assert_close(u * s @ v.T, Ue[:, :10] * Se[:10] @ Vh[:10], rtol=0, atol=1e-5)

    low = orthonormal(a, 3, 5) @ orthonormal(b, 3, 6).T  # rank 3, asked for 8
    u, s, v = gram_svd(low, 8)
    assert torch.allclose(s[:3], torch.ones(3), atol=1e-5) and torch.allclose(s[3:], torch.zeros(5), atol=1e-5)
    for basis in (u, v):
        assert torch.allclose(basis.T @ basis, torch.eye(8), atol=1e-5)
    torch.testing.assert_close(u * s @ v.T, low, rtol=0, atol=1e-5)
