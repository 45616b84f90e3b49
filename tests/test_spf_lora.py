"""SPF under LoRA, side by side: each side's invariant holds for the merged weight change, and only its own."""

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from conftest import train_steps
from safeft import SafetySubspace, SPFConfig, attach_spf
from safeft.spf.projection import SIDES
from safeft.spf.targets import find_targets
from safeft.testing import tiny_llama

OPPOSITE = {"left": "right", "right": "left", "two_sided": "right"}  # an invariant the side does not keep


@pytest.fixture
def subspace(model, tokenizer, safety_pairs):
    return SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=8), show_progress=False)


def lora_model(**kwargs):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, **kwargs)
    return get_peft_model(tiny_llama(seed=0), config)


def side_residuals(subspace, merged) -> dict[str, float]:
    """Return, per side, ``sum_t |sketch_side(dW_t)| / sum_t |dW_t|`` for the merged weight change since the base:
    ``U^T dW`` (left), ``dW V`` (right), ``U^T dW V`` (two_sided)."""
    base = dict(tiny_llama(seed=0).named_parameters())
    weights = dict(merged.named_parameters())
    sums = dict.fromkeys(SIDES, 0.0)
    total = 0.0
    for name, b in subspace.bases.items():
        dW = (weights[f"{name}.weight"] - base[f"{name}.weight"]).detach()
        total += float(dW.norm())
        sums["left"] += float((b.U.T @ dW).norm())
        sums["right"] += float((dW @ b.V).norm())
        sums["two_sided"] += float((b.U.T @ dW @ b.V).norm())
    assert total > 1e-3, "the adapter did not train"
    return {side: value / total for side, value in sums.items()}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("project", "optimizer_cls", "lr"), [("update", torch.optim.AdamW, 1e-2),
                                                              ("grad", torch.optim.SGD, 0.5)], ids=["update", "grad"])
def test_each_side_keeps_its_invariant_through_merge_and_adapter_reload(tmp_path, tokenizer, benign_batch, subspace,
                                                                        side, project, optimizer_cls, lr):
    model = lora_model()
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    attach_spf(optimizer, model, subspace, SPFConfig(rank=8, side=side, mode="always", project=project))
    train_steps(model, optimizer, benign_batch, 4)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path).merge_and_unload()
    merged = model.merge_and_unload()
    for (name, p), (_, q) in zip(merged.named_parameters(), reloaded.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    residual = side_residuals(subspace, reloaded)
    assert residual[side] < 1e-5  # the side's invariant: numerical noise
    assert residual[OPPOSITE[side]] > 1e-2  # another side's invariant visibly does not hold


def test_plain_lora_breaks_every_invariant(tokenizer, benign_batch, subspace):
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, optimizer, benign_batch, 4)
    assert min(side_residuals(subspace, model.merge_and_unload()).values()) > 1e-2


def test_right_side_projects_the_initial_down_projection_without_changing_the_model(tokenizer, benign_batch,
                                                                                      subspace):
    model = lora_model()
    with torch.no_grad():
        before = model(**benign_batch).logits
    targets = find_targets(model)
    assert all(float((t.lora_A @ subspace[n].V).norm()) > 1e-2 for n, t in targets.items())
    attach_spf(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model, subspace,
               SPFConfig(rank=8, side="right"))
    assert all(float((t.lora_A @ subspace[n].V).norm()) < 1e-5 for n, t in targets.items())
    with torch.no_grad():
        assert torch.equal(model(**benign_batch).logits, before)  # B = 0: the function is unchanged


@pytest.mark.parametrize("side", ["left", "right"])
def test_one_sided_rule_refuses_an_adapter_it_cannot_enforce_without_changing_the_model(subspace, side):
    model = lora_model()
    for t in find_targets(model).values():  # a trained (or PiSSA-style) adapter: B != 0, not orthogonal to U
        torch.nn.init.normal_(t.lora_B, std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=rf"side='{side}' under LoRA.*fresh adapter.*two_sided"):
        attach_spf(torch.optim.SGD(params, lr=0.1), model, subspace, SPFConfig(rank=8, side=side))
    attach_spf(torch.optim.SGD(params, lr=0.1), model, subspace, SPFConfig(rank=8, side="two_sided"))


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_an_adapter_with_one_factor_frozen_is_refused_not_left_unguarded(subspace, frozen):
    model = lora_model()
    for t in find_targets(model).values():
        getattr(t, frozen).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=f"{frozen} is frozen.*unfreeze {frozen}"):
        attach_spf(torch.optim.SGD(params, lr=0.1), model, subspace, SPFConfig(rank=8))


@pytest.mark.parametrize("side", ["left", "right"])
def test_refresh_under_lora_needs_the_two_sided_rule(tokenizer, subspace, side):
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="refreshing under LoRA needs side='two_sided'"):
        attach_spf(torch.optim.SGD(params, lr=0.1), model, subspace, SPFConfig(rank=8, side=side, refresh_every=2),
                   tokenizer)


def test_the_default_side_is_left_under_lora_and_right_for_full_fine_tuning(tokenizer, benign_batch, subspace):
    """No side given: LoRA keeps ``U^T dW`` at zero (and the right side visibly moves, so the default is not
    `right`), or the core ``U^T dW V`` when the subspace is refreshed (which needs both factors guarded); full
    fine-tuning keeps ``dW V`` at zero."""
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = attach_spf(optimizer, model, subspace, SPFConfig(rank=8))
    assert handle.projector.config.side == "left"
    train_steps(model, optimizer, benign_batch, 4)
    residual = side_residuals(subspace, model.merge_and_unload())
    assert residual["left"] < 1e-5 and residual["right"] > 1e-2

    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = attach_spf(optimizer, model, subspace, SPFConfig(rank=8, refresh_every=100), tokenizer)
    assert handle.projector.config.side == "two_sided"

    full = tiny_llama(seed=0)
    optimizer = torch.optim.AdamW(full.parameters(), lr=1e-3)
    handle = attach_spf(optimizer, full, subspace, SPFConfig(rank=8))
    assert handle.projector.config.side == "right"
    train_steps(full, optimizer, benign_batch, 2)
    residual = side_residuals(subspace, full)
    assert residual["right"] < 1e-5 and residual["left"] > 1e-2


def test_peft_variants_spf_cannot_guard_are_refused_by_name():
    with pytest.raises(ValueError, match="DoRA"):
        find_targets(lora_model(use_dora=True))
    ia3 = get_peft_model(tiny_llama(seed=0), IA3Config(target_modules=["q_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="plain LoRA adapters only.*IA3|plain LoRA adapters only.*ia3"):
        find_targets(ia3)


def test_the_adapter_initialisation_is_the_run_seeds():
    from safeft.config import TrainConfig
    from safeft.train import prepare_model

    def first_a(seed):
        torch.randn(7)  # whatever ran before must not matter
        model = prepare_model(tiny_llama(seed=0), TrainConfig(lora_r=2, seed=seed))
        return next(t.lora_A.detach().clone() for t in find_targets(model).values())

    assert torch.equal(first_a(0), first_a(0)) and not torch.equal(first_a(0), first_a(1))
