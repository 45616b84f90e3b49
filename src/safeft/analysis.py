"""Gradient geometry: check the paper's three findings (SPEC §1) on any model and data.

1. Low rank: the safety gradient of each target matrix has few significant directions, the utility gradient more.
2. Conflict: safety and utility gradients are often negatively aligned (cosine < 0: a utility step raises the
   safety loss).
3. One sample is enough: the top-r safety subspace from one sample overlaps the one from N samples.

Per-sample gradients are kept as thin factors ``G_i = L_i R_i^T`` (``L_i: (m, t)``, ``R_i: (n, t)``, t tokens), so
inner products and norms between them cost ``t x t`` products and no ``(m, n)`` matrix is ever formed. A set's
gradient is the mean of its samples' gradients (each the gradient of that sample's mean response-token loss).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from safeft.chat import encode_chat
from safeft.config import check_positive
from safeft.data.examples import SafetySample
from safeft.errors import UserError
from safeft.progress import progress
from safeft.spf.estimate import gradient_factors
from safeft.spf.lowrank import (
    Factors,
    LowRankSum,
    concat,
    energy_rank,
    factor_svd,
    factored_cosine,
    factored_inner,
    subspace_overlap,
)
from safeft.spf.targets import find_targets


@dataclass
class AnalysisConfig:
    """What to measure.

    Args:
        num_samples: N, samples per set (safety and utility).
        ranks: the r grid for subspace overlaps.
        sample_grid: the N grid for one-vs-many overlaps (values above ``num_samples`` are dropped).
        target_modules: which matrices (see ``SPFConfig.target_modules``); None = all block linears.
        reference_rank: the r of the headline numbers.
    """

    num_samples: int = 16
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    sample_grid: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    target_modules: list[str] | None = None
    reference_rank: int = 8

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise UserError(f"AnalysisConfig.num_samples must be >= 2 to compare samples, got {self.num_samples}")
        if not self.ranks or min(self.ranks) <= 0:
            raise UserError(f"AnalysisConfig.ranks must be positive integers, got {self.ranks}")
        check_positive(self, "reference_rank")


# --- statistics of one spectrum / pair of factored matrices ---------------------------------------------------


def entropy_rank(S: Tensor) -> float:
    """Return the entropy effective rank ``exp(H(p))`` with ``p = S / sum(S)`` (Roy & Vetterli 2007)."""
    p = S.double() / S.double().sum() if S.sum() > 0 else S.double()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0


# --- per-sample gradients -------------------------------------------------------------------------------------


def per_sample_gradients(model, tokenizer, pairs: Sequence[tuple[str, str]], targets: dict, desc: str
                         ) -> dict[str, list[Factors]]:
    """Return ``{target: [factors of sample i's gradient]}`` for (prompt, response) pairs, one backward each."""
    out: dict[str, list[Factors]] = {name: [] for name in targets}
    for prompt, response in progress(pairs, desc=desc):
        sums: dict[str, LowRankSum] = gradient_factors(model, targets, [encode_chat(tokenizer, prompt, response)],
                                                       tokenizer, batch_size=1)
        for name, s in sums.items():
            m, n = targets[name].shape
            out[name].append(s.factors() if not s.empty else (torch.zeros(m, 0), torch.zeros(n, 0)))
    return out


# --- the analysis ---------------------------------------------------------------------------------------------


def _layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _depth(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _summaries(values: dict[str, float]) -> dict:
    by_type: dict[str, list[float]] = {}
    by_depth: dict[int, list[float]] = {}
    for name, v in values.items():
        by_type.setdefault(_layer_type(name), []).append(v)
        depth = _depth(name)
        if depth is not None:
            by_depth.setdefault(depth, []).append(v)
    return {"median": statistics.median(values.values()),
            "by_type": {k: statistics.median(v) for k, v in sorted(by_type.items())},
            "by_depth": {str(k): statistics.median(v) for k, v in sorted(by_depth.items())}}


def analyze(model, tokenizer, safety: Sequence[SafetySample], utility: Sequence[tuple[str, str]],
            config: AnalysisConfig | None = None) -> dict:
    """Measure the three findings on ``model``.

    Args:
        safety: (harmful prompt, refusal) samples; the first ``num_samples`` are used.
        utility: (prompt, response) pairs of the task; the first ``num_samples`` are used.

    Returns:
        A JSON-ready dict: ``effective_rank`` (``safety`` / ``utility``: median over targets of the 90%-energy rank,
        plus 99%, entropy and per type / depth), ``negative_cosine_fraction`` (over matrices x sample pairs),
        ``cosine``, ``one_vs_many_overlap`` (at the reference rank), ``overlap_vs_r``, ``overlap_vs_n``,
        ``single_vs_single_overlap`` and ``spectra`` (median normalised spectrum of each set).
    """
    config = config or AnalysisConfig()
    n = config.num_samples
    if len(safety) < n or len(utility) < n:
        raise UserError(f"need {n} safety and {n} utility samples, got {len(safety)} and {len(utility)}; "
                         "lower num_samples or give more data")
    targets = find_targets(model, config.target_modules)
    if not targets:
        raise UserError(f"no target matrices match {config.target_modules!r}")
    safety_grads = per_sample_gradients(model, tokenizer, [(s.prompt, s.refusal) for s in safety[:n]], targets,
                                        "safety gradients")
    utility_grads = per_sample_gradients(model, tokenizer, list(utility[:n]), targets, "utility gradients")

    ranks = {"safety": {}, "utility": {}}
    ranks99 = {"safety": {}, "utility": {}}
    entropy = {"safety": {}, "utility": {}}
    spectra = {"safety": [], "utility": []}
    cos_matrix, cos_pairs, core_negative, core_cos = {}, [], {}, {}
    rank_grid = sorted(set(config.ranks) | {config.reference_rank})
    overlap_r = {r: {"left": [], "right": []} for r in rank_grid}
    grid = [g for g in config.sample_grid if g <= n]
    overlap_n = {g: {"left": [], "right": []} for g in grid}
    single_pairs = {r: {"left": [], "right": []} for r in rank_grid}
    r_ref = config.reference_rank
    max_r = max(rank_grid)

    for name in progress(targets, desc="geometry"):
        sets = {"safety": safety_grads[name], "utility": utility_grads[name]}
        aggregate = {}
        for kind, grads in sets.items():
            aggregate[kind] = concat(grads, 1.0 / n)
            U, S, V = factor_svd(*aggregate[kind], min(targets[name].shape))
            ranks[kind][name] = energy_rank(S, 0.90)
            ranks99[kind][name] = energy_rank(S, 0.99)
            entropy[kind][name] = entropy_rank(S)
            spectra[kind].append((S / S[0]).tolist() if S.numel() and S[0] > 0 else [])
            if kind == "safety":
                U_all, S_all, V_all = U[:, :max_r], S[:max_r], V[:, :max_r]
        # 2. conflict: whole matrices, sample pairs, and the utility gradient inside the top-r safety subspace
        cos_matrix[name] = factored_cosine(aggregate["safety"], aggregate["utility"])
        norms = {kind: [math.sqrt(max(factored_inner(g, g), 0.0)) for g in grads] for kind, grads in sets.items()}
        cos_pairs += [factored_inner(a, b) / max(na * nb, 1e-30)
                      for a, na in zip(sets["safety"], norms["safety"])
                      for b, nb in zip(sets["utility"], norms["utility"])]
        Ur, Sr, Vr = U_all[:, :r_ref], S_all[:r_ref], V_all[:, :r_ref]
        core = (Ur.T @ aggregate["utility"][0]) @ (aggregate["utility"][1].T @ Vr)  # U^T G_u V, (r, r)
        inner = float((Sr * torch.diagonal(core)).sum())  # <G_u, U_r S_r V_r^T>
        utility_norm = math.sqrt(max(factored_inner(aggregate["utility"], aggregate["utility"]), 0.0))
        core_negative[name] = inner < 0
        core_cos[name] = inner / max(float(Sr.norm()) * utility_norm, 1e-30)
        # 3. one sample vs many: subspaces from sample 0, from the first g samples, and from all n
        singles = [factor_svd(*g, max_r) for g in sets["safety"]]
        for r in rank_grid:
            overlap_r[r]["left"].append(subspace_overlap(singles[0][0][:, :r], U_all[:, :r]))
            overlap_r[r]["right"].append(subspace_overlap(singles[0][2][:, :r], V_all[:, :r]))
            pairs = [(i, j) for i in range(min(n, 6)) for j in range(i + 1, min(n, 6))]
            single_pairs[r]["left"].append(statistics.mean(
                subspace_overlap(singles[i][0][:, :r], singles[j][0][:, :r]) for i, j in pairs))
            single_pairs[r]["right"].append(statistics.mean(
                subspace_overlap(singles[i][2][:, :r], singles[j][2][:, :r]) for i, j in pairs))
        for g in grid:
            Ug, _, Vg = factor_svd(*concat(sets["safety"][:g], 1.0 / g), r_ref)
            overlap_n[g]["left"].append(subspace_overlap(singles[0][0][:, :r_ref], Ug))
            overlap_n[g]["right"].append(subspace_overlap(singles[0][2][:, :r_ref], Vg))

    def side_means(entry: dict) -> dict:
        left, right = statistics.mean(entry["left"]), statistics.mean(entry["right"])
        return {"left": left, "right": right, "mean": (left + right) / 2}

    def median_spectrum(rows: list[list[float]], length: int = 64) -> list[float]:
        return [statistics.median(row[i] if i < len(row) else 0.0 for row in rows) for i in range(length)]

    negative_pairs = sum(c < 0 for c in cos_pairs) / len(cos_pairs)
    histogram = torch.histc(torch.tensor(cos_pairs), bins=40, min=-1, max=1).tolist()
    return {
        "config": asdict(config),
        "targets": len(targets),
        "effective_rank": {"safety": statistics.median(ranks["safety"].values()),
                           "utility": statistics.median(ranks["utility"].values()),
                           "definition": "median over targets of the number of directions holding 90% of the "
                                         "squared spectrum of the N-sample mean gradient",
                           "energy90": {k: _summaries(v) for k, v in ranks.items()},
                           "energy99": {k: _summaries(v) for k, v in ranks99.items()},
                           "entropy": {k: _summaries(v) for k, v in entropy.items()}},
        "negative_cosine_fraction": negative_pairs,
        "cosine": {"sample_pairs": {"mean": statistics.mean(cos_pairs), "negative_fraction": negative_pairs,
                                    "histogram": histogram},
                   "aggregate_matrices": {"mean": statistics.mean(cos_matrix.values()),
                                          "negative_fraction": sum(c < 0 for c in cos_matrix.values()) / len(targets),
                                          "by_type": _summaries(cos_matrix)["by_type"]},
                   "top_r_core": {"r": r_ref, "negative_fraction": sum(core_negative.values()) / len(targets),
                                  "mean_cosine": statistics.mean(core_cos.values())}},
        "one_vs_many_overlap": {"r": r_ref, "n": n, **side_means(overlap_r[r_ref])},
        "overlap_vs_r": {str(r): side_means(v) for r, v in overlap_r.items()},
        "overlap_vs_n": {str(g): side_means(v) for g, v in overlap_n.items()},
        "single_vs_single_overlap": {str(r): side_means(v) for r, v in single_pairs.items()},
        "spectra": {k: median_spectrum(v) for k, v in spectra.items()},
    }


# --- output ---------------------------------------------------------------------------------------------------


def summary_markdown(result: dict, title: str = "Gradient geometry") -> str:
    """Return a short markdown summary: does each finding hold, with the numbers."""
    er, cos, ov = result["effective_rank"], result["cosine"], result["one_vs_many_overlap"]
    single = result["single_vs_single_overlap"].get(str(ov["r"]))
    lines = [
        f"### {title}", "",
        "| finding | measure | value |", "|---|---|---|",
        f"| 1. safety gradients are low-rank | median 90%-energy rank, safety vs utility | {er['safety']:.1f} vs "
        f"{er['utility']:.1f} |",
        f"| 2. safety and utility conflict | share of negative cosines (matrices x sample pairs) | "
        f"{100 * result['negative_cosine_fraction']:.1f}% (mean cosine {cos['sample_pairs']['mean']:+.3f}) |",
        f"| | share of matrices whose utility gradient raises the rank-{cos['top_r_core']['r']} safety loss | "
        f"{100 * cos['top_r_core']['negative_fraction']:.1f}% |",
        f"| 3. one sample is enough | overlap of rank-{ov['r']} subspaces, 1 vs {ov['n']} samples (left / right) | "
        f"{ov['left']:.2f} / {ov['right']:.2f} |",
    ]
    if single:
        lines.append(f"| | overlap between two single samples (left / right) | {single['left']:.2f} / "
                     f"{single['right']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Write a PNG with three panels: spectra of safety vs utility, cosine histogram, overlap vs r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, colour in (("safety", "C3"), ("utility", "C0")):
        spectrum = result["spectra"][kind]
        axes[0].semilogy(range(1, len(spectrum) + 1), [max(s, 1e-6) for s in spectrum], color=colour, label=kind)
    axes[0].set(xlabel="singular value index", ylabel="sigma_i / sigma_1 (median over matrices)",
                title="1. spectra of the N-sample mean gradient")
    axes[0].legend()
    hist = result["cosine"]["sample_pairs"]["histogram"]
    edges = [-1 + 2 * i / len(hist) for i in range(len(hist))]
    axes[1].bar(edges, hist, width=2 / len(hist), align="edge", color="C2")
    axes[1].axvline(0, color="black", lw=1)
    axes[1].set(xlabel="cosine(safety gradient, utility gradient)", ylabel="matrix x sample pairs",
                title=f"2. conflict: {100 * result['negative_cosine_fraction']:.0f}% negative")
    rs = sorted(int(r) for r in result["overlap_vs_r"])
    for key, style, label in (("overlap_vs_r", "-", f"1 vs {result['one_vs_many_overlap']['n']} samples"),
                              ("single_vs_single_overlap", "--", "two single samples")):
        for side, colour in (("left", "C1"), ("right", "C4")):
            axes[2].plot(rs, [result[key][str(r)][side] for r in rs], style, marker="o", color=colour,
                         label=f"{label}, {side}")
    axes[2].set(xscale="log", xlabel="rank r", ylabel="subspace overlap (mean cos^2 of principal angles)",
                ylim=(0, 1.02), title="3. one sample vs many")
    axes[2].set_xticks(rs, [str(r) for r in rs])
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analysis_inputs(safety_data, safety_format: str, task: str, task_data, num_samples: int, seed: int = 0
                    ) -> tuple[list[SafetySample], list[tuple[str, str]]]:
    """Return ``num_samples`` safety samples and utility pairs, drawn with ``seed``.

    Safety: built-in harmful requests, or a file; AdvBench has no refusals, so each prompt gets a built-in varied
    refusal (as for the built-in requests). Utility: a built-in task's training split, or a data file.
    """
    import random

    from safeft.data import builtin
    from safeft.data.examples import require_responses
    from safeft.data.loaders import load_examples
    from safeft.data.tasks import load_task

    if safety_data is None:
        safety = [SafetySample(p, builtin.refusal_for(p)) for _, p in builtin.harmful_requests()]
    else:
        rows = load_examples(safety_format, safety_data)
        if safety_format != "advbench":  # AdvBench rows get built-in refusals; the others bring their own
            require_responses(rows, safety_data)
        safety = [SafetySample(e.prompt, builtin.refusal_for(e.prompt) if safety_format == "advbench" else e.response)
                  for e in rows]
    if task_data is None:
        utility = [(e.prompt, e.response) for e in load_task(task).train]
    else:
        utility = [(e.prompt, e.response) for e in require_responses(load_examples(task, task_data), task_data)]
    rng = random.Random(seed)
    return rng.sample(safety, min(num_samples, len(safety))), rng.sample(utility, min(num_samples, len(utility)))
