"""Where interventions apply: the position grammar and its derivation from a batch.

Grammar (`ReftConfig.positions`):

- `"fN"`: the first N prompt tokens; `"lM"`: the last M prompt tokens; `"fN+lM"` (or `"lM+fN"`): both.
- `"all"`: every attended token, prompt and completion alike (during `generate`, every generated token too).

The *prompt* of an example is the set of its attended tokens (`attention_mask == 1`) that come before its first
supervised label (`labels != -100`); without labels it is all attended tokens. Tokens are counted among attended
tokens only, so left padding, right padding and masks with holes give the same positions for the same prompt.

A prompt of n < N + M tokens: the two windows never overlap, every prompt token is edited exactly once, the first
window takes `min(N, max(ceil(n / 2), n - M))` tokens and the last window the remaining `min(M, n - first)`.
Example: `"f7+l7"` on a 3-token prompt edits tokens 0 and 1 with the first intervention and token 2 with the last.

Positions reach the layers as a *group map*: a LongTensor `[batch, seq_len]` holding, per token, the index of the
intervention that edits it (0 = the "first" intervention, 1 = the "last" one when first and last have separate
weights) or -1 for none.

Explicit positions can be given instead, as the batch key `intervention_locations`: a LongTensor of token indices into
the (padded) input, `[batch, n_positions]` when the adapter has one intervention per layer, or
`[batch, n_groups, n_positions]` with `n_groups == 2` for untied `fN+lM` (row 0: positions of the first intervention,
row 1: of the last one). `-1` marks an empty slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
_WINDOW = re.compile(r"^(?:([fl])(\d+))(?:\+([fl])(\d+))?$")


@dataclass(frozen=True)
class PositionSpec:
    """Parsed `positions`: `first` and `last` window sizes, or `all` tokens."""

    first: int = 0
    last: int = 0
    all: bool = False

    def num_groups(self, share_weights: bool) -> int:
        """Interventions per layer: 2 when first and last windows have separate weights, else 1."""
        return 2 if (self.first and self.last and not share_weights) else 1


def parse_positions(positions: str) -> PositionSpec:
    """Parse `"fN"`, `"lM"`, `"fN+lM"`, `"lM+fN"` or `"all"` into a `PositionSpec`; raise ValueError otherwise."""
    text = positions.strip().lower() if isinstance(positions, str) else positions
    if text == "all":
        return PositionSpec(all=True)
    match = _WINDOW.match(text) if isinstance(text, str) else None
    if match and match.group(1) != match.group(3):
        sizes = {match.group(1): int(match.group(2))}
        if match.group(3):
            sizes[match.group(3)] = int(match.group(4))
        if all(size > 0 for size in sizes.values()):
            return PositionSpec(first=sizes.get("f", 0), last=sizes.get("l", 0))
    raise ValueError(
        f"positions={positions!r} is not valid. Use 'fN' (first N prompt tokens), 'lM' (last M prompt tokens), "
        "'fN+lM' or 'lM+fN' (both), or 'all' (every attended token), with N, M >= 1, e.g. 'f7+l7'."
    )


def _require(ok: torch.Tensor, message: str) -> None:
    if not bool(ok.all()):
        raise ValueError(message)


def prompt_mask(attended: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Bool `[B, L]`: attended tokens before the first supervised label (all attended tokens without labels)."""
    if labels is None:
        return attended
    supervised = (labels != IGNORE_INDEX) & attended
    seq_len = labels.shape[1]
    index = torch.arange(seq_len, device=labels.device)
    first_supervised = torch.where(supervised, index, seq_len).amin(dim=1, keepdim=True)
    prompt = attended & (index < first_supervised)
    _require(
        prompt.any(dim=1) | ~attended.any(dim=1),
        "Cannot find the prompt: in some example the first attended token already has a label (labels != -100), so "
        "there is no prompt/completion split to place 'fN'/'lM' positions on. Use prompt/completion data whose prompt "
        "labels are -100 (TRL's default completion_only_loss), pass explicit `intervention_locations`, or use "
        "positions='all' for plain language modelling.",
    )
    return prompt


def group_map_from_prompt(prompt: torch.Tensor, spec: PositionSpec, share_weights: bool) -> torch.Tensor:
    """Group map `[B, L]` for the first/last windows of each row's prompt tokens (`prompt`: bool `[B, L]`)."""
    count = prompt.sum(dim=1, keepdim=True)
    rank = prompt.cumsum(dim=1) - 1
    first = torch.minimum(torch.full_like(count, spec.first), torch.maximum((count + 1) // 2, count - spec.last))
    last = torch.minimum(torch.full_like(count, spec.last), count - first)
    last_group = spec.num_groups(share_weights) - 1
    group_map = torch.full_like(rank, -1)
    group_map = torch.where(prompt & (rank >= count - last), last_group, group_map)
    return torch.where(prompt & (rank < first), 0, group_map)


def group_map_from_locations(locations: torch.Tensor, num_groups: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """Group map `[B, L]` from explicit `intervention_locations` (see the module docstring for the layout)."""
    if not isinstance(locations, torch.Tensor) or locations.dtype.is_floating_point or locations.dtype == torch.bool:
        raise ValueError("`intervention_locations` must be an integer tensor of token indices (-1 for an empty slot).")
    given_shape = list(locations.shape)
    if locations.dim() == 2:
        locations = locations.unsqueeze(1)
    if locations.dim() != 3 or locations.shape[0] != batch_size or locations.shape[1] != num_groups:
        expected = f"[{batch_size}, n_positions]" if num_groups == 1 else f"[{batch_size}, 2, n_positions]"
        raise ValueError(
            f"`intervention_locations` has shape {given_shape} but this adapter expects {expected} "
            f"({num_groups} intervention(s) per layer, batch size {batch_size})."
        )
    _require(
        ((locations >= -1) & (locations < seq_len)).all(),
        f"`intervention_locations` holds an index outside [-1, {seq_len - 1}] for a sequence of length {seq_len}.",
    )
    sink = torch.where(locations < 0, seq_len, locations)  # -1 goes to an extra column, dropped below
    group_map = torch.full((batch_size, seq_len + 1), -1, dtype=torch.long, device=locations.device)
    for group in reversed(range(num_groups)):  # a token listed in both groups belongs to group 0
        group_map.scatter_(1, sink[:, group], group)
    return group_map[:, :seq_len]


def intervention_group_map(
    spec: PositionSpec,
    share_weights: bool,
    input_shape: tuple[int, int],
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    intervention_locations: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The group map `[B, L]` of a batch: explicit locations if given, else derived from the mask and labels."""
    batch_size, seq_len = input_shape
    if intervention_locations is not None:
        return group_map_from_locations(intervention_locations, spec.num_groups(share_weights), batch_size, seq_len)
    if attention_mask is None:
        attended = torch.ones(input_shape, dtype=torch.bool, device=device)
    elif attention_mask.dim() == 2 and tuple(attention_mask.shape) == tuple(input_shape):
        attended = attention_mask.bool()
    else:
        raise ValueError(
            f"ReFT derives positions from a 2-D attention_mask of shape {list(input_shape)}, got one of shape "
            f"{list(attention_mask.shape)}. Pass the 2-D padding mask, or explicit `intervention_locations`."
        )
    if spec.all:
        return torch.where(attended, 0, -1)
    return group_map_from_prompt(prompt_mask(attended, labels), spec, share_weights)
