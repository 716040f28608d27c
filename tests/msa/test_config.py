"""Configs: a config's identity (hash, run keys, logged params) survives fields added after runs were recorded."""

import dataclasses
import math

import pytest

from msa.config import ConfigError, ModelConfig, RunConfig, TrainConfig

# The lab's ablations as pipelines/specs/ablations.yaml writes them, and their hashes before any field
# was added: runs recorded under these hashes must still be found.
RECORDED = {
    "baseline": ({}, "ba0fde7dfa751ba7"),
    "transformer": ({"model": {"encoder": "transformer", "pooling": "mean", "fusion": "sum_transformer"}},
                    "a4a7f88ba0c6f1ee"),
    "improved": ({"model": {"encoder": "transformer", "encoder_layers": 2, "pooling": "mean", "mask_padding": True,
                            "fusion": "query_attention"}, "train": {"loss": "huber"}}, "14cb6957c6527823"),
    "attention_fusion": ({"model": {"fusion": "self_attention"}}, "9f76dbc7ad37d5e0"),
}
# ModelConfig's fields when the first runs were recorded
FIRST_FIELDS = ["modalities", "input_layernorm", "encoder", "hidden", "encoder_layers", "heads", "ff_dim", "dropout",
                "pooling", "mask_padding", "fusion"]
NOT_DEFAULT = {"bidirectional": True, "fusion_dim": 8, "rank": 2}


@pytest.mark.parametrize("name", RECORDED)
def test_the_recorded_ablations_keep_their_hashes(name):
    values, recorded = RECORDED[name]
    assert RunConfig.from_dict(values).config_hash() == recorded


def test_every_field_is_either_a_first_field_or_declared_added_later():
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    assert fields[:len(FIRST_FIELDS)] == FIRST_FIELDS
    assert list(ModelConfig._ADDED_LATER) == fields[len(FIRST_FIELDS):], \
        "a field added to ModelConfig must be declared in ModelConfig._ADDED_LATER"
    for f in dataclasses.fields(ModelConfig):
        if f.name in ModelConfig._ADDED_LATER:
            assert f.default is not dataclasses.MISSING, f"{f.name} needs a plain default to be left out at it"
    assert sorted(NOT_DEFAULT) == sorted(ModelConfig._ADDED_LATER)


def test_a_field_added_later_is_left_out_at_its_default_and_written_otherwise():
    default = RunConfig()
    assert list(default.to_dict()["model"]) == FIRST_FIELDS
    assert not any(key.split(".")[1] in ModelConfig._ADDED_LATER for key in default.flat())
    for key, value in NOT_DEFAULT.items():
        changed = RunConfig.from_dict({"model": {key: value}})
        assert changed.to_dict()["model"][key] == value
        assert changed.flat()[f"model.{key}"] == value
        assert changed.config_hash() != default.config_hash(), key
        assert RunConfig.from_dict(changed.to_dict()) == changed
        # written at its default explicitly, it is the same config as not written at all
        assert RunConfig.from_dict({"model": {key: getattr(ModelConfig(), key)}}).config_hash() == \
            default.config_hash()


@pytest.mark.parametrize("key,value,message", [
    ("pooling", "max", "The 'pooling' parameter of ModelConfig must be one of 'last', 'mean', 'attention'. "
                       "Got 'max' instead."),
    ("bidirectional", "yes", "The 'bidirectional' parameter of ModelConfig must be a bool. Got 'yes' instead."),
    ("fusion_dim", 0, "The 'fusion_dim' parameter of ModelConfig must be an int in the range [1, inf]. Got 0 instead."),
    ("rank", 2.5, "The 'rank' parameter of ModelConfig must be an int in the range [1, inf]. Got 2.5 instead."),
])
def test_new_fields_are_validated_with_the_one_message_template(key, value, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{key: value})
    assert str(e.value) == message


@pytest.mark.parametrize("key", ["lr", "weight_decay", "grad_clip", "huber_delta"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_float_field_is_never_infinite_or_nan(key, value):
    with pytest.raises(ConfigError, match=f"The '{key}' parameter of TrainConfig must be (None or )?a float in"):
        TrainConfig(**{key: value})


def test_components_declare_what_they_require_of_the_config():
    with pytest.raises(ConfigError) as e:
        ModelConfig(bidirectional=True, hidden=127, heads=1)
    assert str(e.value) == ("The 'hidden' parameter of ModelConfig must be even for a bidirectional LSTM "
                            "(two halves of hidden/2). Got 127 instead.")
    ModelConfig(encoder="packed_lstm", bidirectional=True, hidden=126, heads=1)
    with pytest.raises(ConfigError) as e:
        ModelConfig(fusion="crossmodal", modalities=("text",))
    assert str(e.value) == ("The 'modalities' parameter of ModelConfig must hold at least 2 modalities for "
                            "cross-modal attention (each attends to the others). Got ['text'] instead.")
    with pytest.raises(ConfigError, match="'hidden' parameter of ModelConfig must be divisible by 'heads'"):
        ModelConfig(fusion="crossmodal", hidden=10, heads=4)
    ModelConfig(fusion="lmf", hidden=10, heads=4)  # multiplicative fusions have no heads
    ModelConfig(fusion="tfn", hidden=10, heads=4)
