"""The `README.md` model card `save_adapter` writes beside an adapter, as PEFT does.

Hub metadata (library, base model, tags, pipeline) comes from `huggingface_hub.ModelCardData`; the text says what
was trained, how to load and merge it, and what to cite. A card carries a marker line: only a card with it is
rewritten, so a user's own README (or ours with the marker deleted) is never overwritten. Building it is a few
string joins and one YAML dump, cheap enough for every Trainer checkpoint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

CARD_NAME = "README.md"
LIBRARY_NAME = "sparse-plugin"
_MARKER = "<!-- sparse_plugin: this card is rewritten by every save_adapter; delete this line to keep your edits -->"
_MAX_CARD_BYTES = 2**20  # a card we wrote is a few KB; anything larger is not ours, and not worth reading whole

# Settings that shape each method's result (the budget and targets are shown for all).
_METHOD_SETTINGS = {
    "spiel": (
        "regrow",
        "reselection_steps",
        "selection_accumulation_steps",
        "initial_reselection_rate",
        "reselection_schedule",
    ),
    "smt": ("block_size", "warmup_steps"),
    "sift": ("selection_steps",),
}
_COMMON_SETTINGS = (
    "density",
    "num_params",
    "lora_rank_equivalent",
    "target_modules",
    "target_parameters",
    "values_dtype",
    "seed",
)
_METHOD_NAMES = {"spiel": "SpIEL", "smt": "SMT", "sift": "SIFT"}
_CITATIONS = {
    "spiel": (
        "Scaling Sparse Fine-Tuning to Large Language Models (Ansell et al., 2024)",
        "2401.16405",
        (
            "@article{ansell2024scaling,\n  title={Scaling Sparse Fine-Tuning to Large Language Models},\n"
            "  author={Ansell, Alan and Vuli{\\'c}, Ivan and Sterz, Hannah and Korhonen, Anna and Ponti, Edoardo M.},\n"
            "  journal={arXiv preprint arXiv:2401.16405},\n  year={2024}\n}"
        ),
    ),
    "smt": (
        "Sparse Matrix in Large Language Model Fine-tuning (He et al., 2024)",
        "2405.15525",
        (
            "@article{he2024sparse,\n  title={Sparse Matrix in Large Language Model Fine-tuning},\n"
            "  author={He, Haoze and Li, Juncheng Billy and Jiang, Xuan and Miller, Heather},\n"
            "  journal={arXiv preprint arXiv:2405.15525},\n  year={2024}\n}"
        ),
    ),
    "sift": (
        "Sparse is Enough in Fine-tuning Pre-trained Large Language Models (Song et al., 2023)",
        "2312.11875",
        (
            "@article{song2023sparse,\n  title={Sparse is Enough in Fine-tuning Pre-trained Large Language Models},\n"
            "  author={Song, Weixi and Li, Zuchao and Zhang, Lefei and Zhao, Hai and Du, Bo},\n"
            "  journal={arXiv preprint arXiv:2312.11875},\n  year={2023}\n}"
        ),
    ),
}
# The Hub's pipeline for a transformers head class, by class-name suffix; other heads get none.
_PIPELINES = {
    "ForCausalLM": "text-generation",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
}


def is_ours(path: Path) -> bool:
    """Whether `path` is absent or a card this library wrote (with its marker): only those may be (re)written."""
    if not path.exists() and not path.is_symlink():
        return True
    try:
        with open(path, "rb") as fh:
            return _MARKER.encode() in fh.read(_MAX_CARD_BYTES)
    except OSError:  # a broken link or an unreadable file: someone else's, leave it
        return False


def card_writer(
    directory: Path, meta: dict, model_class: str | None = None, base_revision: str | None = None
) -> Callable[[Path], None] | None:
    """A writer of the card for the adapter `meta` describes, or None where `directory` holds a README not ours."""
    if not is_ours(directory / CARD_NAME):
        return None
    text = render(meta, model_class, base_revision)
    return lambda path: path.write_text(text, encoding="utf-8")


def pipeline_tag(model_class: str | None) -> str | None:
    return next((tag for suffix, tag in _PIPELINES.items() if model_class and model_class.endswith(suffix)), None)


def _hub_repo_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id rather than a local path: the Hub refuses a `base_model` it lacks."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or Path(name).exists() or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def render(meta: dict, model_class: str | None = None, base_revision: str | None = None) -> str:
    """The card's text: YAML metadata from `ModelCardData`, then the description."""
    from huggingface_hub import ModelCardData

    method = meta["method"]
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=_hub_repo_id(meta.get("base_model")),
        pipeline_tag=pipeline_tag(model_class),
        tags=[LIBRARY_NAME, "sparse-fine-tuning", method],
    )
    return f"---\n{data.to_yaml()}\n---\n{_MARKER}\n\n" + "\n".join(_body(meta, base_revision)) + "\n"


def _body(meta: dict, base_revision: str | None) -> list[str]:
    method, config, base = meta["method"], meta["config"], meta.get("base_model") or "BASE_MODEL"
    title, arxiv, bibtex = _CITATIONS[method]
    revision = f" (revision `{base_revision}`)" if base_revision else ""
    settings = [*_COMMON_SETTINGS, *_METHOD_SETTINGS[method]]
    if method == "spiel" and config.get("regrow") != "ag":  # gathering steps exist only for SpIEL-AG
        settings.remove("selection_accumulation_steps")
    return [
        f"# {_METHOD_NAMES[method]} sparse adapter for {base}",
        "",
        (
            f"A sparse fine-tuning adapter of `{base}`{revision}, trained with {_METHOD_NAMES[method]} "
            f"([arXiv:{arxiv}](https://arxiv.org/abs/{arxiv})) by sparse-plugin {meta['sparse_plugin_version']}: "
            f"**{meta['num_params']:,d}** trainable values, density **{meta['density']:.4%}** of the targeted weights, "
            f"{len(meta['targets'])} target matrices."
        ),
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| `{name}` | `{config[name]}` |" for name in settings if config.get(name) is not None),
        "",
        "## Targets",
        "",
        "| weights | matrices | shape | values | density |",
        "|---|---:|---|---:|---:|",
        *_target_rows(meta["targets"]),
        "",
        "## Use",
        "",
        "Load it over the base model:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from sparse_plugin import load_adapter",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = load_adapter(model, "path/to/this/adapter")  # or its Hub repo id',
        "```",
        "",
        "Or fold it into a copy of the base's safetensors (streaming, atomic):",
        "",
        "```bash",
        f"sparse-merge merge --base {base} --adapter path/to/this/adapter --output merged",
        "```",
        "",
        "`sparse-merge export-peft` writes it as a PEFT Super-Tuning or SHiRA adapter for stacks that only load PEFT.",
        "",
        "## Citation",
        "",
        f"{title}:",
        "",
        "```bibtex",
        bibtex,
        "```",
    ]


def _target_rows(targets: dict) -> list[str]:
    """One row per weight name with the layer number wildcarded: 7 rows for a 30-layer Llama, not 210."""
    groups: dict[str, list[dict]] = {}
    for key, target in targets.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", key), []).append(target)
    rows = []
    for name, group in groups.items():
        shapes = sorted({"x".join(map(str, t["shape"])) for t in group})
        count, size = sum(t["count"] for t in group), sum(math.prod(t["shape"]) for t in group)
        rows.append(f"| `{name}` | {len(group)} | {', '.join(shapes)} | {count:,d} | {count / size:.4%} |")
    return rows
