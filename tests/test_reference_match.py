"""The tuner's logits equal an independent per-token reference (tests/reference.py) for every intervention type,
position grammar, padding side and weight sharing."""

import pytest
import torch
from conftest import padded_batch, tiny_model
from peft import get_peft_model
from reference import raw_params, reference_logits

from peft_reft import ReftConfig

KINDS = ["loreft", "noreft", "consreft", "lobireft", "direft", "nodireft"]


def _batch_with_labels(side, prompt_lengths=(5, 2, 7), completion=3, seed=1):
    lengths = [p + completion for p in prompt_lengths]
    ids, mask = padded_batch(lengths, side=side, seed=seed, seq_len=max(lengths) + 1)
    labels = torch.full_like(ids, -100)
    for row, p in enumerate(prompt_lengths):
        attended = mask[row].nonzero().flatten().tolist()
        for t in attended[p:]:
            labels[row, t] = ids[row, t]
    return ids, mask, labels


def _check(kind, positions, side, share, labels_on, act_fn=None, arch="llama", layers=(1, 3)):
    spec = {"f": 0, "l": 0}
    if positions != "all":
        for part in positions.split("+"):
            spec[part[0]] = int(part[1:])
    ids, mask, labels = _batch_with_labels(side)
    if not labels_on:
        labels = None
    model = get_peft_model(
        tiny_model(arch),
        ReftConfig(layers=list(layers), low_rank_dimension=3, intervention=kind, positions=positions,
                   share_weights=share, init_weights=False, act_fn=act_fn),
    )
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    expected = reference_logits(
        tiny_model(arch), raw_params(model), kind, ids, mask, labels, spec["f"], spec["l"], share,
        everything=positions == "all", act_fn=act_fn,
    )
    attended = mask.bool()
    torch.testing.assert_close(got[attended], expected[attended].to(got.dtype), atol=2e-5, rtol=1e-4)
    return got


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("positions,share", [("f2+l2", False), ("f2+l2", True), ("l1", False)])
def test_every_intervention_type_matches_reference(kind, positions, share):
    _check(kind, positions, "right", share, labels_on=True)


@pytest.mark.parametrize("positions", ["f1", "l3", "f3+l2", "l2+f3", "f7+l7", "all"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("labels_on", [True, False])
def test_position_grammar_padding_and_sharing_match_reference(positions, side, share, labels_on):
    _check("loreft", positions, side, share, labels_on)


@pytest.mark.parametrize(
    "kind,act_fn", [("loreft", None), ("noreft", "relu"), ("direft", "tanh"), ("nodireft", "gelu")]
)
def test_activation_matches_reference(kind, act_fn):
    _check(kind, "f2+l2", "left", False, labels_on=True, act_fn=act_fn)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architectures_match_reference(arch):
    _check("loreft", "f2+l2", "right", False, labels_on=True, arch=arch, layers=(0, 2))


def test_interventions_change_the_output():
    # guards the reference test against a tuner (and reference) that edit nothing
    ids, mask, labels = _batch_with_labels("right")
    base = tiny_model()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
    got = _check("loreft", "f2+l2", "right", False, labels_on=True)
    assert (got - plain).abs().max() > 1e-2


def test_padding_side_does_not_change_results():
    outs = {}
    for side in ("left", "right"):
        ids, mask, labels = _batch_with_labels(side)
        torch.manual_seed(5)
        model = get_peft_model(tiny_model(), ReftConfig(layers=[1, 2], low_rank_dimension=3, positions="f2+l2",
                                                        init_weights=False))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        outs[side] = logits[mask.bool()]
    torch.testing.assert_close(outs["left"], outs["right"], atol=1e-4, rtol=1e-4)
