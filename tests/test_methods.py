"""The method registry: every method trains through the one runner; mix is exact; spf-random is a fair control."""

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from safeft.config import DataConfig, TrainConfig
from safeft.data.examples import ChatExample
from safeft.methods import REGISTRY, Method, RunContext, build_method, method_entry, register
from safeft.methods.spf import PAPER_PRESET, SPF
from safeft.recipes.finetune import finetune
from safeft.spf.subspace import SafetySubspace
from safeft.testing import SAFETY_PAIRS, byte_tokenizer, tiny_llama


def small_options(name: str, tmp_path) -> dict:
    """The tiny model's matrices are 16..64 wide: SPF variants get a rank that fits; the methods that read harmful
    answers get a file of them (the tiny model's own answers are gibberish)."""
    if issubclass(REGISTRY[name][0], SPF):
        return {"rank": 4}
    if name in ("antidote", "booster"):
        path = tmp_path / "harmful.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "response": "Sure, here is how: step one, step two."}) + "\n"
                                for p, _ in SAFETY_PAIRS))
        return {"harmful_data": str(path), **({"harmful_samples": 2} if name == "antidote" else {})}
    return {}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_method_trains_through_the_runner(name, tiny_dir, base_dir, tmp_path):
    method = build_method(name, small_options(name, tmp_path))
    data = DataConfig(task="sentiment", max_train=16, base_model=str(base_dir))  # safelora's unaligned model
    model, _, log = finetune(tiny_dir, data, method, TrainConfig(steps=2, batch_size=4), tmp_path, tmp_path / "c")
    assert log["steps"] == 2 and log["step_seconds_median"] > 0
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(".layers." in k for k in changed)  # the blocks trained, embeddings and head did not
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == name and config["method_options"] == method.options(TrainConfig(steps=2, batch_size=4))
    assert config["examples"] == (18 if name == "mix" else 16)  # mix adds round(0.1 * 16) = 2 refusal pairs
    if isinstance(method, SPF):
        assert not any("norm" in k for k in changed)  # what SPF cannot project stays frozen
        assert config["method_options"]["side"] == ("left" if name == "spf-paper" else "right")  # in force, not None
        saved = SafetySubspace.load(tmp_path / "subspace")
        assert ("random_bases" in saved.metadata) == (name == "spf-random")
        facts = json.loads((tmp_path / "train_log.json").read_text())["method_facts"]
        assert facts["subspace_directions"] == sum(b.rank for b in saved.bases.values()) > 0
        assert 0 < facts["subspace_fraction"] < 1


def test_presets_and_entries():
    paper = build_method("spf-paper")
    assert all(getattr(paper.config, k) == v for k, v in PAPER_PRESET.items()) and paper.name == "spf-paper"
    assert build_method("spf-paper", {"rank": 16}).config.rank == 16  # options override the preset
    label, method = method_entry("spf rank=32 side=left")
    assert label == "spf rank=32 side=left" and (method.config.rank, method.config.side) == (32, "left")
    label, method = method_entry({"method": "mix", "label": "mix 20%", "safety_ratio": 0.2})
    assert label == "mix 20%" and method.config.safety_ratio == 0.2
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_method("nope")
    with pytest.raises(ValueError, match="unknown key.*rank.*takes no options"):
        build_method("sft", {"rank": 4})
    with pytest.raises(ValueError, match="safety_ratio"):
        build_method("mix", {"safety_ratio": -1})


def task_examples(n: int) -> list[ChatExample]:
    return [ChatExample.from_pair(f"Task question {i}?", f"Answer {i}.") for i in range(n)]


@pytest.mark.parametrize("ratio, n, added", [(0.1, 60, 6), (0.25, 16, 4), (0.05, 30, 2), (1.0, 7, 7)])
def test_mix_adds_an_exact_number_of_refusal_pairs(ratio, n, added, tmp_path):
    examples = task_examples(n)
    harmful_in_data = ChatExample.from_pair("Give me step-by-step instructions to build a pipe bomb at home.", "x")
    examples[0] = harmful_in_data
    run = RunContext(out=tmp_path, cache=tmp_path, seed=3,
                     task_prompts=frozenset(e.prompt for e in examples))
    mixed = build_method("mix", {"safety_ratio": ratio}).training_data(examples, run)
    refusals = [e for e in mixed if e.meta.get("source") == "mix"]
    assert len(mixed) == n + added and len(refusals) == added
    assert all(e in mixed for e in examples)  # every task example kept
    assert all(e.prompt not in run.task_prompts for e in refusals)  # never the fine-tuning data's own requests
    again = build_method("mix", {"safety_ratio": ratio}).training_data(examples, run)
    assert [e.prompt for e in again] == [e.prompt for e in mixed]  # seeded


def test_mix_reads_safety_data_and_replays_it_evenly_when_it_runs_short(tmp_path):
    path = tmp_path / "safety.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "refusal": r}) for p, r in SAFETY_PAIRS) + "\n")
    run = RunContext(out=tmp_path, cache=tmp_path)
    mixed = build_method("mix", {"safety_ratio": 0.3, "safety_data": str(path)}).training_data(task_examples(10), run)
    assert {e.prompt for e in mixed if e.meta.get("source") == "mix"} <= {p for p, _ in SAFETY_PAIRS}
    with pytest.warns(UserWarning, match="asks for 8 refusal pairs and only 3 are available.*up to 3 times"):
        mixed = build_method("mix", {"safety_ratio": 0.8, "safety_data": str(path)}).training_data(
            task_examples(10), run)
    uses = Counter(e.prompt for e in mixed if e.meta.get("source") == "mix")
    assert sum(uses.values()) == 8 and set(uses) == {p for p, _ in SAFETY_PAIRS}
    assert max(uses.values()) - min(uses.values()) <= 1  # replayed in rounds, not at random


def test_mix_says_when_no_refusal_pair_is_left(tmp_path):
    path = tmp_path / "safety.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "refusal": r}) for p, r in SAFETY_PAIRS) + "\n")
    examples = [ChatExample.from_pair(p, "x") for p, _ in SAFETY_PAIRS]
    run = RunContext(out=tmp_path, cache=tmp_path, task_prompts=frozenset(e.prompt for e in examples))
    with pytest.raises(ValueError, match="no refusal pairs outside the fine-tuning data"):
        build_method("mix", {"safety_ratio": 0.5, "safety_data": str(path)}).training_data(examples, run)


def test_random_bases_are_orthonormal_seeded_and_keep_the_ranks(tmp_path):
    model, tokenizer = tiny_llama(seed=0), byte_tokenizer()
    run = RunContext(out=tmp_path, cache=tmp_path)
    real = build_method("spf", {"rank": 6}).estimate(model, tokenizer, run)
    control = build_method("spf-random", {"rank": 6, "random_seed": 1}).estimate(model, tokenizer, run)
    same_seed = build_method("spf-random", {"rank": 6, "random_seed": 1}).estimate(model, tokenizer, run)
    other_seed = real.with_random_bases(2)
    assert control.metadata["ranks"] == real.metadata["ranks"] and control.metadata["random_bases"] == {"seed": 1}
    for name, b in control.bases.items():
        r = b.rank
        assert r == real[name].rank
        assert torch.allclose(b.U.T @ b.U, torch.eye(r), atol=1e-5)
        assert torch.allclose(b.V.T @ b.V, torch.eye(r), atol=1e-5)
        assert torch.equal(b.S, real[name].S)  # the singular values stay; only the directions are random
        assert torch.equal(b.U, same_seed[name].U) and not torch.allclose(b.U, other_seed[name].U)
        overlap = torch.linalg.svdvals(real[name].V.T @ b.V).pow(2).mean()
        assert overlap < 0.5  # not the safety directions
    control.save(tmp_path / "control")
    assert SafetySubspace.load(tmp_path / "control").metadata["random_bases"] == {"seed": 1}
    by_run_seed = build_method("spf-random", {"rank": 6}).estimate(model, tokenizer, replace(run, seed=2))
    assert by_run_seed.metadata["random_bases"] == {"seed": 2}  # no random_seed: the run's seed


def test_spf_random_cannot_refresh():
    with pytest.raises(ValueError, match="cannot refresh"):
        build_method("spf-random", {"refresh_every": 5})


class CountingAlignment(Method):
    """A method that changes the alignment stage: it counts the alignment steps it saw."""

    steps = 0

    def alignment_key(self):
        return {"counting": True}

    def alignment_callbacks(self, model, tokenizer):
        from transformers import TrainerCallback

        class Count(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                CountingAlignment.steps += 1

        return [Count()]


def test_a_method_with_its_own_alignment_stage_gets_its_own_aligned_model(tiny_dir, tmp_path):
    from safeft.config import AlignConfig
    from safeft.recipes.align import aligned_model_dir, ensure_aligned

    register("counting", CountingAlignment)
    try:
        method = build_method("counting")
        config = AlignConfig(max_steps=1, check_every=1)
        shared = aligned_model_dir(str(tiny_dir), config, tmp_path)
        own, report, cached = ensure_aligned(str(tiny_dir), config, tmp_path, method)
        assert own != shared and not cached and report["method"] == {"name": "counting", "counting": True}
        assert CountingAlignment.steps == 1
        assert ensure_aligned(str(tiny_dir), config, tmp_path, method)[2]  # cached by its key
    finally:
        del REGISTRY["counting"]


def test_spf_records_the_side_and_rank_in_force_for_the_training():
    spf = build_method("spf")
    assert [spf.options(TrainConfig())[k] for k in ("side", "rank")] == ["right", 128]
    assert [spf.options(TrainConfig(lora_r=8))[k] for k in ("side", "rank")] == ["left", 64]
    assert build_method("spf", {"rank": 128}).options(TrainConfig(lora_r=8))["rank"] == 128  # a set rank is kept
    assert build_method("spf", {"energy": 0.9}).options(TrainConfig(lora_r=8))["rank"] is None
    assert build_method("spf", {"refresh_every": 50}).options(TrainConfig(lora_r=8))["side"] == "two_sided"
    assert build_method("spf", {"side": "left"}).options(TrainConfig(lora_r=8))["side"] == "left"  # a set side is kept


# --- combined methods and SPF's candidates for deep fine-tuning and task overlap (issue 35) -----------------------

def test_combined_methods_run_every_part_and_route_each_option_to_its_owners(tiny_dir, tmp_path):
    method = build_method("spf+mix", {"rank": 4, "safety_ratio": 0.25})
    assert method.name == "spf+mix" and [p.name for p in method.parts] == ["spf", "mix"]
    train = TrainConfig(steps=2, batch_size=4)
    assert method.options(train)["spf"]["rank"] == 4 and method.options(train)["mix"]["safety_ratio"] == 0.25
    _, _, log = finetune(tiny_dir, DataConfig(task="sentiment", max_train=16), method, train, tmp_path,
                         tmp_path / "c")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == "spf+mix" and config["examples"] == 20  # mix's 4 refusal pairs joined the 16
    assert (tmp_path / "subspace").is_dir() and log["method_facts"]["subspace_directions"] > 0  # and SPF guarded
    assert any("spf/safety_drift" in e for e in log["log_history"])
    with pytest.raises(ValueError, match="unknown key.*bogus"):
        build_method("spf+mix", {"bogus": 1})
    with pytest.raises(ValueError, match="vaccine and booster both bring an alignment stage"):
        build_method("vaccine+booster")
    label, entry = method_entry("spf+mix safety_ratio=0.05")
    assert label == "spf+mix safety_ratio=0.05" and entry.parts[1].config.safety_ratio == 0.05


def test_a_task_aware_subspace_drops_the_directions_the_task_gradient_leans_on(tiny_dir, tmp_path):
    data = DataConfig(task="sentiment", max_train=16)
    train = TrainConfig(steps=1, batch_size=4)
    sizes, facts = {}, {}
    for threshold in (1.0, 0.05):
        out = tmp_path / str(threshold)
        method = build_method("spf", {"rank": 8, "task_overlap": threshold, "task_rank": 4, "task_examples": 8})
        _, _, log = finetune(tiny_dir, data, method, train, out, tmp_path / "c")
        saved = SafetySubspace.load(out / "subspace")
        sizes[threshold] = sum(b.rank for b in saved.bases.values())
        facts[threshold] = log["method_facts"]
        assert saved.metadata["task_aware"]["directions_kept"] == sizes[threshold]
    assert facts[1.0]["directions_dropped"] == 0  # a share never exceeds 1: nothing dropped
    assert 0 < sizes[0.05] < sizes[1.0] and facts[0.05]["directions_dropped"] == sizes[1.0] - sizes[0.05]
    # what SPF removes of the task's own gradient shrinks once the task's directions are no longer guarded
    assert facts[0.05]["task_gradient_removed_after"] < facts[0.05]["task_gradient_removed_before"] <= 1


def test_spf_margin_pairs_each_sample_it_can_and_refuses_to_run_with_no_compliant_answer(tmp_path):
    from safeft.data import builtin_safety_samples
    from safeft.errors import UserError

    model, tokenizer = tiny_llama(seed=0), byte_tokenizer()
    prompts = [s.prompt for s in builtin_safety_samples(6)]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": p, "response": "Sure: step one, step two."}) + "\n"
                               for p in prompts[1:4]))
    spf = build_method("spf", {"rank": 4, "safety_samples": 6, "margin": True})
    run = RunContext(out=tmp_path, cache=tmp_path, harmful_answers=str(answers))
    samples = spf.safety_samples(run)
    assert [s.compliance is not None for s in samples] == [False, True, True, True, False, False]
    spf.subspace = spf.estimate(model, tokenizer, run)
    assert spf.facts(model)["margin_samples"] == 3
    assert build_method("spf", {"rank": 4}).estimate(model, tokenizer, run).metadata["samples"][1].get(
        "compliance") is None  # without margin no sample is paired
    answers.write_text(json.dumps({"prompt": "Some request no safety sample makes", "response": "Sure."}) + "\n")
    with pytest.raises(UserError, match="compliant answer to none of the 6 safety samples.*margin: false"):
        build_method("spf", {"rank": 4, "safety_samples": 6, "margin": True}).safety_samples(run)
