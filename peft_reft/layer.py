"""`ReftLayer`: a decoder layer wrapped so that its output is edited at the positions of the current call."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import ReftConfig
from .interventions import build_intervention


class ReftLayer(nn.Module, BaseTunerLayer):
    """Wraps a whole decoder layer (`base_layer`) and edits its output hidden states.

    Per adapter, `reft_interventions[adapter]` is a `ModuleList` of the layer's interventions: index g edits the
    tokens of group g (see `peft_reft.positions`). The positions of the current call are set by `ReftModel` in
    `positions` (adapter name -> LongTensor `[batch, groups, P]` of token indices, -1 = empty slot) for the duration
    of a forward pass; an empty dict means "edit nothing in this call" (decode steps of `generate`).
    """

    adapter_layer_names = ("reft_interventions",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ReftConfig, hidden_size: int):
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.reft_interventions = nn.ModuleDict({})
        self.positions: Optional[dict[str, torch.Tensor]] = None
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: ReftConfig) -> None:
        """Add the interventions of adapter `adapter_name`, on the device of the wrapped layer, in float32."""
        interventions = nn.ModuleList(
            build_intervention(
                config.intervention,
                self.hidden_size,
                config.low_rank_dimension,
                dropout=config.dropout,
                act_fn=config.act_fn,
                init_weights=config.init_weights,
            )
            for _ in range(config.num_groups)
        )
        device = next((p.device for p in self.base_layer.parameters() if not p.is_meta), None)
        if device is not None and not any(p.is_meta for p in interventions.parameters()):
            interventions.to(device)  # created on meta (low_cpu_mem_usage): the loaded weights are assigned later
        self.reft_interventions[adapter_name] = interventions
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "ReFT adapters cannot be merged into the base weights: the edit depends on the token position. "
            "Keep the adapter loaded (PeftModel) for inference, or use `unload()` to get the base model back."
        )

    def unmerge(self) -> None:
        """Nothing to undo: ReFT adapters are never merged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        output = self.base_layer(hidden_states, *args, **kwargs)
        if self.disable_adapters:
            return output
        if self.positions is None:
            if any(name in self.reft_interventions for name in self.active_adapters):
                raise RuntimeError(
                    "A ReFT layer ran without intervention positions. Call the model through the PeftModel returned "
                    "by `get_peft_model` / `PeftModel.from_pretrained` (its forward and generate supply the "
                    "positions), not through the wrapped transformers model."
                )
            return output
        edits = [(name, where) for name, where in self.positions.items() if name in self.reft_interventions]
        if not edits:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        for name, locations in edits:
            hidden = self._edit(hidden, self.reft_interventions[name], locations)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    @staticmethod
    def _edit(hidden: torch.Tensor, interventions: nn.ModuleList, locations: torch.Tensor) -> torch.Tensor:
        """Add each intervention's delta at its locations (`[B, groups, P]`, -1 = empty) with one gather per group
        and one scatter; only the selected tokens go through the interventions."""
        if locations.shape[0] != hidden.shape[0] or locations.shape[1] != len(interventions):
            raise RuntimeError(
                f"ReFT positions of shape {list(locations.shape)} do not fit hidden states of shape "
                f"{list(hidden.shape)} and {len(interventions)} intervention(s) per layer."
            )
        width = hidden.shape[-1]
        index = locations.clamp(min=0)
        deltas = []
        for group, intervention in enumerate(interventions):
            # empty slots read token 0 and add a zero delta, so every intervention runs (DDP needs its gradients)
            selected = hidden.gather(1, index[:, group, :, None].expand(-1, -1, width))
            deltas.append(torch.where(locations[:, group, :, None] >= 0, intervention.delta(selected), 0.0))
        flat_index = index.flatten(1)[..., None].expand(-1, -1, width)
        return hidden.scatter_add(1, flat_index, deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1))

    def __getattr__(self, name: str) -> Any:
        # model code reads attributes of its decoder layers (e.g. `attention_type`): forward them to the wrapped layer
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def __repr__(self) -> str:
        return "reft." + super().__repr__()
