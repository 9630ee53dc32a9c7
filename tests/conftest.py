"""Tiny models built from configs (no hub access) and shared fixtures."""

import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from runtime import cpu_threads  # noqa: E402

VOCAB = 97
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    # `pytest -n N` (make test): each worker gets its share of the cores, and the processes its tests start (README
    # commands, examples) inherit that share instead of reading a load average that lags the other workers
    share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, share))
# as in the examples: on a busy machine, threads that wait for each other cost more than they bring
torch.set_num_threads(cpu_threads()[0])


def pytest_collection_modifyitems(config, items):
    """The slow tests first (in their order): under pytest-xdist the short ones then fill the workers' last minutes,
    instead of one long test starting when the other worker has nothing left."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def tiny_config(arch: str = "llama", layers: int = 4, hidden: int = 32, initializer_range: float = 0.2):
    if arch == "llama":
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=initializer_range,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=initializer_range,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
            initializer_range=initializer_range, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    raise ValueError(arch)


def enable_checkpointing(model, use_reentrant: bool) -> None:
    """Gradient (activation) checkpointing on a transformers model: `activation_checkpointing_enable` from
    transformers 5.24, `gradient_checkpointing_enable` before (the low end of peft-reft's range)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def tiny_model(arch: str = "llama", seed: int = 0, **kwargs):
    """A tiny causal LM; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs))
    return model.eval()


def padded_batch(lengths, side="right", seed=0, seq_len=None, vocab=VOCAB):
    """input_ids/attention_mask for rows of the given lengths, padded on `side` (pad id 0, tokens >= 3)."""
    g = torch.Generator().manual_seed(seed)
    seq_len = seq_len or max(lengths)
    ids = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, vocab, (n,), generator=g)
        span = slice(0, n) if side == "right" else slice(seq_len - n, seq_len)
        ids[row, span] = tokens
        mask[row, span] = 1
    return ids, mask


def greedy_by_hand(model, prompt, steps, locations=None):
    """Greedy decoding that re-runs the whole sequence at each step (no KV cache), through the model's forward with
    the prompt's positions given explicitly as `locations` (None: derived from the whole unpadded sequence, which is
    what positions='all' edits). The reference for `generate`."""
    sequence = prompt.clone()
    for _ in range(steps):
        extra = {} if locations is None else {"intervention_locations": locations}
        with torch.no_grad():
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), **extra).logits
        sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    return sequence[:, prompt.shape[1]:]


@pytest.fixture
def llama():
    return tiny_model("llama")
