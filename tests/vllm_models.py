"""Tiny models and ReFT adapters saved for the vLLM tests, and the tokens `PeftModel.generate` gives with them (the
reference the engine's answers must equal)."""

import sys
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from peft_reft import ReftConfig

NEW_TOKENS = 12


def smollm2_tokenizer():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from smollm2 import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def save_base(folder: Path, arch: str, tokenizer, hidden: int = 64, layers: int = 4) -> Path:
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    config = classes[arch](
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_adapter(base: Path, folder: Path, seed: int = 1, **config) -> Path:
    """A ReFT adapter with random weights, large enough to change greedy tokens."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), ReftConfig(init_weights=False, **config))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.mul_(3.0)
    model.save_pretrained(folder)
    return folder


def reference_tokens(base: Path, adapter: Path | None, prompts: list[list[int]], new_tokens: int = NEW_TOKENS
                     ) -> list[list[int]]:
    """Greedy tokens of `PeftModel.generate` (the base model's with `adapter=None`), float32, one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    tokens = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False)
        tokens.append(out[0, ids.shape[1]:].tolist())
    return tokens


def prompts_of(lengths, seed: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
