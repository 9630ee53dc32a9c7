"""`ReftLayer` (peft_reft/layer.py): positions only inside a call of the PeftModel, per thread; the in-place edit
seen in `output_hidden_states` against the reference; attribute lookup through the wrapped layer. The component
edits (attention / MLP outputs, checkpoint recomputation) are in test_components.py."""

import pytest
import torch
from conftest import padded_batch, tiny_model
from peft import get_peft_model
from reference import raw_params, reference_edit
from test_model import _batch, _config

from peft_reft import ReftLayer


@pytest.mark.parametrize("component", ["block_output", "mlp_output"])
def test_calling_the_wrapped_transformers_model_directly_is_an_error(component):
    model = get_peft_model(tiny_model(), _config(component=component)).eval()
    ids = _batch()["input_ids"]
    model(input_ids=ids)  # a call of the PeftModel leaves nothing behind for the next call to find
    for inner in (model.base_model.model, model.base_model.model.model):  # the causal LM, its backbone (TRL does)
        with pytest.raises(RuntimeError, match=r"ran outside a call of the PeftModel, so it has no intervention "
                                               r"positions: .*Call the PeftModel itself"):
            inner(input_ids=ids)
    with model.disable_adapter():  # no adapter active: the backbone is the base model
        torch.testing.assert_close(model.base_model.model(input_ids=ids).logits, tiny_model()(input_ids=ids).logits)


def test_concurrent_calls_from_threads_each_use_their_own_positions():
    import threading

    model = get_peft_model(tiny_model(), _config(init_weights=False)).eval()
    batches = [padded_batch([7, 4], side=side, seed=seed) for seed in range(3) for side in ("left", "right")]
    with torch.no_grad():
        expected = [model(input_ids=ids, attention_mask=mask).logits for ids, mask in batches]
    failures, results = [], {}

    def work(index):
        ids, mask = batches[index]
        try:
            for _ in range(10):
                with torch.no_grad():
                    results.setdefault(index, []).append(model(input_ids=ids, attention_mask=mask).logits)
        except Exception as error:  # noqa: BLE001  (collected and reported below)
            failures.append(repr(error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    for index, logits in results.items():
        assert len(logits) == 10 and all(torch.equal(x, expected[index]) for x in logits), index


def test_a_misspelt_attribute_of_a_reft_layer_is_its_own_error():
    layer = next(m for m in get_peft_model(tiny_model(), _config()).modules() if isinstance(m, ReftLayer))
    assert layer.self_attn is layer.base_layer.self_attn  # model code reads the wrapped layer's attributes
    with pytest.raises(AttributeError, match=r"'ReftLayer' object has no attribute 'reft_intervention'$"):
        layer.reft_intervention
    with pytest.raises(AttributeError, match=r"'ReftLayer' object has no attribute 'self_atn' \(nor has the wrapped "
                                             r"LlamaDecoderLayer\)"):
        layer.self_atn


def test_output_hidden_states_show_the_edited_block_output():
    model = get_peft_model(tiny_model(), _config(layers=[1], positions="all", init_weights=False)).eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        edited = model(input_ids=ids, output_hidden_states=True).hidden_states
        with model.disable_adapter():
            plain = model(input_ids=ids, output_hidden_states=True).hidden_states
        params = raw_params(model)[1]["first"]  # layer 1's output, edited token by token by the reference
        expected = torch.stack([torch.stack([reference_edit("loreft", params, h.double()) for h in row])
                                for row in plain[2]]).float()
    assert torch.equal(edited[1], plain[1])  # before the edited layer: untouched
    torch.testing.assert_close(edited[2], expected, rtol=1e-5, atol=1e-5)
