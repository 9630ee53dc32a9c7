"""Position grammar and the derivation of positions from a batch."""

import itertools

import pytest
import torch
from reference import reference_positions

from peft_reft.positions import (
    PositionSpec,
    intervention_group_map,
    locations_from_group_map,
    parse_positions,
    positions_per_group,
)


@pytest.mark.parametrize(
    "text,spec",
    [("f7", PositionSpec(7, 0)), ("l1", PositionSpec(0, 1)), ("f3+l2", PositionSpec(3, 2)),
     ("l2+f3", PositionSpec(3, 2)), ("all", PositionSpec(all=True)), (" F3+L2 ", PositionSpec(3, 2))],
)
def test_parse_valid(text, spec):
    assert parse_positions(text) == spec


@pytest.mark.parametrize("text", ["", "f0", "l0+f2", "f3+f2", "x3", "f-1", "f3+l2+f1", "first", "f", "f2l3", 7])
def test_parse_invalid_says_what_is_allowed(text):
    with pytest.raises(ValueError, match=r"positions=.* is not valid\. Use 'fN' .* 'all'"):
        parse_positions(text)


def test_num_groups():
    assert PositionSpec(3, 2).num_groups(share_weights=False) == 2
    assert PositionSpec(3, 2).num_groups(share_weights=True) == 1
    assert PositionSpec(3, 0).num_groups(share_weights=False) == 1
    assert PositionSpec(all=True).num_groups(share_weights=False) == 1


def _derive(spec, shape, **batch):
    return intervention_group_map(spec, False, {"input_ids": torch.zeros(shape, dtype=torch.long), **batch})


def _as_windows(group_map_row, two_groups):
    names = {0: "first", 1: "last"} if two_groups else {0: "first"}
    return {t: names[g] for t, g in enumerate(group_map_row.tolist()) if g >= 0}


@pytest.mark.parametrize("first,last", [(0, 1), (2, 0), (2, 2), (7, 7), (1, 5), (5, 1)])
def test_derived_positions_match_reference_for_all_prompt_lengths_and_masks(first, last):
    torch.manual_seed(0)
    seq_len = 12
    rows, labels_rows = [], []
    for prompt_len, completion_len, hole in itertools.product(range(1, 10), (0, 2), (False, True)):
        mask = torch.zeros(seq_len, dtype=torch.long)
        start = 1  # one left pad token
        mask[start:start + prompt_len + completion_len] = 1
        if hole and prompt_len > 2:
            mask[start + 1] = 0  # a hole inside the prompt
        labels = torch.full((seq_len,), -100)
        if completion_len:
            labels[start + prompt_len:start + prompt_len + completion_len] = 5
        rows.append(mask)
        labels_rows.append(labels)
    mask, labels = torch.stack(rows), torch.stack(labels_rows)
    spec = PositionSpec(first, last)
    group_map = _derive(spec, tuple(mask.shape), attention_mask=mask, labels=labels)
    for b in range(mask.shape[0]):
        expected = reference_positions(mask[b].tolist(), labels[b].tolist(), first, last)
        if first and last:
            assert _as_windows(group_map[b], True) == expected
        else:
            assert set(_as_windows(group_map[b], False)) == set(expected)


def test_short_prompt_rule_is_documented_example():
    # 'f7+l7' on a 3-token prompt: tokens 0, 1 -> first intervention, token 2 -> last
    mask = torch.ones(1, 3, dtype=torch.long)
    group_map = _derive(PositionSpec(7, 7), (1, 3), attention_mask=mask)
    assert group_map.tolist() == [[0, 0, 1]]


def test_all_positions_are_the_attended_tokens():
    mask = torch.tensor([[0, 1, 1, 0, 1]])
    labels = torch.tensor([[-100, -100, 4, 4, 4]])
    group_map = _derive(PositionSpec(all=True), (1, 5), attention_mask=mask, labels=labels)
    assert group_map.tolist() == [[-1, 0, 0, -1, 0]]


def test_no_mask_means_every_token_is_prompt():
    group_map = _derive(PositionSpec(1, 1), (2, 4))
    assert group_map.tolist() == [[0, -1, -1, 1]] * 2


def test_labels_on_first_token_means_no_prompt():
    mask = torch.ones(2, 4, dtype=torch.long)
    labels = torch.tensor([[-100, 5, 5, 5], [5, 5, 5, 5]])
    with pytest.raises(ValueError, match="first attended token already has a label .* positions='all'"):
        _derive(PositionSpec(1, 1), (2, 4), attention_mask=mask, labels=labels)


def test_multi_turn_prompt_is_everything_before_the_last_reply():
    # system/user (-100), reply 1 (supervised), user (-100), reply 2 (supervised), right padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 7, -100, -100, 7, 7, -100]])
    group_map = _derive(PositionSpec(1, 2), (1, 9), attention_mask=mask, labels=labels)
    assert group_map.tolist() == [[0, -1, -1, -1, 1, 1, -1, -1, -1]]
    assert reference_positions(mask[0].tolist(), labels[0].tolist(), 1, 2) == {0: "first", 4: "last", 5: "last"}


def test_fully_padded_row_is_allowed_and_untouched():
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    labels = torch.tensor([[-100, -100, 5], [-100, -100, -100]])
    group_map = _derive(PositionSpec(1, 1), (2, 3), attention_mask=mask, labels=labels)
    assert group_map.tolist() == [[0, 1, -1], [-1, -1, -1]]


def test_explicit_locations_two_and_three_dimensional():
    one_group = torch.tensor([[0, 2, -1], [1, 1, -1]])
    group_map = _derive(PositionSpec(2, 0), (2, 4), intervention_locations=one_group)
    assert group_map.tolist() == [[0, -1, 0, -1], [-1, 0, -1, -1]]
    two_groups = torch.tensor([[[0, -1], [3, 0]], [[1, 2], [2, -1]]])
    group_map = _derive(PositionSpec(2, 2), (2, 4), intervention_locations=two_groups)
    # a token listed for both interventions is edited once, by the first
    assert group_map.tolist() == [[0, -1, -1, 1], [-1, 0, 0, -1]]


def test_explicit_locations_errors():
    with pytest.raises(ValueError, match=r"has shape \[2, 3\] but this adapter expects \[2, 2, n_positions\]"):
        _derive(PositionSpec(2, 2), (2, 4), intervention_locations=torch.zeros(2, 3).long())
    with pytest.raises(ValueError, match=r"has shape \[1, 3\] but this adapter expects \[2, n_positions\]"):
        _derive(PositionSpec(2, 0), (2, 4), intervention_locations=torch.zeros(1, 3).long())
    with pytest.raises(ValueError, match=r"index outside \[-1, 3\] for a sequence of length 4"):
        _derive(PositionSpec(2, 0), (1, 4), intervention_locations=torch.tensor([[4]]))
    for bad in (torch.tensor([[1.0]]), torch.tensor([[1]], dtype=torch.uint8), torch.tensor([[True]]), [[1]]):
        with pytest.raises(ValueError, match=r"must be a signed integer tensor of token indices, -1 for an empty "
                                             r"slot \(torch.long\); got"):
            _derive(PositionSpec(2, 0), (1, 4), intervention_locations=bad)
    for dtype in (torch.int8, torch.int16, torch.int32):  # any signed integer type works, -1 included
        group_map = _derive(PositionSpec(2, 0), (1, 4), intervention_locations=torch.tensor([[2, -1]], dtype=dtype))
        assert group_map.tolist() == [[-1, -1, 0, -1]]


def test_non_2d_mask_is_rejected():
    with pytest.raises(ValueError, match=r"2-D attention_mask of shape \[1, 3\], got one of shape \[1, 1, 3, 3\]"):
        _derive(PositionSpec(1, 0), (1, 3), attention_mask=torch.ones(1, 1, 3, 3))


@pytest.mark.parametrize("share", [False, True])
def test_locations_round_trip_through_group_map(share):
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    spec = PositionSpec(2, 2)
    group_map = _derive(spec, (3, 7), attention_mask=mask) if not share else intervention_group_map(
        spec, True, {"input_ids": torch.zeros(3, 7, dtype=torch.long), "attention_mask": mask})
    locations = locations_from_group_map(group_map, spec.num_groups(share))
    if share:
        assert locations.tolist() == [[[1, 2, 5, 6]], [[0, 1, 2, -1]], [[-1, -1, -1, -1]]]
    else:
        assert locations.tolist() == [[[1, 2], [5, 6]], [[0, 1], [2, -1]], [[-1, -1], [-1, -1]]]
    again = intervention_group_map(spec, share, {"input_ids": torch.zeros(3, 7, dtype=torch.long),
                                                 "intervention_locations": locations})
    assert torch.equal(again, group_map)
    # the static width the model uses (no host read) pads with -1
    widths = positions_per_group(spec, share, 7)
    assert widths == ([4] if share else [2, 2])
    assert torch.equal(locations_from_group_map(group_map, spec.num_groups(share), widths[0]), locations)
    wider = locations_from_group_map(group_map, spec.num_groups(share), 6)
    assert wider.shape[-1] == 6 and (wider[..., locations.shape[-1]:] == -1).all()


def test_positions_per_group():
    assert positions_per_group(PositionSpec(7, 7), False, 100) == [7, 7]
    assert positions_per_group(PositionSpec(7, 7), True, 100) == [14]
    assert positions_per_group(PositionSpec(7, 7), True, 10) == [10]
    assert positions_per_group(PositionSpec(0, 3), False, 100) == [3]
    assert positions_per_group(PositionSpec(all=True), False, 12) == [12]


@pytest.mark.parametrize("first,last", [(0, 2), (3, 0), (2, 2), (7, 7)])
def test_a_packed_row_gets_each_sequences_windows(first, last):
    """Rows that pack sequences (no attention mask, position_ids restart): every sequence is placed as if alone,
    checked with the reference on each sequence; a completion of two runs keeps the rule per sequence."""
    torch.manual_seed(0)
    for trial in range(20):
        lengths = torch.randint(1, 9, (int(torch.randint(1, 5, (1,))),)).tolist()
        labels, expected, offset = [], {}, 0
        for n in lengths:
            prompt = int(torch.randint(1, n + 1, (1,)))
            row = [-100] * prompt + [5] * (n - prompt)
            if n - prompt >= 3:
                row[prompt + 1] = -100  # a hole: the completion is the last run of supervised labels
            windows = reference_positions([1] * n, row, first, last)
            expected.update({offset + t: w for t, w in windows.items()})
            labels += row
            offset += n
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        spec = PositionSpec(first, last)
        group_map = intervention_group_map(spec, False, {"input_ids": torch.zeros(1, offset, dtype=torch.long),
                                                         "labels": torch.tensor([labels]),
                                                         "position_ids": position_ids})
        two_groups = bool(first and last)
        group_of = {t: (1 if two_groups and w == "last" else 0) for t, w in expected.items()}
        assert {t: g for t, g in enumerate(group_map[0].tolist()) if g >= 0} == group_of, (lengths, labels)


def test_packed_rows_without_position_ids_are_refused():
    batch = {"input_ids": torch.zeros(1, 6, dtype=torch.long), "cu_seq_lens_q": torch.tensor([0, 3, 6])}
    with pytest.raises(ValueError, match=r"packs several sequences into one row \(varlen kernel arguments, no "
                                         r"attention_mask\), but has no `position_ids`"):
        intervention_group_map(PositionSpec(1, 1), False, batch)
