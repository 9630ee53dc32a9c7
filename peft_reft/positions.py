"""Where interventions apply: the position grammar and its derivation from a batch.

Grammar (`ReftConfig.positions`):

- `"fN"`: the first N prompt tokens; `"lM"`: the last M prompt tokens; `"fN+lM"` (or `"lM+fN"`): both.
- `"all"`: every attended token, prompt and completion alike (during `generate`, every generated token too).

The *prompt* of an example is the set of its attended tokens (`attention_mask == 1`) that come before its completion,
the last run of supervised labels (`labels != -100`); without labels it is all attended tokens. For a single-turn
example that is everything before the first supervised token. For a multi-turn conversation trained with
`assistant_only_loss` it is the whole conversation up to the last assistant reply, which is exactly the prompt that
`generate` sees when it answers after the last user turn. Tokens are counted among attended tokens only, so left
padding, right padding and masks with holes give the same positions for the same prompt.

A row may hold several sequences (no attention mask, `position_ids` restarting: TRL's padding-free and packed
batches). The rule is then applied to each sequence on its own: per token, its position within its sequence and that
sequence's prompt length decide.

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
from typing import Any, Mapping, Optional

import torch
from transformers.masking_utils import find_packed_sequence_indices

IGNORE_INDEX = -100
INTERVENTION_LOCATIONS = "intervention_locations"  # the batch key of explicit positions
_WINDOW = re.compile(r"^(?:([fl])(\d+))(?:\+([fl])(\d+))?$")
MAX_WINDOW = 1_000_000  # tokens in one window: longer than any context


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
        if all(0 < size <= MAX_WINDOW for size in sizes.values()):
            return PositionSpec(first=sizes.get("f", 0), last=sizes.get("l", 0))
    raise ValueError(
        f"positions={positions!r} is not valid. Use 'fN' (first N prompt tokens), 'lM' (last M prompt tokens), "
        f"'fN+lM' or 'lM+fN' (both), or 'all' (every attended token), with 1 <= N, M <= {MAX_WINDOW:,}, e.g. 'f7+l7'."
    )


def _require(ok: torch.Tensor, message: str) -> None:
    """Raise `ValueError(message)` unless `ok` is all true, without a device-to-host copy on accelerators.

    On CPU the check is a plain Python `if`. On an accelerator, and under torch.compile (where a Python `if` on a
    tensor would break the graph), it is an asynchronous assertion carrying the same message (a RuntimeError), so a
    training step never waits for the device to validate a batch.
    """
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            raise ValueError(message)
    else:
        torch._assert_async(ok.all(), message)


class Sequences:
    """Where each row's sequences lie: `ids` (`[B, L]`, the index of the sequence each token belongs to, counted from
    0 in each row) for rows that pack several sequences, or None for one sequence per row. Per-sequence reductions
    are plain row reductions (`[B, 1]`, broadcast) in the second case, so an unpacked batch costs what it cost before
    packing was supported."""

    def __init__(self, ids: torch.Tensor | None = None):
        self.ids = ids

    def _per_sequence(self, values: torch.Tensor, how: str, fill: int) -> torch.Tensor:
        per_sequence = torch.full_like(values, fill).scatter_reduce(1, self.ids, values, how, include_self=True)
        return per_sequence.gather(1, self.ids)

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Per token (or per row), whether `mask` holds anywhere in its sequence."""
        if self.ids is None:
            return mask.any(dim=1, keepdim=True)
        return self._per_sequence(mask.long(), "amax", 0).bool()

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Per token (or per row), the largest of the integer `values` over its sequence."""
        if self.ids is None:
            return values.amax(dim=1, keepdim=True)
        return self._per_sequence(values, "amax", torch.iinfo(values.dtype).min)

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        """Per token (or per row), how many tokens of its sequence `mask` holds."""
        if self.ids is None:
            return mask.sum(dim=1, keepdim=True)
        return self._per_sequence(mask.long(), "sum", 0)

    def rank(self, mask: torch.Tensor) -> torch.Tensor:
        """Per token, how many tokens of its sequence up to and including it `mask` holds."""
        running = mask.cumsum(dim=1)
        if self.ids is None:
            return running
        before = running - mask.long()  # non-decreasing: its least value in a sequence is at the sequence's start
        return running - self._per_sequence(before, "amin", torch.iinfo(before.dtype).max)

    def starts(self, like: torch.Tensor) -> torch.Tensor:
        """Bool `[B, L]`: the first token of each sequence."""
        first = torch.zeros_like(like, dtype=torch.bool)
        first[:, 0] = True
        if self.ids is not None:
            first[:, 1:] = self.ids[:, 1:] != self.ids[:, :-1]
        return first


def prompt_mask(
    attended: torch.Tensor, labels: torch.Tensor | None, sequences: Sequences | None = None
) -> torch.Tensor:
    """Bool `[B, L]`: the attended tokens of each sequence before its last run of supervised labels (all attended tokens
    without labels). A row holds one sequence unless `sequences` says otherwise."""
    if labels is None:
        return attended
    sequences = sequences or Sequences()
    supervised = (labels != IGNORE_INDEX) & attended
    run_starts = supervised.clone()
    if sequences.ids is None:
        run_starts[:, 1:] &= ~supervised[:, :-1]
    else:  # a run also starts where a sequence starts
        run_starts[:, 1:] &= ~supervised[:, :-1] | sequences.starts(supervised)[:, 1:]
    index = torch.arange(labels.shape[1], device=labels.device)
    last_start = sequences.max(torch.where(run_starts, index, -1))
    prompt = attended & ((index < last_start) | (last_start < 0))
    _require(
        sequences.any(prompt) | ~sequences.any(attended),
        "Cannot find the prompt: in some example the first attended token already has a label (labels != -100), so "
        "there is no prompt/completion split to place 'fN'/'lM' positions on (plain language-modelling data, "
        "completion_only_loss=False, or packed rows that start inside a completion). Use prompt/completion data "
        "whose prompt labels are -100 (TRL's default); or pass explicit `intervention_locations`; or use "
        "positions='all'.",
    )
    return prompt


def group_map_from_prompt(
    prompt: torch.Tensor, spec: PositionSpec, share_weights: bool, sequences: Sequences | None = None
) -> torch.Tensor:
    """Group map `[B, L]` for the first/last windows of each sequence's prompt tokens (`prompt`: bool `[B, L]`; a row
    holds one sequence unless `sequences` says otherwise)."""
    sequences = sequences or Sequences()
    rank = torch.where(prompt, sequences.rank(prompt) - 1, -1)
    return prompt_window_groups(rank, sequences.count(prompt), spec, share_weights)


def prompt_window_groups(
    rank: torch.Tensor, count: torch.Tensor, spec: PositionSpec, share_weights: bool
) -> torch.Tensor:
    """The position rule for `fN` / `lM` windows: per token, the group that edits the prompt token of index `rank`
    (from 0) in a prompt of `count` tokens, or -1 (also for `rank` outside `[0, count)`: not a prompt token). Both
    are integer tensors that broadcast. Batches (`group_map_from_prompt`) and serving engines
    (`request_token_groups`) both place their edits with this function."""
    first = torch.minimum(torch.full_like(count, spec.first), torch.maximum((count + 1) // 2, count - spec.last))
    last = torch.minimum(torch.full_like(count, spec.last), count - first)
    last_group = spec.num_groups(share_weights) - 1
    in_prompt = (rank >= 0) & (rank < count)
    groups = torch.where(in_prompt & (rank >= count - last), last_group, -1)
    return torch.where(in_prompt & (rank < first), 0, groups)


def request_token_groups(
    spec: PositionSpec, share_weights: bool, position: torch.Tensor, prompt_length: torch.Tensor
) -> torch.Tensor:
    """Per token of a request served one chunk or one decode step at a time (a serving engine): the group that edits
    the token at absolute `position` (from 0) of a request whose prompt has `prompt_length` tokens, or -1.

    The windows come from the whole prompt's length, whatever chunk of it a step computes, so chunked prefill and a
    prompt recomputed after preemption edit the tokens that a single pass over the prompt edits; `"all"` edits every
    token, prompt and generated alike (as `generate` does)."""
    if spec.all:
        return torch.zeros_like(position)
    return prompt_window_groups(position, prompt_length, spec, share_weights)


def group_map_from_locations(locations: torch.Tensor, num_groups: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """Group map `[B, L]` from explicit `intervention_locations` (see the module docstring for the layout)."""
    signed = (torch.int8, torch.int16, torch.int32, torch.int64)
    if not isinstance(locations, torch.Tensor) or locations.dtype not in signed:
        given = locations.dtype if isinstance(locations, torch.Tensor) else type(locations).__name__
        raise ValueError(
            f"`intervention_locations` must be a signed integer tensor of token indices, -1 for an empty slot "
            f"(torch.long); got {given}."
        )
    locations = locations.long()
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


def batch_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    """The tensor whose first two dimensions are the batch's `[batch, seq_len]`: `input_ids`, else `inputs_embeds`."""
    tokens = batch.get("input_ids")
    if tokens is None:
        tokens = batch.get("inputs_embeds")
    if tokens is None:
        raise ValueError("ReFT needs `input_ids` or `inputs_embeds` to place its interventions.")
    return tokens


def expand_rows(per_example: torch.Tensor, rows: int) -> torch.Tensor:
    """`per_example` (one entry per example along dim 0) repeated for a batch of `rows` rows, as beam search and
    `num_return_sequences` expand a batch (each example's copies next to each other)."""
    return per_example if per_example.shape[0] == rows else per_example.repeat_interleave(
        rows // per_example.shape[0], dim=0
    )


def packed_sequences(batch: Mapping[str, Any]) -> Sequences:
    """The sequences of a batch's rows. A row without an attention mask whose `position_ids` restart (at 0, or
    anywhere they do not follow the previous position, as transformers' attention reads them) packs several
    sequences (TRL's `padding_free=True` and `packing=True`, flattened continuous batches); each is an example of its
    own. Rows that pack sequences without saying where they start (varlen kernel arguments, no `position_ids`) are
    refused."""
    position_ids = batch.get("position_ids")
    if batch.get("attention_mask") is not None:
        return Sequences()
    if position_ids is None:
        if any(batch.get(key) is not None for key in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")):
            raise ValueError(
                "This batch packs several sequences into one row (varlen kernel arguments, no attention_mask), but "
                "has no `position_ids` to tell where each sequence starts. Pass `position_ids` that restart at 0 for "
                "every sequence (TRL's padding-free collator does), or explicit `intervention_locations`."
            )
        return Sequences()
    # the rule transformers' attention reads packed rows by: a sequence starts wherever the position does not follow
    # the previous one (None: every row holds one sequence)
    position_ids = position_ids.reshape(-1, position_ids.shape[-1]).expand(batch_tokens(batch).shape[0], -1)
    return Sequences(find_packed_sequence_indices(position_ids))


def sequences_per_row(batch: Mapping[str, Any], seq_len: int) -> int:
    """The most sequences a row of the batch can hold, known on the host: 1 for padded rows; for packed rows, what
    TRL's collator says (`cu_seq_lens_q`, a CPU tensor), or what CPU `position_ids` show (not under torch.compile,
    where reading them would break the graph), else `seq_len`."""
    if batch.get("attention_mask") is not None or batch.get("position_ids") is None:
        return 1
    boundaries = batch.get("cu_seq_lens_q")
    if isinstance(boundaries, torch.Tensor) and boundaries.device.type == "cpu":
        return max(1, boundaries.numel() - 1)
    if batch["position_ids"].device.type == "cpu" and not torch.compiler.is_compiling():
        ids = packed_sequences(batch).ids
        return 1 if ids is None else int(ids.amax()) + 1
    return seq_len


def intervention_group_map(
    spec: PositionSpec,
    share_weights: bool,
    batch: Mapping[str, Any],
    classification: bool = False,
    head_pad_token_id: int | None = None,
) -> torch.Tensor:
    """The group map `[B, L]` of a batch: its explicit `intervention_locations` if present, else derived.

    `batch` holds the model inputs: `input_ids` or `inputs_embeds`, and optionally `attention_mask` (2-D), `labels`,
    `intervention_locations`, `position_ids`. Packed rows (no attention mask, restarting position ids) are rejected
    for prompt positions, since the prompt of each packed sequence cannot be told apart. With `classification`
    (sequence classification), `labels` are classes: the windows are placed on the whole attended input, which for a
    decoder classifier (`head_pad_token_id` given) ends at the token its head reads, the rightmost token of
    `input_ids` that is not `head_pad_token_id` (transformers' rule; with pad == eos a trailing eos is not read).
    """
    reference = batch_tokens(batch)
    batch_size, seq_len = reference.shape[:2]
    locations = batch.get(INTERVENTION_LOCATIONS)
    if locations is not None:
        return group_map_from_locations(locations, spec.num_groups(share_weights), batch_size, seq_len)
    attention_mask = batch.get("attention_mask")
    sequences = packed_sequences(batch)
    if attention_mask is None:
        attended = torch.ones(batch_size, seq_len, dtype=torch.bool, device=reference.device)
    elif attention_mask.dim() == 2 and tuple(attention_mask.shape) == (batch_size, seq_len):
        attended = attention_mask.bool()
    else:
        raise ValueError(
            f"ReFT derives positions from a 2-D attention_mask of shape {[batch_size, seq_len]}, got one of shape "
            f"{list(attention_mask.shape)}. Pass the 2-D padding mask, or explicit `intervention_locations`."
        )
    if classification and head_pad_token_id is not None and batch.get("input_ids") is not None:
        index = torch.arange(seq_len, device=reference.device)
        read = (index * (batch["input_ids"] != head_pad_token_id)).amax(dim=1, keepdim=True)  # the token the head reads
        attended = attended & (index <= read)
    if spec.all:
        return torch.where(attended, 0, -1)
    labels = None if classification else batch.get("labels")
    if labels is not None and tuple(labels.shape) != (batch_size, seq_len):
        raise ValueError(
            f"labels of shape {list(labels.shape)} are not token labels of shape {[batch_size, seq_len]}, so they "
            "cannot mark the prompt. Class labels need ReftConfig(task_type='SEQ_CLS'), which places positions on the "
            "whole input."
        )
    return group_map_from_prompt(prompt_mask(attended, labels, sequences), spec, share_weights, sequences)


def positions_per_group(spec: PositionSpec, share_weights: bool, seq_len: int, sequences: int = 1) -> list[int]:
    """The most tokens each intervention can edit in a row of `sequences` sequences, known before looking at the
    batch's tensors."""
    if spec.all:
        return [seq_len]
    if spec.num_groups(share_weights) == 2:
        return [min(spec.first * sequences, seq_len), min(spec.last * sequences, seq_len)]
    return [min((spec.first + spec.last) * sequences, seq_len)]


def locations_from_group_map(group_map: torch.Tensor, num_groups: int, width: int | None = None) -> torch.Tensor:
    """Token indices `[B, num_groups, width]` of each group in a group map, in order, padded with -1.

    `width=None` uses the largest count in the batch (one host read: for collators); the model passes a static width
    (`positions_per_group`) so that no device-to-host copy happens in the forward pass.
    """
    seq_len = group_map.shape[1]
    index = torch.arange(seq_len, device=group_map.device)
    if width is None:
        width = max(1, max(int((group_map == g).sum(dim=1).max()) for g in range(num_groups)))
    per_group = []
    for group in range(num_groups):
        # selected indices first, in order; then the rest (pushed past seq_len, turned into -1)
        order = torch.where(group_map == group, index, index + seq_len).sort(dim=1).values[:, :width]
        per_group.append(torch.where(order < seq_len, order, -1))
    return torch.stack(per_group, dim=1)


def adapter_group_map(config: Any, batch: Mapping[str, Any], head_pad_token_id: int | None = None) -> torch.Tensor:
    """The group map `[B, L]` of a batch for one adapter's config (a `ReftConfig`: its `position_spec`,
    `share_weights` and `classification`); `head_pad_token_id` as in `intervention_group_map`."""
    classification = config.classification
    return intervention_group_map(config.position_spec, config.share_weights, batch, classification,
                                  head_pad_token_id=head_pad_token_id if classification else None)


def adapter_positions(
    configs: Mapping[str, Any],
    batch: Mapping[str, Any],
    rows_of: Optional[Mapping[str, torch.Tensor]] = None,
    head_pad_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per adapter (name -> `ReftConfig`), the token indices `[B, groups, P]` (-1 = empty) its interventions edit in
    this batch: what the model hands to its ReFT layers for one call.

    P is fixed by the config (e.g. N + M for shared `fN+lM`) or by the width of explicit locations, so nothing is
    read back from the device. Adapters with the same position rule share one group map. `rows_of` (a mixed-adapter
    batch): per adapter, a bool tensor with one entry per example, true where the example uses that adapter; the
    rows of the other examples edit nothing.
    """
    explicit = batch.get(INTERVENTION_LOCATIONS)
    group_maps, positions = {}, {}
    for name, config in configs.items():
        rule = (config.positions, config.share_weights, config.classification)
        if rule not in group_maps:
            group_maps[rule] = adapter_group_map(config, batch, head_pad_token_id)
        group_map = group_maps[rule]
        seq_len = group_map.shape[1]
        widths = positions_per_group(config.position_spec, config.share_weights, seq_len,
                                     sequences_per_row(batch, seq_len))
        width = max(widths) if explicit is None else explicit.shape[-1]
        locations = locations_from_group_map(group_map, config.num_groups, width)
        if rows_of is not None:
            rows = expand_rows(rows_of[name].to(locations.device), locations.shape[0])
            locations = torch.where(rows[:, None, None], locations, -1)
        positions[name] = locations
    return positions

