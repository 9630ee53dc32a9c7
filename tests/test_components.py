"""`component="attention_output"` / `"mlp_output"`: the edit lands on the output of the layer's attention / MLP
submodule (checked against the independent reference on several architectures), survives gradient checkpointing
(both checkpoint flavours, and several forward passes before their backward passes), and is undone by `unload`."""

import pytest
import torch
import torch.utils.checkpoint
from conftest import enable_checkpointing, padded_batch, tiny_config, tiny_model
from peft import PeftModel, get_peft_model
from reference import raw_params, reference_logits
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification, OPTConfig

from peft_reft import ReftConfig

# the child of each architecture's layer that the reference hooks (written out here, not taken from peft_reft)
SUBMODULES = {
    "llama": {"attention_output": "self_attn", "mlp_output": "mlp"},
    "gpt2": {"attention_output": "attn", "mlp_output": "mlp"},
}


def _config(component, **kwargs):
    defaults = {"layers": [1, 3], "low_rank_dimension": 3, "positions": "f2+l2", "share_weights": False,
                "init_weights": False}
    return ReftConfig(component=component, **{**defaults, **kwargs})


def _batch(side="right", prompt_length=3):
    """Rows of 7, 4 and 6 tokens whose first `prompt_length` attended tokens are the prompt."""
    ids, mask = padded_batch([7, 4, 6], side=side, seed=5)
    is_prompt = mask.cumsum(dim=1) <= prompt_length
    labels = torch.where(mask.bool() & ~is_prompt, ids, -100)
    return ids, mask, labels


@pytest.mark.parametrize("arch", list(SUBMODULES))
@pytest.mark.parametrize("component", ["attention_output", "mlp_output"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_component_edit_matches_reference(arch, component, side):
    model = get_peft_model(tiny_model(arch), _config(component)).eval()
    ids, mask, labels = _batch(side)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    expected = reference_logits(tiny_model(arch), raw_params(model), "loreft", ids, mask, labels, 2, 2, False,
                                submodule=SUBMODULES[arch][component])
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)
    block = reference_logits(tiny_model(arch), raw_params(model), "loreft", ids, mask, labels, 2, 2, False)
    assert (got - block)[mask.bool()].abs().max() > 1e-3  # not the block-output edit


def _loss_and_grads(model, batches):
    """Run every batch forward first, then every loss backward (in reverse order), and return the losses and
    the gradients of the trainable parameters."""
    model.zero_grad()
    losses = [model(input_ids=ids, attention_mask=mask, labels=labels).loss for ids, mask, labels in batches]
    for loss in reversed(losses):
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return [loss.item() for loss in losses], grads


@pytest.mark.parametrize("component", ["attention_output", "mlp_output"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(component, use_reentrant):
    # two batches with different prompts (hence different positions) are both run forward before either backward:
    # each recomputation during backward must use the positions of its own forward pass
    base = tiny_model("llama")
    model = get_peft_model(base, _config(component, dropout=0.0)).train()
    batches = [_batch("right"), _batch("left", prompt_length=2)]
    expected_losses, expected_grads = _loss_and_grads(model, batches)

    enable_checkpointing(base, use_reentrant)
    if use_reentrant:
        base.enable_input_require_grads()
    losses, grads = _loss_and_grads(model, batches)
    assert losses == pytest.approx(expected_losses, abs=1e-6)
    assert expected_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-5)
    assert max(g.abs().max() for g in grads.values()) > 0


@pytest.mark.parametrize("component", ["attention_output", "mlp_output"])
def test_checkpoint_recomputation_stops_where_it_stops_without_reft(component):
    """A non-reentrant checkpoint stops recomputing a layer once it has what the layer's backward needs: for a
    Llama layer, before the MLP's last matmul. The edit keeps its own saved tensors, so the recomputation of an edited
    layer stops there too, instead of computing the MLP output again for the edit."""

    def last_matmuls_recomputed(model, base):
        enable_checkpointing(base, False)
        during_backward = []
        handles = [layer.mlp.down_proj.register_forward_hook(
            lambda *_: during_backward.append(torch._C._current_graph_task_id() != -1))
            for layer in base.model.layers]
        ids, mask, labels = _batch()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        for handle in handles:
            handle.remove()
        assert during_backward.count(False) == 4  # every MLP ran in the forward pass
        return during_backward.count(True)  # MLP outputs computed again in the backward pass

    bare = tiny_model("llama").train()
    bare.model.embed_tokens.weight.requires_grad_(True)
    base = tiny_model("llama")
    model = get_peft_model(base, _config(component)).train()
    assert last_matmuls_recomputed(model, base) == last_matmuls_recomputed(bare, bare) == 0


@pytest.mark.parametrize("component", ["attention_output", "mlp_output"])
def test_checkpointing_without_early_stop_gives_the_same_gradients(component):
    """With early stop off, the recomputation runs the whole layer, edit included: the gradients are unchanged."""
    base = tiny_model("llama")
    model = get_peft_model(base, _config(component)).train()
    batches = [_batch("right"), _batch("left", prompt_length=2)]
    expected_losses, expected_grads = _loss_and_grads(model, batches)
    enable_checkpointing(base, False)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        losses, grads = _loss_and_grads(model, batches)
    assert losses == pytest.approx(expected_losses, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-5)


def test_disabled_adapter_under_gradient_checkpointing_backpropagates_as_the_base_model():
    base = tiny_model("llama")
    model = get_peft_model(base, _config("mlp_output")).train()
    enable_checkpointing(base, True)
    base.enable_input_require_grads()  # layer outputs require grad even with every adapter disabled
    ids, mask, labels = _batch()
    with model.disable_adapter():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()  # the recomputed MLPs run without edits, as in the forward pass
    with torch.no_grad():
        expected = tiny_model("llama")(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)


def test_batched_left_padded_generation_equals_each_prompt_alone():
    # (edited in the prefill pass only, and equal to a no-cache reference: tests/test_generate.py)
    model = get_peft_model(tiny_model(), _config("mlp_output")).eval()
    ids, mask = padded_batch([6, 3], side="left", seed=2)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    alone = model.generate(input_ids=ids[1:, -3:], attention_mask=mask[1:, -3:], **kwargs)
    assert torch.equal(batched[1, -4:], alone[0, -4:])


def test_adapters_on_different_components_of_one_layer(tmp_path):
    ids, mask, labels = _batch()
    model = get_peft_model(tiny_model(), _config("mlp_output", layers=[1]), adapter_name="mlp")
    model.add_adapter("attn", _config("attention_output", layers=[1]))
    model.add_adapter("block", _config("block_output", layers=[1]))
    model.eval()
    with torch.no_grad():
        outputs = {}
        for name, submodule in (("mlp", "mlp"), ("attn", "self_attn"), ("block", None)):
            model.set_adapter(name)
            outputs[name] = model(input_ids=ids, attention_mask=mask, labels=labels).logits
            expected = reference_logits(tiny_model(), raw_params(model, name), "loreft", ids, mask, labels, 2, 2,
                                        False, submodule=submodule)
            torch.testing.assert_close(outputs[name][mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "attn", adapter_name="attn").eval()
    assert loaded.peft_config["attn"].component == "attention_output"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, labels=labels).logits, outputs["attn"])

    base = model.unload()  # the hooks on the attention / MLP submodules go with the adapters
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids, attention_mask=mask).logits,
                                   tiny_model()(input_ids=ids, attention_mask=mask).logits)


def test_deleting_the_last_adapter_of_a_component_stops_its_edits():
    ids, mask, labels = _batch()
    model = get_peft_model(tiny_model(), _config("block_output", layers=[1]), adapter_name="block")
    model.add_adapter("mlp", _config("mlp_output", layers=[1]))
    model.set_adapter("block")
    model.delete_adapter("mlp")
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    expected = reference_logits(tiny_model(), raw_params(model, "block"), "loreft", ids, mask, labels, 2, 2, False)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)


def test_architecture_without_the_submodule_is_named_in_the_error():
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                                                     num_hidden_layers=2, num_attention_heads=4, vocab_size=97))
    with pytest.raises(ValueError, match=r"component='mlp_output' is not available for OPTDecoderLayer: it has no "
                                         r"submodule named mlp / feed_forward / ffn \(its submodules: \['self_attn', "
                                         r".*\]\)\. Use component='block_output'"):
        get_peft_model(opt, _config("mlp_output", layers=[0]))
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=97))
    with pytest.raises(ValueError, match=r"not available for BertLayer"):
        get_peft_model(bert, _config("mlp_output", layers=[0], task_type="SEQ_CLS"))


def test_calling_a_submodule_directly_is_refused():
    model = get_peft_model(tiny_model(), _config("mlp_output", layers=[1]))
    mlp = model.base_model.model.model.layers[1].base_layer.mlp
    with pytest.raises(RuntimeError, match="ran outside a call of the PeftModel, so it has no intervention positions"):
        mlp(torch.zeros(1, 2, tiny_config().hidden_size))


def test_deleting_the_last_component_adapter_removes_its_hook():
    model = get_peft_model(tiny_model(), _config("block_output", layers=[1]))
    model.add_adapter("mlp", _config("mlp_output", layers=[1]))
    mlp = model.base_model.model.model.layers[1].base_layer.mlp
    assert len(mlp._forward_hooks) == 1
    model.delete_adapter("mlp")
    assert len(mlp._forward_hooks) == 0
