"""Applying edits (`peft_reft/edit.py`), the one way `ReftLayer` and the vLLM integration use: each group's tokens
edited by its intervention and nothing else, in place without autograd, gradients through the in-place training path,
and a step of flattened requests (vLLM's layout, one row) edited as the same requests in a padded batch."""

import pytest
import torch
from reference import reference_edit
from torch import nn

from peft_reft.edit import add_edits
from peft_reft.interventions import build_intervention

D = 16


def _interventions(kind="loreft", groups=2):
    torch.manual_seed(0)
    return nn.ModuleList(build_intervention(kind, D, 3, dropout=0.0, act_fn=None, init_weights=False)
                         for _ in range(groups))


def _params(module):
    return {name: value.detach().double() for name, value in module.state_dict().items()}


def _expected(hidden, interventions, kind, where):
    """Token by token: `where[(b, t)] = g`."""
    expected = hidden.double().clone()
    for (b, t), group in where.items():
        expected[b, t] = reference_edit(kind, _params(interventions[group]), hidden[b, t].double())
    return expected.float()


@pytest.mark.parametrize("kind", ["loreft", "nodireft"])
def test_each_group_edits_its_tokens_and_nothing_else_in_place(kind):
    interventions = _interventions(kind)
    hidden = torch.randn(2, 7, D)
    original = hidden.clone()
    # row 0: group 0 at 0, 1; group 1 at 5, 6. row 1: group 0 at 3; group 1 empty
    locations = torch.tensor([[[0, 1], [5, 6]], [[3, -1], [-1, -1]]])
    with torch.no_grad():
        result = add_edits(hidden, interventions, locations)
    assert result.data_ptr() == hidden.data_ptr()  # in place: no copy of the hidden states
    where = {(0, 0): 0, (0, 1): 0, (0, 5): 1, (0, 6): 1, (1, 3): 0}
    torch.testing.assert_close(result, _expected(original, interventions, kind, where), rtol=1e-5, atol=1e-5)
    untouched = [(b, t) for b in range(2) for t in range(7) if (b, t) not in where]
    assert all(torch.equal(result[b, t], original[b, t]) for b, t in untouched)


def test_training_gradients_are_those_of_the_out_of_place_edit():
    interventions = _interventions()
    leaf = torch.randn(2, 6, D, requires_grad=True)
    locations = torch.tensor([[[1, 2], [4, -1]], [[0, -1], [5, 3]]])
    weights = torch.randn(2, 6, D)
    (add_edits(leaf * 1.0, interventions, locations) * weights).sum().backward()
    got = [leaf.grad.clone()] + [p.grad.clone() for p in interventions.parameters()]
    leaf.grad = None
    interventions.zero_grad()

    # out of place, token by token, with torch's own autograd
    rows = []
    for b in range(2):
        tokens = list(leaf[b])
        for group in range(2):
            for t in locations[b, group].tolist():
                if t >= 0:
                    tokens[t] = interventions[group].edited(tokens[t][None])[0]
        rows.append(torch.stack(tokens))
    (torch.stack(rows) * weights).sum().backward()
    expected = [leaf.grad] + [p.grad for p in interventions.parameters()]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_step_of_flattened_requests_is_edited_as_the_padded_batch():
    """vLLM's layout: requests of 3 and 4 tokens one after the other in one row, against the same two requests
    right-padded in a batch."""
    interventions = _interventions()
    first, second = torch.randn(3, D), torch.randn(4, D)
    batch = torch.zeros(2, 4, D)
    batch[0, :3], batch[1] = first, second
    with torch.no_grad():
        batched = add_edits(batch, interventions, torch.tensor([[[0, -1], [2, -1]], [[0, 1], [3, -1]]]))
        step = add_edits(torch.cat([first, second])[None], interventions, torch.tensor([[[0, 3, 4], [2, 6, -1]]]))
    torch.testing.assert_close(step[0], torch.cat([batched[0, :3], batched[1]]), rtol=1e-6, atol=1e-6)


def test_locations_that_do_not_fit_the_groups_are_an_error():
    with pytest.raises(RuntimeError, match=r"ReFT positions of shape \[1, 1, 2\] do not fit 2 intervention\(s\) per "
                                           r"layer\."):
        add_edits(torch.zeros(1, 3, D), _interventions(), torch.tensor([[[0, 1]]]))
