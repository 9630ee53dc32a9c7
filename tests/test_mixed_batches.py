"""Mixed-adapter batches: `adapter_names=[...]` gives each example its own ReFT adapter (or none), as with LoRA."""

import pytest
import torch
from conftest import padded_batch, tiny_model
from peft import get_peft_model

from peft_reft import ReftConfig


def _model():
    torch.manual_seed(3)
    model = get_peft_model(tiny_model(), ReftConfig(layers=[0, 2], low_rank_dimension=4, positions="f2+l2",
                                                    init_weights=False), adapter_name="a")
    model.add_adapter("b", ReftConfig(layers=[1, 3], low_rank_dimension=2, positions="l3", init_weights=False))
    model.add_adapter("c", ReftConfig(layers=[1], low_rank_dimension=2, positions="all", init_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "learned_source" in name:
                param.mul_(8.0)  # strong edits, so that a wrong routing changes greedy tokens
    return model.eval()


NAMES = ["a", "__base__", "b", "a", "c"]


def _separately(model, run):
    """Run each example alone with its adapter set (or the adapters disabled for '__base__')."""
    outputs = []
    for row, name in enumerate(NAMES):
        if name == "__base__":
            with model.disable_adapter():
                outputs.append(run(row))
        else:
            model.set_adapter(name)
            outputs.append(run(row))
    model.set_adapter("a")
    return outputs


def test_mixed_batch_forward_equals_each_group_alone():
    model = _model()
    ids, mask = padded_batch([7, 5, 8, 4, 6], side="left", seed=2)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        alone = _separately(model, lambda r: model(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1]).logits[0])
    for row in range(len(NAMES)):
        attended = mask[row].bool()
        torch.testing.assert_close(mixed[row][attended], alone[row][attended], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the adapters really differ from each other and from the base model
        assert not torch.allclose(alone[0], alone[1], atol=1e-3) and not torch.allclose(alone[2], alone[1], atol=1e-3)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_batch_generate_equals_each_group_alone(num_beams):
    model = _model()
    ids, mask = padded_batch([7, 5, 8, 4, 6], side="left", seed=2)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=num_beams)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **kwargs)
    alone = _separately(model, lambda r: model.generate(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1],
                                                        **kwargs)[0])
    for row in range(len(NAMES)):
        assert torch.equal(mixed[row, -5:], alone[row][-5:]), row


def test_adapter_names_errors():
    model = _model()
    ids, mask = padded_batch([4, 4], seed=1)
    with pytest.raises(ValueError, match=r"adapter_names contains \['zzz'\], which are not adapters of this model"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a", "zzz"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries for a batch of 2 examples"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a", "b", "a"])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"])


@pytest.mark.parametrize("generate", [False, True])
def test_modules_to_save_and_trainable_tokens_follow_each_example(generate):
    """Rows marked "__base__" get the base lm_head and embeddings, rows of adapter "a" its own copies."""
    torch.manual_seed(3)
    config = dict(layers=[0], low_rank_dimension=2, positions="l1", init_weights=False)
    model = get_peft_model(tiny_model(), ReftConfig(modules_to_save=["lm_head"], trainable_token_indices=[5, 6, 7],
                                                    **config), adapter_name="a")
    model.add_adapter("b", ReftConfig(modules_to_save=["lm_head"], trainable_token_indices=[5, 6, 7], **config))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["a"].weight.mul_(3.0)
        model.base_model.model.lm_head.modules_to_save["b"].weight.mul_(-2.0)
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(1.0)
    model.eval()
    ids = torch.tensor([[5, 9, 6, 11], [5, 9, 6, 11], [5, 9, 6, 11]])
    names = ["a", "__base__", "b"]

    def run(batch, adapter_names=None):
        extra = {} if adapter_names is None else {"adapter_names": adapter_names}
        with torch.no_grad():
            if generate:
                return model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=3,
                                      do_sample=False, num_beams=2, pad_token_id=0, **extra)
            return model(input_ids=batch, **extra).logits

    mixed = run(ids, names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = run(ids[row:row + 1])
        else:
            model.set_adapter(name)
            alone = run(ids[row:row + 1])
        if generate:
            assert torch.equal(mixed[row:row + 1], alone), name
        else:
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5, msg=name)


def test_peft_modules_that_take_adapter_names_get_one_hook_once():
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    lora = LoraConfig(r=2, target_modules=["q_proj"])
    model = get_peft_model(tiny_model(), ReftConfig(layers=[1], positions="l2", init_weights=False, lora_config=lora,
                                                    modules_to_save=["lm_head"]), adapter_name="a")
    model.add_adapter("b", ReftConfig(layers=[2], positions="l2", init_weights=False, lora_config=lora,
                                      modules_to_save=["lm_head"]))
    model.eval()

    def hook_counts():
        return [len(m._forward_pre_hooks) for m in model.modules()
                if isinstance(m, (AuxiliaryTrainingWrapper, LoraLayer))]

    counts = hook_counts()
    assert len(counts) == 4 + 1 and set(counts) == {1}  # q_proj of 4 layers, the lm_head wrapper: one hook each
    ids, mask = padded_batch([5, 4, 6])
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=["b", "__base__", "a"]).logits
        assert hook_counts() == counts  # a mixed call adds none (and leaves none behind)
        model.set_adapter("b")
        alone = model(input_ids=ids[:1], attention_mask=mask[:1]).logits
    torch.testing.assert_close(mixed[:1], alone)
