"""Fine-tune a chat model with TRL's SFTTrainer and SPF: full fine-tuning, or LoRA with --lora.

    python examples/trl_sft.py --model PATH_TO_ALIGNED_MODEL [--lora] [--data train.jsonl]
    python examples/trl_sft.py --tiny            # a tiny random model, in seconds (what CI runs)

The data is a JSONL file of {"messages": [...]} or {"prompt", "response"} rows (default: the built-in `facts` task).
"""

import argparse

from trl import SFTConfig, SFTTrainer

from safeft import SafetySubspace, SPFCallback, SPFConfig, freeze_unguarded
from safeft.data import builtin_safety_samples
from safeft.data.examples import to_dataset
from safeft.data.loaders import load_jsonl
from safeft.data.tasks import load_task
from safeft.models import load_model
from safeft.testing import byte_tokenizer, tiny_llama

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default", help="an aligned chat model (directory); default SmolLM2-135M")
parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (a smoke test)")
parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of the full model")
parser.add_argument("--data", help="training data (JSONL); default: the built-in facts task")
parser.add_argument("--out", default="runs/example-trl")
args = parser.parse_args()

model, tokenizer = (tiny_llama(), byte_tokenizer()) if args.tiny else load_model(args.model)
data = to_dataset(load_jsonl(args.data) if args.data else load_task("facts").train)

# LoRA: wrap first, so that the subspace is estimated on the model it guards (LoRA's defaults: rank 64, left side)
if args.lora:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))

# 1. the safety subspace of the aligned model, from (harmful request, refusal) pairs
config = SPFConfig(rank=4) if args.tiny else SPFConfig()  # rank 128, right side, always, update (full fine-tuning)
subspace = SafetySubspace.estimate(model, tokenizer, builtin_safety_samples(20), config)

# 2. train as usual; SPF is one callback
if not args.lora:
    freeze_unguarded(model, subspace)  # what SPF cannot project (norm weights, embeddings) stays put
sft_args = SFTConfig(output_dir=args.out, max_steps=2 if args.tiny else 40, per_device_train_batch_size=4,
                     learning_rate=2e-4 if args.lora else 5e-5, logging_steps=1, report_to="none",
                     save_strategy="no", max_length=256, bf16=False, use_cpu=args.tiny)
trainer = SFTTrainer(model=model, args=sft_args, train_dataset=data, processing_class=tokenizer,
                     callbacks=[SPFCallback(subspace, config)])
trainer.train()
trainer.save_model(args.out)
print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith("spf/")})
