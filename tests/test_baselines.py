"""The baseline defences do what their papers say: surgery removes only conflict, Lisa alternates, SafeLoRA projects
exactly the dissimilar layers, Antidote prunes exactly its share, Vaccine's perturbation has its norm, Booster adds
the simulated-step gradient."""

import json

import pytest
import torch

from safeft.chat import collate, encode_chat
from safeft.config import DataConfig, TrainConfig
from safeft.methods import RunContext, build_method
from safeft.methods.antidote import row_prune_mask, wanda_scores
from safeft.methods.common import BatchStream
from safeft.methods.lisa import in_alignment
from safeft.methods.safegrad import remove_conflict
from safeft.methods.safelora import alignment_projector, similarity
from safeft.methods.vaccine import PerturbedLoss
from safeft.recipes.finetune import finetune
from safeft.testing import SAFETY_PAIRS, byte_tokenizer, tiny_llama
from safeft.train import prepare_model


def harmful_file(tmp_path, n: int = 3):
    path = tmp_path / "harmful.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": f"Sure, here is how, part {i}: first do this."})
                            + "\n" for i, (p, _) in enumerate(SAFETY_PAIRS[:n])))
    return str(path)


# --- safegrad ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_surgery_removes_the_conflict_and_only_the_conflict(seed):
    g = torch.Generator().manual_seed(seed)
    task = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    safety = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    dot = lambda a, b: sum(float((x * y).sum()) for x, y in zip(a, b))  # noqa: E731
    conflicting = [-t if dot(task, safety) > 0 else t for t in task]  # make <task, safety> < 0
    out, cosine = remove_conflict(conflicting, safety)
    assert cosine < 0 and abs(dot(out, safety)) < 1e-5  # orthogonal to the safety gradient after surgery
    removed = [c - o for c, o in zip(conflicting, out)]
    ratio = dot(removed, safety) / dot(safety, safety)
    assert all(torch.allclose(r, ratio * s, atol=1e-5) for r, s in zip(removed, safety))  # only along safety
    agreeing = [-t for t in conflicting]
    out, cosine = remove_conflict(agreeing, safety)
    assert cosine > 0 and all(torch.equal(a, o) for a, o in zip(agreeing, out))  # no conflict: unchanged


def test_safegrad_trains_with_surgery_and_the_kl_term(tiny_dir, tmp_path):
    method = build_method("safegrad", {"kl_weight": 0.5, "safety_samples": 4, "safety_batch_size": 2})
    _, _, log = finetune(tiny_dir, DataConfig(task="sentiment", max_train=16), method,
                         TrainConfig(steps=3, batch_size=4, logging_steps=1), tmp_path / "out", tmp_path / "c")
    logged = [e for e in log["log_history"] if "loss" in e]  # one entry per step, the summary aside
    assert len(logged) == 3 and all(-1 <= e["safegrad/cosine"] <= 1 for e in logged)


# --- lisa -------------------------------------------------------------------------------------------------------

def test_lisa_alternates_as_configured(tiny_dir, tmp_path):
    assert [in_alignment(s, 2, 3) for s in range(7)] == [True, True, False, False, False, True, True]
    method = build_method("lisa", {"alignment_steps": 1, "task_steps": 2, "rho": 0.5, "safety_batch_size": 2})
    finetune(tiny_dir, DataConfig(task="sentiment", max_train=16), method, TrainConfig(steps=6, batch_size=4),
             tmp_path / "out", tmp_path / "c")
    assert method.state.states == ["alignment", "task", "task"] * 2


def test_lisa_proximal_term_pulls_toward_the_switch_point(tokenizer):
    from safeft.methods.lisa import LisaOptions, LisaState

    model = tiny_llama(seed=0)
    stream = BatchStream([encode_chat(tokenizer, *SAFETY_PAIRS[0])], 1, tokenizer.pad_token_id)
    state = LisaState(LisaOptions(rho=2.0), stream)
    state.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    state.step, state.proximal_from, state.aligning = 10, 0, False
    first = next(model.parameters())
    zero = torch.zeros((), requires_grad=True)
    loss = state.loss(model, None, lambda: zero * 1.0, share=1.0)
    loss.backward()
    assert torch.allclose(first.grad, torch.full_like(first, 2.0 * 0.5))  # d/dw rho/2 |w - w0|^2 = rho (w - w0)
    assert loss.item() == pytest.approx(2.0 / 2 * 0.25 * first.numel(), rel=1e-5)


# --- safelora ---------------------------------------------------------------------------------------------------

def test_projector_and_similarity_on_planted_directions():
    u, v = torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([[0.0, 2.0]])
    c = alignment_projector(u @ v, torch.zeros(3, 2))  # V = u v^T: C = |v|^2 u u^T / |V|_F = 2 u u^T
    assert torch.allclose(c, 2.0 * u @ u.T)
    inside = u @ torch.tensor([[1.0, 1.0]])  # an update in V's column space keeps its direction
    outside = torch.tensor([[0.0], [1.0], [0.0]]) @ torch.tensor([[1.0, 1.0]])  # orthogonal: projected to zero
    assert similarity(inside, c @ inside) == pytest.approx(1.0)
    assert similarity(outside, c @ outside) == 0.0 and similarity(torch.zeros(3, 2), torch.zeros(3, 2)) == 1.0
    with pytest.raises(ValueError, match="no alignment direction"):
        alignment_projector(inside, inside)


def test_safelora_projects_exactly_the_dissimilar_lora_layers(tmp_path):
    """Plant V = u v^T in every layer; give half the layers an update inside u's span, half one orthogonal to it."""
    aligned = tiny_llama(seed=0)
    base = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(0)
    planted = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                m, n = module.weight.shape
                u, v = torch.randn(m, 1, generator=g), torch.randn(1, n, generator=g)
                module.weight.sub_(u @ v)  # W_base = W_aligned - u v^T
                planted[name] = u / u.norm()
    base.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    model = prepare_model(aligned, TrainConfig(lora_r=2))
    method = build_method("safelora", {"threshold": 0.5})
    run = RunContext(out=tmp_path, cache=tmp_path, base_model=str(tmp_path / "base"))
    method.before_training(model, None, run)
    expected, before = {}, {}
    with torch.no_grad():
        for i, (name, u) in enumerate(planted.items()):
            lora = model.get_submodule("base_model.model." + name)
            b = lora.lora_B["default"].weight  # (m, 2)
            direction = u if i % 2 == 0 else torch.linalg.qr(torch.cat([u, torch.randn_like(u)], 1))[0][:, 1:]
            b.copy_(direction @ torch.randn(1, b.shape[1], generator=g))  # update = s B A in (or outside) span(u)
            expected[name] = i % 2 == 1
            before[name] = b.clone()
    method.after_training(model, None, run)
    report = json.loads((tmp_path / "safelora.json").read_text())
    assert {n: r["projected"] for n, r in report["layers"].items()} == expected
    for name, projected in expected.items():
        b = model.get_submodule("base_model.model." + name).lora_B["default"].weight
        if projected:  # B <- C B, and C maps an update orthogonal to u to zero
            assert float(b.norm()) < 1e-4 * float(before[name].norm())
        else:
            assert torch.equal(b, before[name])
    facts = method.facts(model)  # what a bench run records: the count against the threshold
    assert facts["projected_layers"] == sum(expected.values()) and facts["layers"] == len(expected)
    assert facts["similarity_min"] < 0.5 <= facts["similarity_max"]
    merged = model.merge_and_unload()  # what is saved: the projected update merged into the weights
    assert merged is not None


# --- antidote ---------------------------------------------------------------------------------------------------

def test_row_prune_mask_takes_the_top_share_of_every_row():
    scores = torch.arange(20.0).reshape(2, 10)
    mask = row_prune_mask(scores, 0.3)
    assert mask.sum(1).tolist() == [3, 3] and mask[:, 7:].all() and not mask[:, :7].any()
    x_sq = torch.tensor([1.0, 4.0])
    assert torch.equal(wanda_scores(torch.tensor([[-1.0, 1.0]]), x_sq), torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize("lora_r", [0, 4])
def test_antidote_prunes_exactly_the_configured_share(lora_r, tokenizer, tmp_path):
    model = prepare_model(tiny_llama(seed=0), TrainConfig(lora_r=lora_r))
    method = build_method("antidote", {"prune_ratio": 0.25, "harmful_samples": 3,
                                       "harmful_data": harmful_file(tmp_path)})
    run = RunContext(out=tmp_path, cache=tmp_path)
    method.before_training(model, tokenizer, run)
    aligned = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # a "fine-tuning" update everywhere (LoRA: B leaves zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    matrices = method.pruned_matrices(model)
    assert matrices and all(("lora_" in n) == bool(lora_r) for n in matrices)
    method.after_training(model, tokenizer, run)
    pruned = json.loads((tmp_path / "antidote.json").read_text())["pruned"]
    assert set(pruned) == set(matrices)
    for name, (module, _) in matrices.items():
        rows, cols = module.weight.shape
        key = name + ".weight"
        reset = module.weight != trained[key]
        assert pruned[name] == rows * round(0.25 * cols) and (reset.sum(1) <= round(0.25 * cols)).all()
        target = torch.zeros_like(module.weight) if lora_r else aligned[key]
        assert torch.equal(module.weight[reset], target[reset])  # removed: zero (adapter) or back to aligned
    untouched = [n for n in trained if not any(n == m + ".weight" for m in matrices)]
    assert all(torch.equal(trained[n], dict(model.named_parameters())[n]) for n in untouched)


# --- vaccine ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [0.1, 2.0])
def test_vaccine_perturbation_has_the_configured_norm_and_raises_the_loss(rho, tokenizer):
    model = tiny_llama(seed=0)
    batch = collate([encode_chat(tokenizer, p, r) for p, r in SAFETY_PAIRS], tokenizer.pad_token_id)
    objective = PerturbedLoss(model, rho)
    assert len(objective.modules) == model.config.num_hidden_layers
    clean = float(model(**batch).loss)
    perturbed = objective(model, batch, lambda: model(**batch).loss, 1.0)
    assert objective.last_norm == pytest.approx(rho, rel=1e-4)
    assert float(perturbed) > clean  # the perturbation ascends the loss
    assert all(p.grad is None for p in model.parameters())  # the first pass formed no weight gradient
    assert float(model(**batch).loss) == pytest.approx(clean)  # the hooks are gone


def test_vaccine_and_booster_align_models_of_their_own(tiny_dir, tmp_path):
    from safeft.config import AlignConfig
    from safeft.recipes.align import aligned_model_dir, ensure_aligned

    config = AlignConfig(max_steps=1, check_every=1)
    shared = aligned_model_dir(str(tiny_dir), config, tmp_path)
    booster = build_method("booster", {"harmful_data": harmful_file(tmp_path), "harmful_batch_size": 2})
    dirs = set()
    for method in (build_method("vaccine", {"rho": 0.5}), booster):
        own, report, cached = ensure_aligned(str(tiny_dir), config, tmp_path, method)
        assert own != shared and not cached and report["method"]["name"] == method.name
        dirs.add(own)
    assert len(dirs) == 2


# --- booster ----------------------------------------------------------------------------------------------------

def test_booster_adds_the_simulated_step_gradient(tokenizer, tmp_path):
    from safeft.methods.booster import BoosterLoss, BoosterOptions

    model = tiny_llama(seed=0)
    harmful = [encode_chat(tokenizer, p, "Sure, here is how: first this.") for p, _ in SAFETY_PAIRS]
    task = collate([encode_chat(tokenizer, "Say hi.", "Hi there!")], tokenizer.pad_token_id)
    options = BoosterOptions(harmful_weight=3.0, harmful_step=0.05, harmful_batch_size=len(harmful))
    params = list(model.parameters())
    h_batch = collate(harmful, tokenizer.pad_token_id)
    # by hand: the harmful gradient, the normalised step, the gradient there
    g = torch.autograd.grad(model(**h_batch).loss, params)
    norm = torch.sqrt(sum(x.double().pow(2).sum() for x in g)).item() + 1e-7
    with torch.no_grad():
        shifted = tiny_llama(seed=0)
        for p, x in zip(shifted.parameters(), g):
            p.sub_(0.05 / norm * x)
    g_after = torch.autograd.grad(shifted(**h_batch).loss, list(shifted.parameters()))
    f_grad = torch.autograd.grad(model(**task).loss, params)
    weights = [p.detach().clone() for p in params]
    objective = BoosterLoss(options, BatchStream(harmful, len(harmful), tokenizer.pad_token_id))
    objective(model, task, lambda: model(**task).loss, 0.5).backward()
    for p, w, a, b, f in zip(params, weights, g, g_after, f_grad):
        assert torch.equal(p.detach(), w)  # the simulated step is undone
        assert torch.allclose(p.grad, f + 0.5 * 3.0 * (a - b), atol=1e-5)
    assert objective.last_gap > 0  # the simulated harmful step lowered the harmful loss


def test_fine_tuning_with_an_alignment_stage_method_on_another_model_warns(tiny_dir, tmp_path):
    with pytest.warns(UserWarning, match="acts at the alignment stage"):
        finetune(tiny_dir, DataConfig(task="sentiment", max_train=8), build_method("vaccine"),
                 TrainConfig(steps=1, batch_size=4), tmp_path / "out", tmp_path / "c")
