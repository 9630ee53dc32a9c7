"""Mixed-adapter batches: `model(..., adapter_names=[...])` / `generate(..., adapter_names=[...])` runs example i with
adapter `adapter_names[i]` (`"__base__"`: no adapter), as with LoRA.

The names of the call in progress live in a per-thread context variable for the duration of that call. ReFT layers
get them as positions (the rows of other adapters are empty, see `peft_reft.positions.adapter_positions`). peft's own
modules that take `adapter_names` as a forward argument (the `modules_to_save` / trainable-token wrappers and the LoRA
layers of a LoRA part) get them from a forward pre-hook registered once, when the adapter is injected; outside a
mixed call the hook does nothing.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Any, Iterator, Optional, Sequence

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .call_state import CallState
from .positions import expand_rows

BASE_ADAPTER = "__base__"  # in `adapter_names`: the example runs without any adapter


class MixedBatch:
    """The per-example adapter names of one call, with what the model needs of them computed once."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.adapters = tuple(sorted(set(self.names) - {BASE_ADAPTER}))
        self._distinct = list(dict.fromkeys(self.names))
        code = {name: index for index, name in enumerate(self._distinct)}
        self._codes = torch.tensor([code[name] for name in self.names])
        # per adapter: which examples use it, one bool per example
        self.rows_of = {name: self._codes == code[name] for name in self.adapters}
        self.names_for = lru_cache(maxsize=None)(self._names_for)

    def _names_for(self, rows: int) -> list[str]:
        """The names for a batch of `rows` rows (beams and `num_return_sequences` expand each example)."""
        return [self._distinct[code] for code in expand_rows(self._codes, rows).tolist()]


_MIXED_BATCH: CallState[MixedBatch] = CallState("reft_mixed_batch")


def current_mixed_batch() -> Optional[MixedBatch]:
    """The mixed batch of the call in progress in this thread, or None."""
    return _MIXED_BATCH.get()


@contextlib.contextmanager
def mixed_batch(adapter_names: Sequence[str]) -> Iterator[MixedBatch]:
    """Make `adapter_names` the per-example adapters of the calls inside this block, in this thread only."""
    with _MIXED_BATCH.bound(MixedBatch(adapter_names)) as batch:
        yield batch


def _adapter_names_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Forward pre-hook of a peft module that takes `adapter_names`: in a mixed call, pass it the call's names."""
    mixed = _MIXED_BATCH.get()
    if mixed is None:
        return None
    rows = (args[0] if args else next(iter(kwargs.values()))).shape[0]
    return args, {**kwargs, "adapter_names": mixed.names_for(rows)}


def register_adapter_names_hooks(model: nn.Module) -> None:
    """Give every module of `model` that takes `adapter_names` (peft's `modules_to_save` / trainable-token wrappers,
    LoRA layers) the pre-hook that passes it a mixed call's names; modules that have it already are left alone."""
    for module in model.modules():
        if isinstance(module, (AuxiliaryTrainingWrapper, LoraLayer)) and not any(
            hook is _adapter_names_hook for hook in module._forward_pre_hooks.values()
        ):
            module.register_forward_pre_hook(_adapter_names_hook, with_kwargs=True)
