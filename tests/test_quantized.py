"""ReFT on a base model loaded in 8-bit or 4-bit with bitsandbytes (its CPU backend), as QLoRA users do."""

import bitsandbytes  # noqa: F401  (the tests extra installs it: a missing install fails here, it is not skipped)
import pytest
import torch
from conftest import greedy_by_hand, tiny_model
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_reft import ReftConfig

QUANTIZATION = {
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                       bnb_4bit_quant_type="nf4"),
}
LINEAR = {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model(hidden=64).save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_reft_trains_and_reloads_on_a_quantized_base(base_dir, tmp_path, bits):
    load = lambda: AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=QUANTIZATION[bits]())  # noqa
    model = get_peft_model(load(), ReftConfig(layers=[1, 2], low_rank_dimension=4, positions="f2+l2",
                                              share_weights=False, init_weights=False))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == LINEAR[bits]
    reft = [p for n, p in model.named_parameters() if p.requires_grad]
    assert reft and all(".reft_interventions." in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in reft)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    optimizer = torch.optim.AdamW(reft, lr=2e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    generated = loaded.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[:, 10:], greedy_by_hand(loaded, ids[:1], 3, torch.tensor([[[0, 1], [8, 9]]])))
