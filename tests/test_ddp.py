"""Under DDP (gloo, 2 CPU processes) SPF makes the same update as one process with the same global batch, for every
side and both project modes."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from conftest import BENIGN_PAIRS, spawn_workers
from safeft import SafetySubspace, SPFConfig, attach_spf
from safeft.chat import collate, encode_chat, response_token_loss_sum
from safeft.testing import SAFETY_PAIRS, byte_tokenizer, tiny_llama

STEPS = 3


def global_batch():
    tokenizer = byte_tokenizer()
    return collate([encode_chat(tokenizer, p, r) for p, r in BENIGN_PAIRS], tokenizer.pad_token_id)


def train(model, batch, subspace, config, rows, world_size):
    """SPF-train ``model`` on ``rows`` of the global batch; the loss is scaled so DDP's mean gives the global mean."""
    global_tokens = int((batch["labels"][:, 1:] != -100).sum())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = attach_spf(optimizer, model, subspace, config, keep_trainable=["."])  # every parameter trains
    local = {k: v[rows] for k, v in batch.items()}
    for _ in range(STEPS):
        logits = model(input_ids=local["input_ids"], attention_mask=local["attention_mask"]).logits
        loss_sum, _ = response_token_loss_sum(logits, local["labels"])
        (loss_sum * world_size / global_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    return handle.projector.collectives.calls


CONFIGS = {f"{side}-{project}": {"rank": 4, "side": side, "project": project,
                                  "mode": "conflict" if project == "grad" else "directional"}
           for side in ("left", "right", "two_sided") for project in ("grad", "update")}


def _worker(rank, world_size, workdir):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no hostname lookup that can stall the rendezvous
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))  # a stuck peer fails the test, not the CI run
    try:
        for name, config_kwargs in CONFIGS.items():
            model = tiny_llama(seed=0)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            subspace = SafetySubspace.load(os.path.join(workdir, "subspace"), model=model)
            batch = global_batch()
            per_rank = batch["input_ids"].shape[0] // world_size
            rows = slice(rank * per_rank, (rank + 1) * per_rank)
            calls = train(ddp, batch, subspace, SPFConfig(**config_kwargs), rows, world_size)
            assert calls == 0  # DDP all-reduced the gradients already: SPF needs no collective of its own
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      os.path.join(workdir, f"{name}-rank{rank}.st"))
            del ddp  # freed while its process group lives: a DDP reducer outliving the group can hang on exit
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_matches_single_process_for_every_side_and_project_mode(tmp_path):
    subspace = SafetySubspace.estimate(tiny_llama(seed=0), byte_tokenizer(), SAFETY_PAIRS[:1], SPFConfig(rank=4),
                                       show_progress=False)
    subspace.save(tmp_path / "subspace")
    spawn_workers(_worker, (2, str(tmp_path)))
    for name, config_kwargs in CONFIGS.items():
        single = tiny_llama(seed=0)
        start = {k: v.clone() for k, v in single.state_dict().items()}
        train(single, global_batch(), subspace, SPFConfig(**config_kwargs), slice(None), 1)
        expected = single.state_dict()
        for rank in range(2):
            got = load_file(str(tmp_path / f"{name}-rank{rank}.st"))
            for key, value in expected.items():
                torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}, rank {rank}: {key}")
        assert any(not torch.equal(expected[k], start[k]) for k in start), name  # training did move the weights
