"""Generation: prompt positions are edited once, at prefill; decode steps cost what the base model costs."""

import pytest
import torch
from conftest import greedy_by_hand, padded_batch, tiny_model
from peft import get_peft_model

from peft_reft import ReftConfig, ReftLayer

NEW = 6


def _model(positions="f2+l2", dtype=torch.float32, **kwargs):
    kwargs = {"share_weights": False, **kwargs}
    config = ReftConfig(layers=[0, 2], low_rank_dimension=4, positions=positions, init_weights=False, **kwargs)
    torch.manual_seed(11)
    model = get_peft_model(tiny_model().to(dtype), config).eval()
    with torch.no_grad():  # make the edit strong enough to change greedy choices
        for name, param in model.named_parameters():
            if "learned_source" in name:
                param.mul_(8.0)
    return model


def _greedy(model, ids, mask, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         **kwargs)
    return out[:, ids.shape[1]:]


def _no_cache_reference(model, prompt, everything):
    """Greedy decoding re-running the whole sequence each step; the prompt's f2+l2 given explicitly."""
    n = prompt.shape[1]
    return greedy_by_hand(model, prompt, NEW, None if everything else torch.tensor([[[0, 1], [n - 2, n - 1]]]))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["f2+l2", "all"])
@pytest.mark.parametrize("component", ["block_output", "attention_output", "mlp_output"])
def test_generation_equals_no_cache_reference(positions, component, use_cache):
    model = _model(positions, component=component)
    ids, mask = padded_batch([7], seed=4)
    expected = _no_cache_reference(model, ids, everything=positions == "all")
    assert torch.equal(_greedy(model, ids, mask, use_cache=use_cache), expected)
    with model.disable_adapter():
        base = _greedy(model, ids, mask)
    assert not torch.equal(base, expected)  # the adapter matters for this test to mean anything


@pytest.mark.parametrize("component", ["block_output", "mlp_output"])
def test_prompt_positions_are_edited_in_prefill_only(component):
    model = _model(component=component)
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, ReftLayer))
    layer.reft_interventions["default"][0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    ids, mask = padded_batch([7, 5], side="left", seed=4)
    _greedy(model, ids, mask)
    assert seen == [(2, 2, 32)]  # one call, on the 2 first-window tokens of each prompt; none in the decode steps


def test_all_positions_edit_every_generated_token():
    model = _model("all")
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, ReftLayer))
    layer.reft_interventions["default"][0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    ids, mask = padded_batch([7], seed=4)
    _greedy(model, ids, mask)
    assert seen == [7] + [1] * (NEW - 1)


@pytest.mark.parametrize("positions", ["f2+l2", "l3", "all"])
def test_batched_left_padded_equals_each_prompt_alone(positions):
    model = _model(positions)
    lengths = [7, 3, 5]
    ids, mask = padded_batch(lengths, side="left", seed=8)
    batched = _greedy(model, ids, mask)
    for row, n in enumerate(lengths):
        alone = _greedy(model, ids[row:row + 1, -n:], mask[row:row + 1, -n:])
        assert torch.equal(batched[row], alone[0]), row


def test_explicit_locations_equal_derived_in_generate():
    model = _model()
    ids, mask = padded_batch([7, 4], side="left", seed=8)
    # left padding: row 1 starts at index 3
    locations = torch.tensor([[[0, 1], [5, 6]], [[3, 4], [5, 6]]])
    assert torch.equal(_greedy(model, ids, mask, intervention_locations=locations), _greedy(model, ids, mask))


def test_beam_search_and_num_return_sequences():
    model = _model()
    ids, mask = padded_batch([7, 4], side="left", seed=8)
    beams = _greedy(model, ids, mask, num_beams=3, num_return_sequences=2)
    assert beams.shape == (4, NEW)
    for row, n in enumerate([7, 4]):
        alone = _greedy(model, ids[row:row + 1, -n:], mask[row:row + 1, -n:], num_beams=3, num_return_sequences=2)
        assert torch.equal(beams[2 * row:2 * row + 2], alone)
    with model.disable_adapter():  # the adapter changes the beams, so the comparison above means something
        assert not torch.equal(_greedy(model, ids, mask, num_beams=3, num_return_sequences=2), beams)


def test_positional_input_ids_equal_keyword_input_ids():
    model = _model()
    ids, mask = padded_batch([7], seed=4)
    positional = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(positional[:, ids.shape[1]:], _no_cache_reference(model, ids, everything=False))


def test_bf16_base_model_keeps_float32_interventions_and_generates():
    model = _model(dtype=torch.bfloat16)
    for name, param in model.named_parameters():  # the base in bf16, the interventions stay float32
        assert param.dtype == (torch.float32 if ".reft_interventions." in name else torch.bfloat16), name
    ids, mask = padded_batch([7], seed=4)
    assert torch.equal(_greedy(model, ids, mask), _no_cache_reference(model, ids, everything=False))
    model.to(torch.bfloat16)  # casting everything, adapter included, still works (R is orthonormalised in fp32)
    assert torch.equal(_greedy(model, ids, mask), _no_cache_reference(model, ids, everything=False))


def test_unsupported_generate_options_are_rejected():
    model = _model()
    ids, mask = padded_batch([5], seed=2)
    with pytest.raises(ValueError, match=r"does not support `generate\(..., prefill_chunk_size=...\)`"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, prefill_chunk_size=2)


@pytest.mark.parametrize("mode", [{"num_beams": 3, "num_return_sequences": 2}, {"do_sample": True, "top_k": 5}])
def test_beams_and_sampling_give_the_same_with_and_without_cache(mode):
    model = _model()
    ids, mask = padded_batch([7, 5], side="left", seed=4)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        outputs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0,
                                      use_cache=use_cache, **{"do_sample": False, **mode}))
    assert torch.equal(outputs[0], outputs[1])
    with model.disable_adapter():
        torch.manual_seed(0)
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0,
                               **{"do_sample": False, **mode})
    assert not torch.equal(plain, outputs[0])


def test_assisted_generation_is_refused():
    model = _model()
    ids, mask = padded_batch([7], seed=4)
    with pytest.raises(ValueError, match=r"ReFT does not support `generate\(..., assistant_model=...\)`"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, assistant_model=tiny_model())


@pytest.mark.parametrize("entry", ["generate_batch", "init_continuous_batching", "continuous_batching_context_manager"])
def test_continuous_batching_is_refused_when_called(entry):
    model = get_peft_model(tiny_model(), ReftConfig(layers=[1], positions="f1+l1")).eval()
    with pytest.raises(ValueError, match=rf"ReFT adapters do not support transformers' continuous batching "
                                         rf"\(`{entry}`.*Use `PeftModel.generate` with a padded batch"):
        getattr(model, entry)([[5, 6, 7]])
