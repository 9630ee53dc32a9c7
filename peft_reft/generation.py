"""`generate` with ReFT: the prompt is edited in the prefill pass (in every step without KV cache), so decoding costs
what the base model costs; `positions="all"` adapters also edit each generated token.

transformers' `generate` calls the model once per step. A forward pre-hook on the model, acting for one `generate`
call only (per thread), sets the positions of each of those calls (`replace_call_positions`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .call_state import CallState
from .layer import call_positions, replace_call_positions
from .positions import INTERVENTION_LOCATIONS, batch_tokens, expand_rows

# the `generate` call in progress in this thread (its model-call hooks act only for it)
_GENERATION: CallState[object] = CallState("reft_generation")
UNSUPPORTED = ("assistant_model", "prefill_chunk_size")
# transformers' continuous batching: its scheduler runs the transformers model itself on requests flattened into one
# row and fed in chunks, so no ReFT positions reach the layers
CONTINUOUS_BATCHING_ERROR = (
    "ReFT adapters do not support transformers' continuous batching (`{name}`, also behind `transformers serve "
    "--continuous_batching`): its scheduler runs the transformers model inside the PeftModel itself, on requests "
    "flattened and split into chunks, so the prompt edits would not be applied. Use `PeftModel.generate` with a "
    "padded batch of prompts (left or right padding), which edits each prompt in its prefill."
)


def kv_cache(kwargs: dict[str, Any]):
    """The KV cache of a model call: `cache` (transformers >= 5.24) or `past_key_values`."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def non_empty_cache(kwargs: dict[str, Any]) -> bool:
    """Whether a model call continues a KV cache that already holds tokens."""
    cache = kv_cache(kwargs)
    return cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0


def generate(tuner: nn.Module, *args: Any, **kwargs: Any):
    """`tuner.model.generate(*args, **kwargs)` with the interventions of `tuner` (a `ReftModel`) applied: see
    `ReftModel.generate`."""
    locations = kwargs.pop(INTERVENTION_LOCATIONS, None)
    for unsupported in UNSUPPORTED:
        if kwargs.get(unsupported) is not None or getattr(kwargs.get("generation_config"), unsupported, None):
            raise ValueError(f"ReFT does not support `generate(..., {unsupported}=...)`: it needs one prefill pass.")
    if non_empty_cache(kwargs):
        raise ValueError(
            "ReFT cannot continue generation from a non-empty KV cache (`cache` / `past_key_values`): pass the "
            "full prompt."
        )
    prompt = {
        "input_ids": kwargs.get("input_ids", args[0] if args else None),
        "inputs_embeds": kwargs.get("inputs_embeds"),
        "attention_mask": kwargs.get("attention_mask"),
        INTERVENTION_LOCATIONS: locations,
    }
    prompt_positions = tuner.intervention_positions(prompt)
    prompt_length = batch_tokens(prompt).shape[1]
    every_token = [name for name in prompt_positions if tuner.peft_config[name].position_spec.all]
    this_generation = object()  # the hook below acts for the model calls of this generate call only
    calls = 0

    def enter_step(module, call_args, call_kwargs):
        nonlocal calls
        if _GENERATION.get() is not this_generation:
            return  # a call of another thread's generate
        calls += 1
        new_ids = call_kwargs.get("input_ids", call_args[0] if call_args else None)
        step = {"input_ids": new_ids, "inputs_embeds": call_kwargs.get("inputs_embeds")}
        tokens = batch_tokens(step)
        # known on the host, no look into the cache (a static cache's length is a device tensor): the first call
        # (prefill) and every call without a KV cache (use_cache=False) run the whole sequence; the others are
        # cached decode steps, past the prompt
        whole_sequence = calls == 1 or kv_cache(call_kwargs) is None
        if not whole_sequence and not every_token:  # a cached decode step: nothing to edit, nothing to pay
            replace_call_positions({})
            return
        if whole_sequence and tokens.shape[1] < prompt_length:
            raise RuntimeError(
                f"ReFT expected a model call over the whole sequence ({prompt_length}+ tokens) in this generation "
                f"step and got {tokens.shape[1]} token(s); this generation mode is not supported."
            )
        # the positions of this model call; the next call replaces them
        replace_call_positions(step_positions(
            tuner, prompt_positions if whole_sequence else {}, every_token, tokens, call_kwargs.get("attention_mask")
        ))

    handle = tuner.model.register_forward_pre_hook(enter_step, with_kwargs=True)
    try:
        with _GENERATION.bound(this_generation), call_positions({}):
            return tuner.model.generate(*args, **kwargs)
    finally:
        handle.remove()


def step_positions(
    tuner: nn.Module,
    prompt_positions: dict[str, torch.Tensor],
    every_token: list[str],
    tokens: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Positions for one model call of `generate`: the prompt positions in a call over the whole sequence
    (`prompt_positions`, empty for a cached decode step), and every new token (`tokens`, the call's `input_ids` or
    `inputs_embeds`) of the `positions="all"` adapters.

    Prompt positions are edited in the prefill pass, and again in every step of a generation without KV cache
    (`use_cache=False`), which reruns the whole sequence; never in a cached decode step, which costs what the base
    model costs.
    """
    rows, new_tokens = tokens.shape[:2]
    positions = {
        name: expand_rows(where, rows)  # beams, num_return_sequences
        for name, where in prompt_positions.items() if name not in every_token
    }
    if every_token:
        step = {"input_ids": tokens, "attention_mask": None}
        if attention_mask is not None and attention_mask.dim() == 2:
            step["attention_mask"] = attention_mask[:, -new_tokens:]
        positions.update(tuner.intervention_positions(step, every_token))
    return positions
