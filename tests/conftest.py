"""Shared fixtures (tiny random Llamas, a tokenizer) and the Triton interpreter default. The repository root is on
sys.path (pytest's `pythonpath` in pyproject.toml), so tests import `tools.*` as a package."""

import os

# Triton kernels are tested on CPU tensors through the interpreter; it must be set before triton is imported.
# Only a default: an explicit TRITON_INTERPRET=0 (tools/gpu_check.sh) compiles them for the GPU instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A 2-layer random Llama with awkward (non-power-of-two) sizes, built in code: no download."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            "vocab_size": 97,
            "hidden_size": 48,
            "intermediate_size": 80,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": False,
            **overrides,
        }
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A saved tiny Llama (model.safetensors + config) and the model object it came from."""
    model = tiny_llama()
    path = tmp_path / "base"
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def tiny_tokenizer():
    """A word-level tokenizer over `w0`..`w89` plus specials, sized for `tiny_llama`'s 97-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(90)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
