"""SparseConfig validation and json round trip."""

import dataclasses
import json

import pytest

from sparse_plugin import SparseConfig


def test_defaults_and_round_trip():
    config = SparseConfig(lora_rank_equivalent=16, target_modules=["q_proj", "v_proj"], seed=3)
    assert config.method == "spiel" and config.values_dtype == "float32" and config.store_base_values
    assert SparseConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"density": 0.1, "method": "lora"}, "`method` must be one of 'spiel', 'smt', 'sift'; got 'lora'"),
        ({}, "exactly one of `density`, `num_params`, `lora_rank_equivalent` \\(got none\\)"),
        ({"density": 0.1, "num_params": 10}, "\\(got `density`, `num_params`\\)"),
        ({"density": 0.0}, "`density` must be a number in \\(0, 1\\], got 0.0"),
        ({"density": 1.5}, "`density` must be a number in \\(0, 1\\]"),
        ({"density": True}, "`density` must be a number"),
        ({"num_params": -3}, "`num_params` must be a positive int, got -3"),
        ({"lora_rank_equivalent": 2.5}, "`lora_rank_equivalent` must be a positive int"),
        ({"density": 0.1, "values_dtype": "int8"}, "`values_dtype` must be one of"),
        ({"density": 0.1, "forward_strategy": "fast"}, "`forward_strategy` must be one of"),
        (
            {"density": 0.1, "initial_positions": "gradient"},
            "`initial_positions` must be one of .random., .magnitude.",
        ),
        ({"density": 0.1, "target_modules": "q_proj("}, "`target_modules` 'q_proj\\(' is neither"),
        ({"density": 0.1, "target_modules": []}, "`target_modules` must be"),
        ({"density": 0.1, "target_modules": ["q_proj", 3]}, "`target_modules` must be"),
        ({"density": 0.1, "seed": "1"}, "`seed` must be an int"),
        ({"density": 0.1, "store_base_values": "yes"}, "`store_base_values` must be true or false"),
    ],
)
def test_invalid_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseConfig(**kwargs)


def test_density_one_and_regex_targets_are_allowed():
    assert SparseConfig(density=1).density == 1.0
    assert SparseConfig(density=0.5, target_modules=r".*\.(q|v)_proj").target_modules == r".*\.(q|v)_proj"


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="Unknown SparseConfig field\\(s\\) \\['rank'\\]"):
        SparseConfig.from_dict({"density": 0.1, "rank": 4})


def test_each_field_has_help_and_the_docstring_lists_it():
    """The help metadata is the one source: the docstring's Args (and Axolotl's key descriptions) come from it."""
    for item in dataclasses.fields(SparseConfig):
        assert item.metadata["help"], item.name
        assert f"        {item.name} (`" in SparseConfig.__doc__, item.name
    assert "        density (`float`, *optional*): share of each targeted weight matrix" in SparseConfig.__doc__
    assert "        seed (`int`, defaults to `0`): seed of the random initial indices." in SparseConfig.__doc__
