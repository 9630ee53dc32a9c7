"""Applying ReFT edits to hidden states: the one way, used by `ReftLayer` (training, `generate`, evaluation) and by
the vLLM integration (`peft_reft.vllm.edits`, where a step's flattened tokens are one row).

`add_edits(hidden, interventions, locations)` adds intervention g's delta to the tokens `locations[b, g, :]` of row b
(`-1`: an empty slot): one gather per group and one scatter-add, only the selected tokens go through the
interventions, and the fixed-shape layout (padded with -1, never a data-dependent selection) is the same whether the
locations come from a training batch, `generate` or an engine step. Which tokens are edited is decided elsewhere
(`peft_reft.positions`); what an intervention computes is `peft_reft.interventions`.
"""

from __future__ import annotations

import torch
from torch import nn


def add_edits(hidden: torch.Tensor, interventions: nn.ModuleList, locations: torch.Tensor) -> torch.Tensor:
    """`hidden[b, t] += interventions[g](hidden[b, t])` for every token t in `locations[b, g]` (`[B, groups, P]`,
    -1 = empty), for hidden states `[B, S, d]`. Returns the edited states.

    In place wherever that is safe: eager training goes through in-place autograd functions that keep only the
    indices for backward (`_GatherTokens`, `_AddAtTokens`: no copy of the hidden states is made or kept); without
    autograd (inference, serving) the plain in-place ops; under torch.compile the out-of-place ops, which the compiler
    makes in place where it can (an in-place custom function on a graph input, when dynamo splits a layer's graph,
    gets wrong gradients from AOT autograd).
    """
    if locations.shape[1] != len(interventions):
        raise RuntimeError(
            f"ReFT positions of shape {list(locations.shape)} do not fit {len(interventions)} intervention(s) "
            "per layer."
        )
    index = locations.clamp(min=0)
    compiling = torch.compiler.is_compiling()
    tracked = torch.is_grad_enabled() and not compiling
    deltas = []
    for group, intervention in enumerate(interventions):
        # empty slots read token 0 and add a zero delta, so every intervention runs (DDP needs its gradients)
        if tracked:
            selected = _GatherTokens.apply(hidden, index[:, group])
        else:
            selected = hidden.gather(1, _token_index(index[:, group], hidden.shape[-1]))
        deltas.append(torch.where(locations[:, group, :, None] >= 0, intervention(selected), 0.0))
    delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, 1)
    if tracked:
        return _AddAtTokens.apply(hidden, index.flatten(1), delta)
    if compiling:
        return hidden.scatter_add(1, _token_index(index.flatten(1), hidden.shape[-1]), delta)
    return hidden.scatter_add_(1, _token_index(index.flatten(1), hidden.shape[-1]), delta)


def _token_index(index: torch.Tensor, width: int) -> torch.Tensor:
    return index[..., None].expand(-1, -1, width)


class _GatherTokens(torch.autograd.Function):
    """`hidden[b, index[b, p], :]` (`[B, P, d]`). Saves only `index` for backward, not `hidden`, so that `hidden`
    can be edited in place afterwards (torch's gather would keep `hidden` and refuse that)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.seq_len = hidden.shape[1]
        return hidden.gather(1, _token_index(index, hidden.shape[-1]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad_hidden = grad.new_zeros(grad.shape[0], ctx.seq_len, grad.shape[-1])
        return grad_hidden.scatter_add_(1, _token_index(index, grad.shape[-1]), grad), None


class _AddAtTokens(torch.autograd.Function):
    """`hidden[b, index[b, p], :] += deltas[b, p, :]`, in place (no copy of `hidden`). Backward: the gradient passes
    through to `hidden` unchanged, and `deltas` get it gathered at their tokens."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, index: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.mark_dirty(hidden)
        hidden.scatter_add_(1, _token_index(index, hidden.shape[-1]), deltas)
        return hidden  # the dirty input itself, as torch.compile requires of `mark_dirty`

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad, None, grad.gather(1, _token_index(index, grad.shape[-1]))
