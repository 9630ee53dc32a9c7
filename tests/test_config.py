"""ReftConfig: defaults, validation messages, JSON round trip."""

import json

import pytest
from peft import PeftConfig
from peft.utils import PeftType

from peft_reft import ReftConfig


def test_defaults():
    config = ReftConfig()
    assert config.peft_type == PeftType.REFT
    assert config.task_type == "CAUSAL_LM"
    assert (config.layers, config.component, config.low_rank_dimension) == ("all", "block_output", 8)
    assert (config.intervention, config.positions, config.share_weights) == ("loreft", "f7+l7", True)
    assert (config.dropout, config.act_fn, config.init_weights) == (0.0, None, True)


def test_fields_are_documented():
    import dataclasses

    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    own = [f for f in dataclasses.fields(ReftConfig) if f.name not in inherited]
    assert {f.name for f in own} == {
        "layers", "component", "low_rank_dimension", "intervention", "positions", "share_weights", "dropout",
        "act_fn", "init_weights", "target_modules", "exclude_modules", "modules_to_save", "trainable_token_indices",
        "lora_config",
    }
    for f in own:
        assert f.metadata.get("help"), f.name
        if f.name not in ("target_modules", "exclude_modules", "modules_to_save", "trainable_token_indices"):
            assert f"{f.name} (" in ReftConfig.__doc__, f.name


def test_json_round_trip(tmp_path):
    config = ReftConfig(layers=[3, 1], low_rank_dimension=2, intervention="nodireft", positions="l2+f1",
                        share_weights=True, dropout=0.1, act_fn="relu", init_weights=True)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "REFT" and data["layers"] == [1, 3] and data["positions"] == "l2+f1"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ReftConfig)
    assert loaded.peft_type is PeftType.REFT
    for name in ("layers", "low_rank_dimension", "intervention", "positions", "share_weights", "dropout", "act_fn",
                 "init_weights", "task_type"):
        assert getattr(loaded, name) == getattr(config, name)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"task_type": "SEQ_2_SEQ_LM"},
         r"task_type='SEQ_2_SEQ_LM' is not supported; use 'CAUSAL_LM' \(the default\) or 'SEQ_CLS'"),
        ({"layers": []}, r"layers=\[\] must be an int, a non-empty list of ints, or 'all'"),
        ({"layers": "some"}, r"layers='some' must be an int"),
        ({"layers": [1.5]}, r"layers=\[1.5\] must be an int"),
        ({"layers": [2, 2]}, r"layers=\[2, 2\] lists a layer more than once"),
        ({"component": "mlp_input"},
         r"component='mlp_input' is not supported; use one of \('block_output', 'mlp_output', 'attention_output'\)"),
        ({"low_rank_dimension": 0}, r"low_rank_dimension=0 must be an integer >= 1"),
        ({"low_rank_dimension": 2.0}, r"low_rank_dimension=2.0 must be an integer >= 1"),
        ({"intervention": "lora"}, r"intervention='lora' is unknown; use one of \['loreft', 'noreft'"),
        ({"positions": "f3-l3"}, r"positions='f3-l3' is not valid"),
        ({"dropout": 1.0}, r"dropout=1.0 must be a number in \[0, 1\)"),
        ({"dropout": "0.1"}, r"dropout='0.1' must be a number in \[0, 1\), e.g. 0.05"),
        ({"dropout": True}, r"dropout=True must be a number"),
        ({"positions": "f1000000000000000000000"}, r"positions='f1000000000000000000000' is not valid.*"
                                                    r"1 <= N, M <= 1,000,000"),
        ({"act_fn": "swishy"}, r"act_fn='swishy' is not a transformers activation"),
        ({"intervention": "consreft"}, r"init_weights=True cannot give an identity at init: ConsReFT"),
        ({"act_fn": "relu"}, r"init_weights=True cannot give an identity at init: LoReFT with act_fn='relu'"),
        ({"intervention": "direft", "act_fn": "sigmoid"}, r"DiReFT with act_fn='sigmoid' has act\(0\) = 0.5"),
    ],
)
def test_validation_errors_name_field_value_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReftConfig(**kwargs)


def test_task_type_none_becomes_causal_lm():
    # with task_type=None peft would bypass the tuner's forward and silently skip ReFT
    assert ReftConfig(task_type=None).task_type == "CAUSAL_LM"


def test_combinations_that_can_be_identity_are_accepted():
    ReftConfig(intervention="consreft", init_weights=False)
    ReftConfig(intervention="nodireft", act_fn="gelu")
    ReftConfig(intervention="direft", act_fn="relu")
    assert ReftConfig(layers=5).layers == [5]
