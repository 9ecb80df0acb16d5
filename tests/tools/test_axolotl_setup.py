"""tools/axolotl_setup.py: the chat jsonl the SmolLM2 Axolotl configs train on, and the link to the model."""

import json

from tools import axolotl_setup
from tools.corpora.wordnet import SYSTEM, load_pairs


def test_writes_seeded_chat_splits_and_links_the_model(tmp_path, monkeypatch):
    model = tmp_path / "converted"
    model.mkdir()
    monkeypatch.setattr(axolotl_setup, "model_dir", lambda: model)  # not the 30 s gguf conversion
    out = tmp_path / "local"
    assert axolotl_setup.main(["--train-rows", "50", "--heldout-rows", "7", "--out", str(out)]) == 0

    rows = {
        split: [json.loads(line) for line in (out / f"wordnet_{split}.jsonl").read_text().splitlines()]
        for split in ("train", "heldout")
    }
    assert len(rows["train"]) == 50 and len(rows["heldout"]) == 7
    for row in rows["train"] + rows["heldout"]:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM
    prompts = {split: {r["messages"][1]["content"] for r in rows[split]} for split in rows}
    assert prompts["heldout"] <= {p["prompt"] for p in load_pairs("test")}
    assert not prompts["train"] & {p["prompt"] for p in load_pairs("test")}
    assert (out / "smollm2-135m-instruct").resolve() == model.resolve()

    first = (out / "wordnet_train.jsonl").read_bytes()
    axolotl_setup.main(["--train-rows", "50", "--heldout-rows", "7", "--out", str(out)])
    assert (out / "wordnet_train.jsonl").read_bytes() == first  # seeded: the same file again
