"""`SparseArgs`: the `sparse_*` keys of an Axolotl YAML, derived from `SparseConfig`'s fields.

Each `SparseConfig` field `name` becomes the optional key `sparse_<name>`, with the field's own type and the
description from its `help` metadata, so a new option appears in Axolotl without being written twice; an unset key
takes `SparseConfig`'s default. Axolotl mixes this model into its config class, so the validators here see the
whole YAML and can check the keys that must agree with ours (`adapter`, `optimizer`, `load_in_4bit`,
`base_model`). Pydantic ignores unknown keys, so a mistyped `sparse_*` key is caught here explicitly.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

import torch
from pydantic import BaseModel, Field, create_model, model_validator

from ...config import SparseConfig
from ...model import target_shapes
from ...sizing import allocate_budget
from ..hf_registry import SPARSE_OPTIMIZERS

PREFIX = "sparse_"
ADAPTER = "sparse"
# Keys of the plugin itself, not of SparseConfig.
PLUGIN_KEYS = {"sparse_merge_on_finish", "sparse_save_full_checkpoints"}
CONFIG_KEYS = {PREFIX + field.name: field.name for field in dataclasses.fields(SparseConfig)}
_KEY_PATTERN = re.compile(r"`(" + "|".join(map(re.escape, CONFIG_KEYS.values())) + r")\b")


def yaml_message(error: Exception) -> str:
    """`error`'s message with every backticked SparseConfig field renamed to its YAML key (`density` ->
    `sparse_density`), so errors raised by the core name what the user wrote."""
    return _KEY_PATTERN.sub(lambda match: f"`{PREFIX}{match.group(1)}", str(error))


def sparse_config_from(cfg: Any) -> SparseConfig:
    """The `SparseConfig` of an Axolotl config (a validated model or a `DictDefault`): its `sparse_*` keys that
    are set; `ValueError` naming the YAML key when a value is invalid."""
    values = {name: _value(cfg, key) for key, name in CONFIG_KEYS.items() if _value(cfg, key) is not None}
    try:
        return SparseConfig(**values)
    except ValueError as err:
        raise ValueError(yaml_message(err)) from None


def _value(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


class _SparseChecks(BaseModel):
    """The plugin's own key and the cross-key checks; `SparseArgs` adds one field per `SparseConfig` field."""

    sparse_merge_on_finish: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "After training, also write OUTPUT_DIR/merged: the base with the adapter folded in "
            "(what `sparse-merge merge` writes), loadable with plain transformers."
        },
    )
    sparse_save_full_checkpoints: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "Keep a full copy of the model in every checkpoint-N, beside the adapter (as without the "
            "plugin). By default checkpoints hold the adapter and the Trainer's state only, and resume from them."
        },
    )

    @model_validator(mode="before")
    @classmethod
    def check_sparse_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key in data:
            if key.startswith(PREFIX) and key not in CONFIG_KEYS and key not in PLUGIN_KEYS:
                close = difflib.get_close_matches(key, [*CONFIG_KEYS, *PLUGIN_KEYS], n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"allowed: {sorted([*CONFIG_KEYS, *PLUGIN_KEYS])}"
                raise ValueError(f"Unknown key `{key}` for sparse_plugin.SparsePlugin; {hint}")
        return data

    @model_validator(mode="before")
    @classmethod
    def check_adapter(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("adapter") not in (None, ADAPTER):
            raise ValueError(
                f"`adapter: {data['adapter']}` cannot be combined with sparse_plugin.SparsePlugin, which trains its own "
                f"sparse adapter; remove `adapter` (or write `adapter: {ADAPTER}`), or remove the plugin to train {data['adapter']}."
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def quantize_with_bitsandbytes(cls, data: Any) -> Any:
        """`load_in_4bit`/`load_in_8bit` with our adapter: give the loader the bitsandbytes config that Axolotl
        builds only for `adapter: qlora`/`lora` (the QLoRA recipe: NF4, double quantisation), unless
        `model_kwargs.quantization_config` is given. (Axolotl itself refuses a quantized base without an adapter,
        hence `adapter: sparse` in such configs.)"""
        if not isinstance(data, dict) or not (data.get("load_in_4bit") or data.get("load_in_8bit")):
            return data
        key = "overrides_of_model_kwargs" if "overrides_of_model_kwargs" in data else "model_kwargs"
        model_kwargs = dict(data.get(key) or {})
        if "quantization_config" not in model_kwargs:
            if data.get("load_in_8bit"):
                quantization = {"load_in_8bit": True}
            else:
                dtype = (
                    "bfloat16" if data.get("bf16") in (True, "auto") else "float16" if data.get("fp16") else "float32"
                )
                quantization = {
                    "load_in_4bit": True,
                    "bnb_4bit_quant_type": "nf4",
                    "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": dtype,
                    **(data.get("bnb_config_kwargs") or {}),
                }
            model_kwargs["quantization_config"] = {"quant_method": "bitsandbytes", **quantization}
        return {**data, key: model_kwargs}

    @model_validator(mode="after")
    def check_sparse_config(self):
        config = sparse_config_from(self)
        optimizer = _value(self, "optimizer")
        optimizer = str(getattr(optimizer, "value", optimizer))  # Axolotl's own names are an Enum
        if optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(
                f"`optimizer: {optimizer}` does not run sparse selection; set `optimizer: spiel_sm3` "
                "(SM3, needed by `sparse_regrow: ma`) or `optimizer: spiel_adamw`."
            )
        if config.method == "spiel" and config.regrow == "ma" and optimizer != "spiel_sm3":
            raise ValueError(
                f"`sparse_regrow: ma` scores positions by SM3's accumulators, which `optimizer: {optimizer}` does not "
                "keep; set `optimizer: spiel_sm3` or `sparse_regrow: ag`."
            )
        return self

    @model_validator(mode="after")
    def check_targets_and_budget(self):
        """Resolve `sparse_target_modules`, `sparse_target_parameters` and the budget on the base model built on the meta device (no
        weights), so a wrong target fails now rather than after the datasets are prepared."""
        base = _value(self, "base_model_config") or _value(self, "base_model")
        model = _meta_model(base, bool(_value(self, "trust_remote_code")))
        if model is None:
            return self  # not readable now: loading the model reports that, and post_model_load checks again
        config = sparse_config_from(self)
        try:
            allocate_budget(list(target_shapes(model, config).values()), config)
        except ValueError as err:
            raise ValueError(yaml_message(err)) from None
        return self


def _meta_model(name_or_path: str | None, trust_remote_code: bool) -> torch.nn.Module | None:
    """The architecture of `name_or_path` with meta tensors, or None when its config cannot be read as a
    causal LM (an unreachable hub id, a model class AutoModelForCausalLM does not know)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def _derived_fields() -> dict[str, tuple]:
    """`sparse_<name>: <type of name> | None = None`, described by the field's `help`, for each field."""
    types = typing.get_type_hints(SparseConfig)
    helps = {item.name: item.metadata["help"] for item in dataclasses.fields(SparseConfig)}
    return {
        key: (types[name] | None, Field(default=None, json_schema_extra={"description": helps[name]}))
        for key, name in CONFIG_KEYS.items()
    }


SparseArgs = create_model(
    "SparseArgs",
    __base__=_SparseChecks,
    __module__=__name__,
    __doc__="Axolotl input args of sparse_plugin.SparsePlugin: `sparse_<field>` for every SparseConfig field.",
    **_derived_fields(),
)
