"""Estimating, saving and loading the safety subspace on a tiny random Llama."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from safeft import SafetySubspace, SPFConfig
from safeft.chat import IGNORE_INDEX, collate, encode_chat, first_response_tokens, response_token_loss_sum
from safeft.data.examples import SafetySample
from safeft.spf.estimate import allocate_ranks, select_rank
from safeft.spf.subspace import samples_sha256
from safeft.testing import byte_tokenizer, tiny_llama


def autograd_safety_gradients(model, tokenizer, pairs, onset=None):
    """The reference: dense weight gradients of the mean refusal-token loss (first ``onset`` tokens), by autograd."""
    encoded = [encode_chat(tokenizer, p, r) for p, r in pairs]
    if onset:
        encoded = [first_response_tokens(e, onset) for e in encoded]
    batch = collate(encoded, tokenizer.pad_token_id)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, count = response_token_loss_sum(logits, batch["labels"])
    (loss / count).backward()
    return {n.removesuffix(".weight"): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_matches_truncated_svd_of_the_autograd_gradient(model, tokenizer, safety_pairs):
    config = SPFConfig(rank=4, estimate_batch_size=2)  # the default estimate: the loss on each refusal's first tokens
    subspace = SafetySubspace.estimate(model, tokenizer, safety_pairs, config, show_progress=False)
    reference = autograd_safety_gradients(model, tokenizer, safety_pairs, onset=config.onset_tokens)
    assert len(subspace) == 14  # 7 linear layers x 2 blocks; embeddings and LM head excluded
    assert "lm_head" not in subspace.bases
    for name, b in subspace.bases.items():
        G = reference[name]
        U, S, Vh = torch.linalg.svd(G)
        assert torch.allclose(b.S, S[:4], rtol=1e-4, atol=1e-6)
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        assert float(((b.U * b.S) @ b.V.T - best).norm()) <= 1e-4 * float(G.norm())
        assert torch.allclose(b.U.T @ b.U, torch.eye(4), atol=1e-5)
        assert torch.allclose(b.V.T @ b.V, torch.eye(4), atol=1e-5)


def test_compliance_answers_give_the_svd_of_the_margin_gradient(model, tokenizer, safety_pairs):
    compliances = ["Sure. Step one: get the parts.", "Here is how: first find a target.",
                   "Of course, here are the steps.", "Yes: open the lock with a pin."]
    samples = [SafetySample(p, r, c) for (p, r), c in zip(safety_pairs, compliances)]
    config = SPFConfig(rank=4, estimate_batch_size=3, onset_tokens=None)  # every response token
    subspace = SafetySubspace.estimate(model, tokenizer, samples, config, show_progress=False)
    refusal = autograd_safety_gradients(model, tokenizer, safety_pairs)
    compliance = autograd_safety_gradients(model, tokenizer, list(zip([p for p, _ in safety_pairs], compliances)))
    for name, b in subspace.bases.items():
        margin = refusal[name] - compliance[name]  # d(-log p(refusal)) - d(-log p(compliance)), token means
        S = torch.linalg.svdvals(margin)
        assert torch.allclose(b.S, S[:4], rtol=1e-4, atol=1e-6)
        assert float((margin - b.U @ (b.U.T @ margin)).norm()) == pytest.approx(float(S[4:].norm()), rel=1e-3)
    assert subspace.samples == samples and subspace.samples[0].compliance == compliances[0]


def test_onset_tokens_estimate_from_the_first_response_tokens_only(model, tokenizer, safety_pairs):
    chat = encode_chat(tokenizer, *safety_pairs[0])
    onset = first_response_tokens(chat, 3)
    labelled = [i for i, label in enumerate(chat.labels) if label != IGNORE_INDEX]
    assert [i for i, label in enumerate(onset.labels) if label != IGNORE_INDEX] == labelled[:3]
    assert onset.input_ids == chat.input_ids
    subspace = SafetySubspace.estimate(model, tokenizer, safety_pairs, SPFConfig(rank=2, onset_tokens=3),
                                       show_progress=False)
    reference = autograd_safety_gradients(model, tokenizer, safety_pairs, onset=3)
    for name, b in subspace.bases.items():
        assert torch.allclose(b.S, torch.linalg.svdvals(reference[name])[:2], rtol=1e-4, atol=1e-6)
    assert subspace.config.onset_tokens == 3  # kept in the metadata, so a refresh estimates the same way


def test_leaves_model_untouched_and_works_under_frozen_lora(model, tokenizer, safety_pairs):
    plain = SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=4), show_progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert model.training
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    grads_before = [p.requires_grad for p in lora.parameters()]
    frozen = SafetySubspace.estimate(lora, tokenizer, safety_pairs[:1], SPFConfig(rank=4), show_progress=False)
    assert [p.requires_grad for p in lora.parameters()] == grads_before
    assert set(frozen.bases) == set(plain.bases)  # same canonical names through the peft wrapper
    for name in plain.bases:  # B = 0 at init, so the base model's safety gradient is unchanged
        assert torch.allclose(frozen[name].S, plain[name].S, rtol=1e-4, atol=1e-7)


def test_target_patterns_and_energy_policy(model, tokenizer, safety_pairs):
    cfg = SPFConfig(rank=None, energy=0.9, max_rank=6, target_modules=["q_proj", r".*\.mlp\.down_proj"])
    subspace = SafetySubspace.estimate(model, tokenizer, safety_pairs, cfg, show_progress=False)
    assert sorted(subspace.bases) == sorted(f"model.layers.{i}.{m}" for i in (0, 1)
                                            for m in ("self_attn.q_proj", "mlp.down_proj"))
    for b in subspace.bases.values():
        assert 1 <= b.rank <= 6


def test_a_budget_goes_to_the_largest_singular_values_of_all_targets(model, tokenizer, safety_pairs):
    spectra = {"a": torch.tensor([9.0, 5.0, 1.0]), "b": torch.tensor([8.0, 7.0, 6.0, 0.0]), "c": torch.tensor([])}
    assert allocate_ranks(spectra, SPFConfig(budget=4)) == {"a": 1, "b": 3, "c": 0}  # 9, 8, 7, 6
    assert allocate_ranks(spectra, SPFConfig(budget=4, max_rank=2)) == {"a": 2, "b": 2, "c": 0}  # 9, 8, 7, 5
    assert allocate_ranks(spectra, SPFConfig(budget=100)) == {"a": 3, "b": 3, "c": 0}  # never a numerical zero

    full = SafetySubspace.estimate(model, tokenizer, safety_pairs, SPFConfig(rank=8), show_progress=False)
    budget = SafetySubspace.estimate(model, tokenizer, safety_pairs, SPFConfig(budget=20, max_rank=8),
                                     show_progress=False)
    ranks = {name: b.rank for name, b in budget.bases.items()}
    assert sum(ranks.values()) == 20 and len(set(ranks.values())) > 1  # spread unevenly over the 14 targets
    kept = min(float(b.S.min()) for b in budget.bases.values() if b.rank)
    dropped = max(float(full[name].S[ranks[name]]) for name in ranks if ranks[name] < full[name].rank)
    assert kept >= dropped
    assert budget.config.budget == 20 and budget.metadata["rank_policy"]["budget"] == 20


def test_the_default_rank_is_the_one_for_the_kind_of_training_and_the_subspace_records_it(tokenizer, safety_pairs):
    """Left to the default, a plain model is guarded at rank 128 and a LoRA model at rank 64; the saved metadata
    names the rank in force, so a reloaded subspace (or a refresh) keeps it."""
    model = tiny_llama(seed=0, hidden=256)  # every matrix at least 128 wide
    recorded = {}
    for lora in (False, True):
        m = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")) if lora else model
        sub = SafetySubspace.estimate(m, tokenizer, safety_pairs, SPFConfig(onset_tokens=None), show_progress=False)
        recorded[lora] = (sub.metadata["rank_policy"]["rank"], sub.config.rank)
        assert max(b.rank for b in sub.bases.values()) <= recorded[lora][0]
    assert recorded == {False: (128, 128), True: (64, 64)}


def test_select_rank():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert select_rank(S, SPFConfig(rank=8)) == 3  # never beyond the numerical rank
    assert select_rank(S, SPFConfig(rank=2)) == 2
    assert select_rank(S, SPFConfig(rank=100, max_rank=2)) == 3  # max_rank caps only the energy policy
    assert select_rank(S, SPFConfig(rank=None, energy=9 / 14)) == 1  # 9 of 14 units of energy in the first
    assert select_rank(S, SPFConfig(rank=None, energy=0.65)) == 2
    assert select_rank(S, SPFConfig(rank=None, energy=1.0, max_rank=2)) == 2
    assert select_rank(torch.zeros(3), SPFConfig(rank=2)) == 0


def test_save_load_round_trip(model, tokenizer, safety_pairs, tmp_path):
    subspace = SafetySubspace.estimate(model, tokenizer, safety_pairs[:2], SPFConfig(rank=4), show_progress=False)
    subspace.save(tmp_path / "s")
    loaded = SafetySubspace.load(tmp_path / "s", model=model)
    assert loaded.bases.keys() == subspace.bases.keys()
    for name, b in subspace.bases.items():
        for key in "USV":
            assert torch.equal(getattr(loaded[name], key), getattr(b, key))
    meta = json.loads((tmp_path / "s" / "subspace.json").read_text())
    assert meta["num_samples"] == 2 and len(meta["samples_sha256"]) == 64
    assert meta["rank_policy"]["rank"] == 4 and meta["safeft_version"]
    assert meta["model"]["targets"]["model.layers.0.mlp.gate_proj"] == [64, 32]
    assert loaded.samples == subspace.samples
    assert meta["samples"][0].keys() == {"prompt", "refusal"}  # no compliance: the file and hash are as before
    assert meta["samples_sha256"] == samples_sha256([SafetySample(*pair) for pair in safety_pairs[:2]])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        subspace.save(tmp_path / "s")  # never overwrites without asking
    subspace.save(tmp_path / "s", overwrite=True)


def test_loading_against_another_model_lists_the_mismatch(model, tokenizer, safety_pairs, tmp_path):
    SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=4), show_progress=False).save(tmp_path)
    wider = tiny_llama(hidden=48)
    with pytest.raises(ValueError, match=r"shape mismatch.*model.layers.0.self_attn.q_proj: subspace \(32, 32\) vs "
                                         r"model \(48, 48\)"):
        SafetySubspace.load(tmp_path, model=wider)
    shallower = tiny_llama(layers=1)
    with pytest.raises(ValueError, match=r"7 target\(s\) not in the model: model.layers.1"):
        SafetySubspace.load(tmp_path, model=shallower)


def test_a_subspace_on_other_weights_of_the_same_shape_warns(model, tokenizer, safety_pairs, tmp_path):
    SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=4), show_progress=False).save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SafetySubspace.load(tmp_path, model=tiny_llama(seed=0))  # the same weights: silent
    with pytest.warns(UserWarning, match="estimated on other weights"):
        SafetySubspace.load(tmp_path, model=tiny_llama(seed=1))


def _tamper_tensor(path, name, change):
    tensors = load_file(str(path / "subspace.safetensors"))
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, str(path / "subspace.safetensors"), metadata={"format": "safeft.subspace/1"})


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda p: _tamper_tensor(p, "model.layers.0.mlp.up_proj.U", lambda t: t.index_fill_(0, torch.tensor([0]),
                                                                                          float("nan"))),
     "up_proj' holds NaN or inf"),
    (lambda p: _tamper_tensor(p, "model.layers.1.self_attn.o_proj.V", lambda t: 3 * t),
     "o_proj' has V columns that are not orthonormal"),
    (lambda p: _tamper_tensor(p, "model.layers.0.mlp.up_proj.S", lambda t: -t), "negative singular values"),
    (lambda p: (p / "subspace.safetensors").write_bytes((p / "subspace.safetensors").read_bytes()[:500]),
     "truncated or corrupt"),
    (lambda p: (p / "subspace.json").write_text((p / "subspace.json").read_text().replace("pipe bomb", "cake")),
     "do not match their recorded hash"),
    (lambda p: (p / "subspace.json").write_text("{"), "cannot read the subspace"),
])
def test_tampered_or_corrupt_subspace_files_are_refused_by_name(model, tokenizer, safety_pairs, tmp_path, tamper,
                                                                message):
    SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=4), show_progress=False).save(tmp_path)
    tamper(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        SafetySubspace.load(tmp_path)
    assert str(tmp_path) in str(error.value) and "re-estimate" in str(error.value)


def test_bad_inputs_give_clear_errors(model, tokenizer, safety_pairs, tmp_path):
    with pytest.raises(ValueError, match="no safety samples"):
        SafetySubspace.estimate(model, tokenizer, [], SPFConfig(rank=4))
    with pytest.raises(ValueError, match="empty prompt or refusal"):
        SafetySubspace.estimate(model, tokenizer, [("How do I hurt someone?", "  ")], SPFConfig(rank=4))
    with pytest.raises(ValueError, match=r"rank 20 exceeds the smaller dimension .*k_proj 16x32"):
        SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=20))
    with pytest.raises(ValueError, match="no target matrices match"):
        SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=4, target_modules=["nope"]))
    with pytest.raises(ValueError, match="no chat template.*chat_template"):
        SafetySubspace.estimate(model, byte_tokenizer(chat_template=None), safety_pairs[:1], SPFConfig(rank=4))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=4), show_progress=False)
    with pytest.raises(FileNotFoundError, match="not a saved subspace"):
        SafetySubspace.load(tmp_path)


@pytest.mark.parametrize("kwargs, field", [
    ({"rank": 0}, "rank"), ({"rank": None, "energy": 1.5}, "energy"),
    ({"rank": 4, "energy": 0.9}, "not rank and energy"), ({"budget": 0}, "budget"),
    ({"energy": 0.9, "budget": 8}, "not energy and budget"),
    ({"side": "up"}, "side"), ({"mode": "sometimes"}, "mode"), ({"project": "weights"}, "project"),
    ({"refresh_every": -1}, "refresh_every"), ({"max_rank": 0}, "max_rank"), ({"onset_tokens": 0}, "onset_tokens"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SPFConfig(**kwargs)


def test_hub_style_save_load_card_and_push(model, tokenizer, safety_pairs, tmp_path, monkeypatch):
    import huggingface_hub.hub_mixin

    config = SPFConfig(rank=4, side="left", mode="conflict", project="grad")
    subspace = SafetySubspace.estimate(model, tokenizer, safety_pairs[:2], config, show_progress=False)
    subspace.save_pretrained(tmp_path / "hub")
    loaded = SafetySubspace.from_pretrained(tmp_path / "hub", model=model)
    assert all(torch.equal(loaded[n].V, b.V) for n, b in subspace.bases.items())
    assert (loaded.config.side, loaded.config.mode, loaded.config.project) == ("left", "conflict", "grad")
    card = (tmp_path / "hub" / "README.md").read_text()
    meta = subspace.metadata
    for fact in (meta["model"]["fingerprint"], meta["samples_sha256"], "side `left`, mode `conflict`, project `grad`",
                 f"safeft\n{meta['safeft_version']}", "14 matrices, rank 4..4", "library_name: safeft"):
        assert fact in card, fact
    subspace.save(tmp_path / "old")  # a directory written the old way loads the new way
    assert SafetySubspace.from_pretrained(tmp_path / "old").bases.keys() == subspace.bases.keys()

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded[repo_id] = sorted(p.name for p in Path(folder_path).iterdir())
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the fake Hub is reachable
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    subspace.push_to_hub("me/smollm-safety-subspace")
    assert uploaded["me/smollm-safety-subspace"] == ["README.md", "manifest.json", "subspace.json",
                                                    "subspace.safetensors"]


def test_an_onset_estimate_ignores_the_tokens_after_the_onset(tokenizer):
    """The cut after the last labelled token is exact: the same gradient factors as the whole sequences give."""
    from safeft.chat import encode_chat, first_response_tokens, through_last_label
    from safeft.spf.estimate import gradient_factors
    from safeft.spf.targets import find_targets

    model = tiny_llama(seed=0)
    from safeft.testing import SAFETY_PAIRS

    whole = [first_response_tokens(encode_chat(tokenizer, p, r), 4) for p, r in SAFETY_PAIRS]
    cut = [through_last_label(e) for e in whole]
    assert all(len(c.input_ids) < len(w.input_ids) and c.labels == w.labels[:len(c.labels)]
               for c, w in zip(cut, whole))
    targets = find_targets(model)
    full, short = (gradient_factors(model, targets, encoded, tokenizer) for encoded in (whole, cut))
    for name in targets:
        (a, b), (c, d) = full[name].factors(), short[name].factors()
        torch.testing.assert_close(a @ b.T, c @ d.T, rtol=1e-4, atol=1e-6)


def test_estimation_on_a_compiled_model_runs_eagerly_and_leaves_it_compiled(model, tokenizer, safety_pairs):
    """Hooks that differ per target would make dynamo recompile per target until its limit, after which the model
    ran uncompiled for good; estimation runs the compiled model eagerly instead (backend "eager": no codegen)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    plain = SafetySubspace.estimate(model, tokenizer, safety_pairs[:2], SPFConfig(rank=4), show_progress=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    subspace = SafetySubspace.estimate(compiled, tokenizer, safety_pairs[:2], SPFConfig(rank=4), show_progress=False)
    assert subspace.bases.keys() == plain.bases.keys()
    assert all(torch.allclose(subspace[n].S, plain[n].S, rtol=1e-4, atol=1e-6) for n in plain.bases)
    assert not counters["frames"]  # dynamo compiled nothing during estimation
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
    assert counters["frames"]["ok"] > 0 and not counters["recompiles"]  # and compiles as usual afterwards
    torch._dynamo.reset()


def test_overlap_is_one_for_the_same_spans_and_zero_for_orthogonal_ones():
    from safeft.spf.estimate import Basis

    eye = torch.eye(6)
    S = torch.tensor([2.0, 1.0])

    def subspace(u_cols, v_cols):
        return SafetySubspace({"a": Basis(eye[:, u_cols], S, eye[:, v_cols])}, {})

    base = subspace([0, 1], [0, 1])
    rotated = SafetySubspace({"a": Basis(eye[:, [1, 0]], S, (eye[:, [0, 1]] @ torch.tensor([[0.6, -0.8],
                                                                                          [0.8, 0.6]])))}, {})
    assert base.overlap(rotated, "right") == pytest.approx(1.0) == base.overlap(rotated, "two_sided")  # same spans
    moved = subspace([0, 1], [2, 3])
    assert base.overlap(moved, "right") == pytest.approx(0.0) and base.overlap(moved, "left") == pytest.approx(1.0)
    assert base.overlap(moved, "two_sided") == pytest.approx(0.5)
    half = subspace([0, 1], [0, 4])  # one direction kept of two
    assert base.overlap(half, "right") == pytest.approx(0.5)
    other = SafetySubspace({"b": Basis(eye[:, :2], S, eye[:, :2])}, {})
    assert base.overlap(other, "right") == 0.0  # no target shared
