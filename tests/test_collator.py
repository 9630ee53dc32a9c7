"""`ReftDataCollator` (peft_reft/collator.py): the locations it adds are the documented windows of each prompt
(checked against the independent reference), in the layout the adapter expects, and a model called with them and no
labels computes what it computes from the labels."""

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model
from reference import reference_positions

from peft_reft import ReftConfig, ReftDataCollator

# prompt/completion rows as TRL's dataset preparation hands them to its collator (labels -100 on the prompt)
ROWS = [([5, 6, 7, 8, 9], [10, 11]), ([12, 13], [14, 15, 16]), ([17, 18, 19, 20, 21, 22, 23], [24])]


def examples():
    return [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c in ROWS]


@pytest.mark.parametrize("share_weights", [False, True])
def test_locations_are_each_prompts_windows(share_weights):
    config = ReftConfig(positions="f2+l3", share_weights=share_weights)
    batch = ReftDataCollator(config, pad_token_id=0)(examples())
    locations = batch["intervention_locations"]
    assert locations.dim() == (2 if share_weights else 3)  # [B, P] for one intervention, [B, 2, P] for two
    for row in range(len(ROWS)):
        windows = reference_positions(batch["attention_mask"][row].tolist(), batch["labels"][row].tolist(), 2, 3)
        groups = [locations[row]] if share_weights else [locations[row, 0], locations[row, 1]]
        found = [sorted(i for i in group.tolist() if i >= 0) for group in groups]
        if share_weights:
            assert found == [sorted(windows)]
        else:
            assert found == [sorted(i for i, w in windows.items() if w == window) for window in ("first", "last")]


def test_a_model_given_the_locations_computes_what_it_computes_from_the_labels():
    config = ReftConfig(layers=[1, 2], low_rank_dimension=2, positions="f2+l3", init_weights=False)
    model = get_peft_model(tiny_model(), config).eval()
    batch = ReftDataCollator(config, pad_token_id=0)(examples())
    with torch.no_grad():
        from_labels = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).logits
        from_locations = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               intervention_locations=batch["intervention_locations"]).logits
        whole_input = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(from_locations, from_labels)
    assert not torch.allclose(whole_input, from_labels)  # without either, the whole input is the prompt


def test_the_default_collator_needs_the_padding_id():
    with pytest.raises(ValueError, match=r"ReftDataCollator: pass `pad_token_id` \(e.g. tokenizer.pad_token_id\) for "
                                         r"the default TRL collator, or pass your own `collator`"):
        ReftDataCollator(ReftConfig())
