"""Half-precision base models: interventions stay float32, training with autocast works, save/load is exact."""

import pytest
import torch
from conftest import padded_batch, tiny_model
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

from peft_reft import ReftConfig


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
    model = get_peft_model(tiny_model().to(dtype), ReftConfig(layers=[1, 2], low_rank_dimension=3, positions="f2+l2",
                                                             init_weights=False))
    assert all(p.dtype == torch.float32 for p in _reft_params(model))
    ids, mask = padded_batch([6, 4], side="left", seed=1)
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in _reft_params(model))
    # the edit matches the float32 model's closely
    reference = get_peft_model(tiny_model(), ReftConfig(layers=[1, 2], low_rank_dimension=3, positions="f2+l2",
                                                        init_weights=False))
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits.float(),
                                   reference(input_ids=ids, attention_mask=mask).logits, atol=0.15, rtol=0.05)
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, ids.shape[1] + 3)
