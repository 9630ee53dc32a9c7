"""Prefix caching with ReFT: a block of KV cache computed under an adapter's edits is never reused by a request that
would compute it otherwise.

vLLM reuses a block when its hash matches; the hash chains over the blocks before it and includes "extra keys" (LoRA
identity, multimodal inputs, `cache_salt`). This module gives the ReFT extra key of a block: which of its tokens the
adapter edits, and with which intervention. Blocks that hold no edited token get none, so they are shared with base
requests and other adapters when everything before them is (e.g. an `lM` adapter's blocks before its window: by
causality their KV is the base model's), while the chained hash keeps every block after an edited one apart.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..positions import request_token_groups
from .adapters import ServedAdapter


def block_extra_key(adapter: ServedAdapter, prompt_length: int, start: int, end: int) -> Optional[tuple]:
    """The extra hash key of the block of tokens `[start, end)` of a request served by `adapter` whose prompt has
    `prompt_length` tokens: None if the adapter edits none of them."""
    if adapter.spec.all:
        return ("reft", adapter.uid, "all")
    if start >= prompt_length:
        return None
    groups = request_token_groups(adapter.spec, adapter.share_weights, torch.arange(start, end),
                                  torch.tensor(prompt_length))
    if not bool((groups >= 0).any()):
        return None
    return ("reft", adapter.uid, tuple(groups.tolist()))
