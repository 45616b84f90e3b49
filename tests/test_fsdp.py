"""Under FSDP2 (gloo, 2 CPU processes, parameters sharded on dim 0) SPF makes the same update as one process with
the same global batch, for every side and both project modes, full fine-tuning and LoRA, with at most one
all-reduce of its own per optimizer step, of the size the design says; estimating on the sharded model gives the
single-process subspace."""

import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from conftest import BENIGN_PAIRS, spawn_workers
from safeft import SafetySubspace, SPFConfig, attach_spf
from safeft.chat import collate, encode_chat, response_token_loss_sum
from safeft.config import TrainConfig
from safeft.testing import SAFETY_PAIRS, byte_tokenizer, tiny_llama
from safeft.train import prepare_model

STEPS = 3
RANK = 4
LORA_R = 4
CONFIGS = [  # (name, LoRA?, SPF options)
    *[(f"full-{side}-{project}", False, {"side": side, "project": project,
                                         "mode": "conflict" if project == "grad" else "directional"})
      for side in ("left", "right", "two_sided") for project in ("grad", "update")],
    ("full-right-always", False, {"side": "right", "project": "grad", "mode": "always"}),
    *[(f"lora-{side}-{project}", True, {"side": side, "project": project, "mode": "always"})
      for side in ("left", "right", "two_sided") for project in ("grad", "update")],
    ("lora-two_sided-grad-conflict", True, {"side": "two_sided", "project": "grad", "mode": "conflict"}),
    ("lora-left-update-directional", True, {"side": "left", "project": "update", "mode": "directional"}),
]


def global_batch():
    tokenizer = byte_tokenizer()
    return collate([encode_chat(tokenizer, p, r) for p, r in BENIGN_PAIRS], tokenizer.pad_token_id)


def build(lora: bool):
    model = tiny_llama(seed=0)
    return prepare_model(model, TrainConfig(lora_r=LORA_R, seed=0)) if lora else model


def train(model, batch, subspace, config, rows, world_size):
    """SPF-train ``model`` on ``rows`` of the global batch (loss scaled so the gradient mean is the global one);
    return SPF's collectives per step ``[(calls, elements)]`` and its monitor metrics at the end."""
    global_tokens = int((batch["labels"][:, 1:] != -100).sum())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = attach_spf(optimizer, model, subspace, config, keep_trainable=["."])  # every parameter trains
    collectives = handle.projector.collectives
    local = {k: v[rows] for k, v in batch.items()}
    per_step = []
    for _ in range(STEPS):
        collectives.reset()
        logits = model(input_ids=local["input_ids"], attention_mask=local["attention_mask"]).logits
        loss_sum, _ = response_token_loss_sum(logits, local["labels"])
        (loss_sum * world_size / global_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        per_step.append((collectives.calls, list(collectives.elements)))
    return per_step, handle.projector.metrics(measure_loss=False)


def full_state(model) -> dict[str, torch.Tensor]:
    """Return the model's parameters as whole tensors (gathered from the shards)."""
    out = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("._checkpoint_wrapped_module", "")] = value.detach().contiguous().clone()
    return out


def _worker(rank, world_size, workdir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        batch = global_batch()
        per_rank = batch["input_ids"].shape[0] // world_size
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        # estimation on the sharded model: every process factors the same samples and gets the whole subspace
        reference = SafetySubspace.load(os.path.join(workdir, "subspace"))
        sharded = tiny_llama(seed=0)
        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        estimated = SafetySubspace.estimate(sharded, byte_tokenizer(), SAFETY_PAIRS[:2], SPFConfig(rank=RANK),
                                            show_progress=False)
        for target, basis in reference.bases.items():
            got = estimated.bases[target]
            torch.testing.assert_close(got.S, basis.S, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got.U @ got.U.T, basis.U @ basis.U.T, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.V @ got.V.T, basis.V @ basis.V.T, rtol=1e-4, atol=1e-5)
        assert estimated.metadata["model"]["fingerprint"] == reference.metadata["model"]["fingerprint"]
        counts = {}
        for name, lora, options in CONFIGS:
            model = build(lora)
            subspace = SafetySubspace.load(os.path.join(workdir, "subspace"), model=model)
            layers = model.base_model.model.model.layers if lora else model.model.layers
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            counts[name] = train(model, batch, subspace, SPFConfig(rank=RANK, monitor_every=STEPS, **options), rows,
                                 world_size)
            state = full_state(model)
            if rank == 0:
                save_file(state, os.path.join(workdir, f"{name}.st"))
        if rank == 0:
            with open(os.path.join(workdir, "counts.json"), "w") as f:
                json.dump(counts, f)
    finally:
        dist.destroy_process_group()


def expected_elements(name: str, lora: bool, options: dict, subspace) -> int:
    """SPF's design: per target, left ``r n``, two_sided ``r^2``, right ``r`` (conflict tests) or 0 (always);
    LoRA: ``r k`` for B's sketch where the side projects B (always), ``4 r k`` for the conflict tests (U^T B, A V
    and the gradients' or updates' sketches)."""
    total = 0
    for target, basis in subspace.bases.items():
        m, n = subspace.metadata["model"]["targets"][target]
        r = basis.rank
        if lora and options["mode"] != "always":
            total += 4 * r * LORA_R
        elif lora:
            total += r * LORA_R if options["side"] != "right" else 0
        elif options["side"] == "left":
            total += r * n
        elif options["side"] == "two_sided":
            total += r * r
        else:
            total += 0 if options["mode"] == "always" else r
    return total


@pytest.mark.slow
def test_fsdp2_matches_single_process(tmp_path):
    subspace = SafetySubspace.estimate(tiny_llama(seed=0), byte_tokenizer(), SAFETY_PAIRS[:2], SPFConfig(rank=RANK),
                                       show_progress=False)
    subspace.save(tmp_path / "subspace")
    spawn_workers(_worker, (2, str(tmp_path)))
    counts = json.loads((tmp_path / "counts.json").read_text())
    for name, lora, options in CONFIGS:
        single = build(lora)
        start = full_state(single)
        _, metrics = train(single, global_batch(), subspace, SPFConfig(rank=RANK, monitor_every=STEPS, **options),
                           slice(None), 1)
        expected = full_state(single)
        got = load_file(str(tmp_path / f"{name}.st"))
        assert set(got) == set(expected), name
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        assert any(not torch.equal(expected[k], start[k]) for k in start), name  # training moved the weights
        per_step, sharded_metrics = counts[name]
        assert sharded_metrics.keys() == metrics.keys(), name
        for key, value in metrics.items():  # the monitor sums the processes' shares: the same numbers
            assert sharded_metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-6), (name, key)
        size = expected_elements(name, lora, options, subspace)
        for calls, elements in per_step:
            assert calls == (1 if size else 0), (name, calls)
            assert elements == ([size] if size else []), (name, elements)
