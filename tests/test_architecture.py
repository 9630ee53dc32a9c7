"""Decoder architectures beyond Llama: the layer stack is found without a per-model table, the logits match the
independent reference (for every component), generation batches correctly and adapters round-trip; models ReFT
cannot edit are refused by name (peft_reft/architecture.py). The encoders (BERT, RoBERTa) are covered in
test_sequence_classification.py."""

import pytest
import torch
from conftest import padded_batch, tiny_config, tiny_model
from peft import PeftModel, get_peft_model
from reference import raw_params, reference_logits
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen3Config,
)

from peft_reft import ReftConfig, ReftLayer

COMMON = {"vocab_size": 97, "num_hidden_layers": 3, "num_attention_heads": 4, "pad_token_id": 0}
GQA = {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2}
CONFIGS = {
    "mistral": lambda: MistralConfig(**GQA, **COMMON),
    "qwen3": lambda: Qwen3Config(**GQA, head_dim=8, **COMMON),
    "gemma2": lambda: Gemma2Config(**GQA, head_dim=8, **COMMON),
    "gemma3_text": lambda: Gemma3TextConfig(**GQA, head_dim=8, **COMMON),
    "phi3": lambda: Phi3Config(**GQA, **COMMON),
    "gpt_neox": lambda: GPTNeoXConfig(hidden_size=32, intermediate_size=64, **COMMON),
    "opt": lambda: OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **COMMON),
    "falcon": lambda: FalconConfig(hidden_size=32, **COMMON),
}

# the attention and MLP children of each architecture's layer, written out here (None: there is no such child)
SUBMODULES = {
    "mistral": ("self_attn", "mlp"), "qwen3": ("self_attn", "mlp"), "gemma2": ("self_attn", "mlp"),
    "gemma3_text": ("self_attn", "mlp"), "phi3": ("self_attn", "mlp"), "gpt_neox": ("attention", "mlp"),
    "opt": ("self_attn", None), "falcon": ("self_attention", "mlp"),
}


def _model(arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_logits_generation_and_round_trip(arch, tmp_path):
    config = ReftConfig(layers=[0, 2], low_rank_dimension=3, positions="f2+l2", init_weights=False)
    model = get_peft_model(_model(arch), config).eval()
    ids, mask = padded_batch([7, 4], side="left", seed=3)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    expected = reference_logits(_model(arch), raw_params(model), "loreft", ids, mask, None, 2, 2, False)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        plain = _model(arch)(input_ids=ids, attention_mask=mask).logits
    assert (got - plain)[mask.bool()].abs().max() > 1e-3

    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = model.generate(input_ids=ids[1:, -4:], attention_mask=mask[1:, -4:], max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(batched[1, -4:], alone[0, -4:])

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_model(arch), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, got)


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("component", ["attention_output", "mlp_output"])
def test_components_match_reference_or_are_refused_by_name(arch, component):
    child = SUBMODULES[arch][component == "mlp_output"]
    config = ReftConfig(layers=[0, 2], low_rank_dimension=3, positions="f2+l2", init_weights=False,
                        component=component)
    if child is None:
        with pytest.raises(ValueError, match=rf"component='{component}' is not available for \w+DecoderLayer"):
            get_peft_model(_model(arch), config)
        return
    model = get_peft_model(_model(arch), config).eval()
    ids, mask = padded_batch([7, 4], side="right", seed=3)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    expected = reference_logits(_model(arch), raw_params(model), "loreft", ids, mask, None, 2, 2, False,
                                submodule=child)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)


def _config(**kwargs):
    return ReftConfig(**{"layers": [1, 2], "low_rank_dimension": 3, "share_weights": False, **kwargs})


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match=r"layers=\[1, 4\] has index\(es\) \[4\] out of range: LlamaForCausalLM has 4 "
                                         r"layers \(valid indices 0..3\)"):
        get_peft_model(tiny_model(), _config(layers=[1, 4]))


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_models_are_refused_up_front(arch):
    from transformers import AutoModelForSeq2SeqLM, BartConfig, T5Config

    config = (T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4) if arch == "t5" else
              BartConfig(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64))
    base = AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(ValueError, match=rf"\({arch}\) is an encoder-decoder model, which ReFT does not support"):
        get_peft_model(base, _config(layers="all"))
    assert not any(isinstance(m, ReftLayer) for m in base.modules())


def test_several_equally_likely_layer_stacks_are_not_picked_silently():
    from peft_reft.architecture import find_layer_stack

    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_config(layers=2)
            self.left = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
            self.right = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(ValueError, match=r"TwoStacks has several stacks of transformer layers \(left, right\)"):
        find_layer_stack(TwoStacks())
