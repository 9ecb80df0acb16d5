"""sparse_plugin.model_card: the README.md model card save_adapter writes (Hub metadata parsed back with
huggingface_hub's own ModelCard), and the rule that a README it did not write is never overwritten."""

import json
from importlib.metadata import version

import pytest
from adapter_utils import snapshot, trained_model
from huggingface_hub import ModelCard

from sparse_plugin import save_adapter
from sparse_plugin.io import CONFIG_NAME, read_adapter
from sparse_plugin.model_card import CARD_NAME

ARXIV = {"spiel": "2401.16405", "smt": "2405.15525", "sift": "2312.11875"}
SETTINGS = {"spiel": "reselection_steps", "smt": "block_size", "sift": "selection_steps"}


@pytest.mark.parametrize("method", ["spiel", "smt", "sift"])
def test_card_describes_the_adapter_with_valid_hub_metadata(tmp_path, method):
    model = trained_model(method=method)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    card = ModelCard.load(tmp_path / "a" / CARD_NAME)  # huggingface_hub's parser: the YAML header must be valid
    data = card.data.to_dict()
    assert data["library_name"] == "sparse-plugin"
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["pipeline_tag"] == "text-generation"  # LlamaForCausalLM
    assert {"sparse-plugin", "sparse-fine-tuning", method} <= set(data["tags"])
    text = card.text
    assert f"**{meta['num_params']:,d}** trainable values" in text and f"{meta['density']:.4%}" in text
    assert f"arXiv:{ARXIV[method]}" in text and f"arXiv preprint arXiv:{ARXIV[method]}" in text  # and its BibTeX
    assert f"`{SETTINGS[method]}`" in text
    assert f"sparse-plugin {version('sparse-plugin')}" in text
    assert 'load_adapter(model, "path/to/this/adapter")' in text
    assert "sparse-merge merge --base HuggingFaceTB/SmolLM2-135M-Instruct --adapter" in text
    # One row per weight name across layers: the tiny Llama's 2 layers x 7 (or 3 for SMT) Linears
    rows = [line for line in text.splitlines() if line.startswith("| `model.layers.*.")]
    assert len(rows) == len({k.split(".", 3)[3] for k in meta["targets"]}) == (3 if method == "smt" else 7)
    count = sum(t["count"] for k, t in meta["targets"].items() if k.endswith("q_proj.weight"))
    assert any(
        row.startswith("| `model.layers.*.self_attn.q_proj.weight` | 2 | 48x48 | " + f"{count:,d} |") for row in rows
    )


def test_card_names_the_base_revision_and_leaves_a_local_base_out_of_the_metadata(tmp_path, monkeypatch):
    model = trained_model()
    model.config._commit_hash = "0123456789abcdef0123456789abcdef01234567"  # as from_pretrained sets it on Hub models
    (tmp_path / "models" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="models/local")  # a local path, not a repo id
    card = ModelCard.load(tmp_path / "a" / CARD_NAME)
    assert "base_model" not in card.data.to_dict()  # the Hub refuses a base_model it does not have
    assert "`models/local` (revision `0123456789abcdef0123456789abcdef01234567`)" in card.text


def test_a_users_readme_is_never_overwritten(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CARD_NAME).write_text("# My notes\n")
    save_adapter(trained_model(), tmp_path / "a")
    assert (tmp_path / "a" / CARD_NAME).read_text() == "# My notes\n"
    read_adapter(tmp_path / "a")  # the adapter itself was written


def test_our_card_is_rewritten_and_kept_once_its_marker_is_deleted(tmp_path):
    save_adapter(trained_model(), tmp_path / "a", base_model_name_or_path="org/first")
    assert "org/first" in (tmp_path / "a" / CARD_NAME).read_text()
    save_adapter(trained_model(), tmp_path / "a", base_model_name_or_path="org/second")
    card = (tmp_path / "a" / CARD_NAME).read_text()
    assert "org/second" in card and "org/first" not in card
    edited = "\n".join(line for line in card.splitlines() if not line.startswith("<!-- sparse_plugin:")) + "\nMine.\n"
    (tmp_path / "a" / CARD_NAME).write_text(edited)
    save_adapter(trained_model(), tmp_path / "a", base_model_name_or_path="org/third")
    assert (tmp_path / "a" / CARD_NAME).read_text() == edited


def test_an_unreadable_readme_counts_as_the_users(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CARD_NAME).symlink_to(tmp_path / "nowhere")  # a broken link: not ours to replace
    before = snapshot(tmp_path / "a")
    save_adapter(trained_model(), tmp_path / "a")
    assert (tmp_path / "a" / CARD_NAME).is_symlink() and snapshot(tmp_path / "a").keys() - before.keys() == {
        CONFIG_NAME,
        "sparse_adapter.safetensors",
    }
