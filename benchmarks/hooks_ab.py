"""SPF's hook time and SPF/SFT step ratio at one random-weight shape, for the safeft source tree given.

Run it once per source tree to compare two versions of the hooks on the same machine (alternate them, as below):

    git archive 476e918 src | tar -x -C /tmp/prev        # the version to compare against
    for src in $PWD/src /tmp/prev/src; do
        python benchmarks/hooks_ab.py $src 2048,8192,16,32,8,32000 bfloat16 512
    done

Arguments: SRC (a directory holding the ``safeft`` package), SHAPE ``HIDDEN,INTER,LAYERS,HEADS,KV_HEADS,VOCAB``,
DTYPE, TOKENS (one sequence of that many random tokens per step), and optionally ``lora`` (LoRA r = 8 on every
block matrix, as ``safeft finetune --lora-r 8`` sets it up). The model is built on CUDA when present, every
block matrix trained (norms and embeddings frozen), SPF with the library defaults estimated from 20 built-in
samples; 25 paired rounds of one SFT and one SPF step, the first 5 dropped. Prints one line: guards, the median
time inside SPF's hooks (host time), the median steps and the median per-round ratio.
"""

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
sys.path.insert(1, str(Path(__file__).parent))  # overhead.py's model builder; safeft still comes from SRC
import torch  # noqa: E402

from overhead import random_llama, sync  # noqa: E402
from safeft import SafetySubspace, SPFConfig, attach_spf  # noqa: E402  (names every version exports)
from safeft.data import builtin_safety_samples  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(dev):
    base, tok = random_llama(sys.argv[2], getattr(torch, sys.argv[3]))
for p in base.parameters():
    p.requires_grad_(False)
for n, p in base.named_parameters():
    if "layers." in n and "norm" not in n:
        p.requires_grad_(True)
batch = {"input_ids": torch.randint(0, 256, (1, int(sys.argv[4])), device=dev)}
batch["labels"] = batch["input_ids"]

if sys.argv[5:] == ["lora"]:
    from safeft.config import TrainConfig
    from safeft.train import prepare_model

    models = {k: prepare_model(copy.deepcopy(base), TrainConfig(lora_r=8)) for k in ("sft", "spf")}
else:
    models = {"sft": base, "spf": copy.deepcopy(base)}
# estimated on the model SPF guards, as safeft finetune does (under LoRA: the wrapped one, LoRA's default rank)
sub = SafetySubspace.estimate(models["spf"], tok, builtin_safety_samples(20), SPFConfig(), show_progress=False)
opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in models.items()}
proj = attach_spf(opts["spf"], models["spf"], sub, SPFConfig(monitor_every=0)).projector
times = {"sft": [], "spf": []}
for _ in range(25):
    for k in ("sft", "spf"):
        sync()
        t = time.perf_counter()
        models[k](**batch).loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        sync()
        times[k].append(time.perf_counter() - t)
ratios = [b / a for a, b in zip(times["sft"][5:], times["spf"][5:])]
hooks = statistics.median(proj.hook_seconds[5:])
print(f"{sys.argv[1]} {' '.join(sys.argv[5:])}: {len(sub)} targets, hooks median {hooks*1000:.1f} ms, "
      f"SFT step {statistics.median(times['sft'][5:])*1000:.1f} ms, "
      f"SPF step {statistics.median(times['spf'][5:])*1000:.1f} ms, ratio median {statistics.median(ratios):.3f}",
      flush=True)
