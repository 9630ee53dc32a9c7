"""Half-precision base models: interventions stay float32, training with autocast works, save/load is exact."""

import pytest
import torch
from conftest import greedy_by_hand, padded_batch, tiny_model
from peft import PeftModel, get_peft_model
from test_trl import (
    PAIRS,
    prompt_completion,
    reft_config,
    sft_args,
    tokenizer,  # noqa: F401  (fixture)
)
from test_trl import tiny_model as tiny_chat_model
from trl import SFTTrainer

from peft_reft import ReftConfig, ReftLayer


def _reft_params(model):
    return [p for n, p in model.named_parameters() if ".reft_interventions." in n]


def test_bf16_sft_training_with_autocast(tokenizer, tmp_path):  # noqa: F811
    model = tiny_chat_model(tokenizer).to(torch.bfloat16)
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path, bf16=True), train_dataset=prompt_completion(),
                         processing_class=tokenizer, peft_config=reft_config())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    assert all(p.dtype == torch.float32 for p in _reft_params(trainer.model))
    assert all(p.dtype == torch.bfloat16 for n, p in trainer.model.named_parameters() if "reft_" not in n)

    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_chat_model(tokenizer).to(torch.bfloat16), tmp_path / "adapter").eval()
    trained = {name: param for name, param in trainer.model.named_parameters() if ".reft_interventions." in name}
    reloaded = {name: param for name, param in loaded.named_parameters() if ".reft_interventions." in name}
    assert reloaded.keys() == trained.keys()
    for name, param in reloaded.items():
        assert param.dtype == torch.float32 and torch.equal(param, trained[name]), name  # exact round trip

    # logits on one compute path (no autocast: after training, accelerate leaves the trained model's forward wrapped
    # in bf16 autocast, a different path): the trained parameters copied by name into a fresh bf16 model give the
    # reloaded adapter's logits bit for bit
    rebuilt = get_peft_model(tiny_chat_model(tokenizer).to(torch.bfloat16), reft_config()).eval()
    missing, unexpected = rebuilt.load_state_dict({n: p.detach() for n, p in trained.items()}, strict=False)
    assert not unexpected and not [n for n in missing if ".reft_interventions." in n]
    batch = tokenizer([PAIRS[0][0], PAIRS[1][0]], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded(**batch).logits
        assert torch.equal(logits, rebuilt(**batch).logits)
        with loaded.disable_adapter():
            base = loaded(**batch).logits
    # ... and the adapter is applied: the edit moves the logits by far more than bf16 rounding of their magnitude
    rounding = torch.finfo(torch.bfloat16).eps * logits.float().abs().max()
    assert (logits.float() - base.float()).abs().max() > 10 * rounding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_backward_and_generate(dtype):
    config = ReftConfig(layers=[1, 2], low_rank_dimension=3, positions="f2+l2", share_weights=False,
                        init_weights=False)
    model = get_peft_model(tiny_model().to(dtype), config)
    assert all(p.dtype == torch.float32 for p in _reft_params(model))
    ids, mask = padded_batch([6, 4], side="left", seed=1)
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in _reft_params(model))
    # the edit matches the float32 model's closely
    reference = get_peft_model(tiny_model(), config)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits.float(),
                                   reference(input_ids=ids, attention_mask=mask).logits, atol=0.15, rtol=0.05)
    prompt = ids[:1]  # the 6-token row, left unpadded
    generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:, 6:], greedy_by_hand(model, prompt, 3, torch.tensor([[[0, 1], [4, 5]]])))


def test_interventions_compute_in_float32_under_autocast():
    model = get_peft_model(tiny_model().to(torch.bfloat16), ReftConfig(layers=[1], low_rank_dimension=3,
                                                                       init_weights=False))
    intervention = next(m for m in model.modules() if isinstance(m, ReftLayer)).reft_interventions["default"][0]
    hidden = torch.randn(2, 5, 32)
    expected = intervention(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = intervention(hidden)
    assert inside.dtype == torch.float32 and torch.equal(inside, expected)


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_autocast_adapter_dtype_decides_the_interventions_dtype(autocast_adapter_dtype, tmp_path):
    config = ReftConfig(layers=[1, 2], low_rank_dimension=3, positions="f2+l2", init_weights=False)
    model = get_peft_model(tiny_model().to(torch.bfloat16), config, autocast_adapter_dtype=autocast_adapter_dtype)
    expected = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    assert {p.dtype for p in _reft_params(model)} == {expected}
    ids, mask = padded_batch([6, 4], side="left", seed=1)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model().to(torch.bfloat16), tmp_path,
                                       autocast_adapter_dtype=autocast_adapter_dtype)
    assert {p.dtype for p in _reft_params(loaded)} == {expected}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)
