"""Which tokens of one engine step each served adapter edits, and with which of its interventions.

A serving engine runs its requests' tokens flattened into one row: per step, each request contributes a chunk of its
prompt (chunked prefill, a prompt recomputed after preemption) or one decode token, starting at the absolute position
it has reached. The package's position rule (`peft_reft.positions.request_token_groups`) decides per token from that
absolute position and the request's whole prompt length, so every way of cutting a prompt into steps edits the tokens
that `PeftModel.generate` edits.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..positions import locations_from_group_map, request_token_groups
from .adapters import ServedAdapter

# adapter uid -> the flattened token indices of the step that it edits, laid out as `peft_reft.edit.add_edits` takes
# them for one row: `[1, groups, P]`, -1 = empty slot
StepEdits = dict[str, torch.Tensor]


def step_edits(
    adapters: Mapping[str, ServedAdapter],
    row_adapters: Sequence[Optional[str]],
    query_start: np.ndarray,
    computed: np.ndarray,
    prompt_lengths: np.ndarray,
    device: torch.device | str = "cpu",
) -> StepEdits:
    """The edits of one step.

    Row i of the step (a request) is served by adapter `row_adapters[i]` (None: the base model), owns the flattened
    tokens `query_start[i]:query_start[i + 1]`, whose absolute positions start at `computed[i]`, and has a prompt of
    `prompt_lengths[i]` tokens. Adapters that edit nothing in this step are left out: a decode step of prompt-position
    adapters costs one pass over the rows and no tensor work. All adapters' locations reach `device` in one copy.
    """
    query_start, computed, prompt_lengths = (np.asarray(a, dtype=np.int64) for a in (query_start, computed,
                                                                                   prompt_lengths))
    rows_of: dict[str, list[int]] = {}
    for row, name in enumerate(row_adapters):
        if name is not None:
            rows_of.setdefault(name, []).append(row)
    planned: dict[str, torch.Tensor] = {}
    for name, rows in rows_of.items():
        adapter = adapters[name]
        rows = np.asarray(rows)
        if not adapter.spec.all:  # only rows still inside their prompt can hold an edited token
            rows = rows[computed[rows] < prompt_lengths[rows]]
            if rows.size == 0:
                continue
        counts = query_start[rows + 1] - query_start[rows]
        row_of_token = np.repeat(np.arange(rows.size), counts)
        offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        flat = torch.from_numpy(query_start[rows][row_of_token] + offset)
        groups = request_token_groups(
            adapter.spec,
            adapter.share_weights,
            torch.from_numpy(computed[rows][row_of_token] + offset),
            torch.from_numpy(prompt_lengths[rows][row_of_token]),
        )
        if bool((groups >= 0).any()):
            local = locations_from_group_map(groups[None], adapter.num_groups)[0]  # indices into this adapter's tokens
            planned[name] = torch.where(local >= 0, flat[local.clamp(min=0)], -1)
    if not planned:
        return {}
    together = torch.cat([locations.flatten() for locations in planned.values()]).to(device, non_blocking=True)
    edits: StepEdits = {}
    start = 0
    for name, locations in planned.items():
        edits[name] = together[start: start + locations.numel()].view(1, *locations.shape)
        start += locations.numel()
    return edits
