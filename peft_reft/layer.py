"""`ReftLayer`: a transformer layer wrapped so that its output (or its attention / MLP output) is edited at the
positions of the current call.

Positions travel with the call, never as attributes left on modules: `ReftModel` runs the transformers model inside
`call_positions(positions)`, a context variable that is set for that call only (and per thread, so concurrent calls
do not see each other's positions). A layer that runs outside such a call (the wrapped transformers model called
directly) raises an error that says so.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .architecture import component_module
from .call_state import CallState
from .config import ReftConfig
from .edit import add_edits
from .interventions import build_intervention

# adapter name -> LongTensor [batch, groups, P] of token indices (-1 = empty slot) for the call in progress;
# {} = edit nothing in this call (e.g. a decode step of `generate`); unset = not inside a call of the PeftModel
_CALL_POSITIONS: CallState[dict[str, torch.Tensor]] = CallState("reft_call_positions")

MERGE_ERROR = (
    "ReFT adapters cannot be merged into the base model: the edit depends on the token position, so no weight change "
    "reproduces it. Keep the PeftModel for inference, or call `unload()` to get the base model back."
)
NO_POSITIONS_MESSAGE = (
    "A ReFT layer ran outside a call of the PeftModel, so it has no intervention positions: the transformers model "
    "inside the PeftModel (e.g. `peft_model.base_model.model.model(...)` or `peft_model.get_base_model()(...)`) was "
    "called directly. Call the PeftModel itself (`peft_model(**batch)` / `peft_model.generate(...)`): it derives the "
    "positions from the batch and hands them to the layers for that call."
)


@contextlib.contextmanager
def call_positions(positions: dict[str, torch.Tensor]) -> Iterator[None]:
    """Make `positions` (adapter name -> `[batch, groups, P]` token indices) the positions of the ReFT layers that run
    inside this block, in this thread only; restored on exit."""
    with _CALL_POSITIONS.bound(positions):
        yield


def replace_call_positions(positions: dict[str, torch.Tensor]) -> None:
    """Inside a `call_positions` block, replace the positions for the model calls that follow (`generate` makes one
    call per step inside one block); the block's exit restores what was there before it."""
    if _CALL_POSITIONS.get() is None:
        raise RuntimeError("replace_call_positions() must run inside a call_positions(...) block.")
    _CALL_POSITIONS.set(positions)


class ReftLayer(nn.Module, BaseTunerLayer):
    """Wraps a whole transformer layer (`base_layer`) and edits its output hidden states, or those of its attention /
    MLP submodule (`ReftConfig.component`).

    Per adapter, `reft_interventions[adapter]` is a `ModuleList` of the layer's interventions: index g edits the
    tokens of group g (see `peft_reft.positions`), and `reft_component[adapter]` names what they edit. The positions
    of a call reach the layer through `call_positions` (set by `ReftModel` for the duration of that call).

    Attention / MLP outputs are edited by a forward hook on that submodule, inside the layer. Under gradient
    checkpointing the layer's inside runs again during backward, after the call is over: the layer's checkpoint
    function (transformers' `_gradient_checkpointing_func`) is wrapped so that the function it checkpoints carries
    the positions of its call, and runs with them in the forward pass and in the recomputation alike (see
    `_CheckpointWithPositions`).
    """

    adapter_layer_names = ("reft_interventions",)
    other_param_names = ("reft_component",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ReftConfig, hidden_size: int):
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.reft_interventions = nn.ModuleDict({})
        self.reft_component: dict[str, str] = {}
        self._component_hooks: dict[str, Any] = {}
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: ReftConfig) -> None:
        """Add the interventions of adapter `adapter_name`, on the device of the wrapped layer, in float32."""
        component = config.component
        if component != "block_output" and component not in self._component_hooks:
            module = component_module(self.base_layer, component)
            self._component_hooks[component] = module.register_forward_hook(partial(self._edit_component, component))
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
        self.reft_component[adapter_name] = component
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; the hook on an attention / MLP submodule goes with the last adapter that edits it."""
        super().delete_adapter(adapter_name)
        in_use = set(self.reft_component.values())
        for component in [c for c in self._component_hooks if c not in in_use]:
            self._component_hooks.pop(component).remove()

    def remove_component_hooks(self) -> None:
        """Detach the hooks on the attention / MLP submodules (when the base layer is handed back by `unload`)."""
        for handle in self._component_hooks.values():
            handle.remove()
        self._component_hooks.clear()
        checkpoint = getattr(self.base_layer, "_gradient_checkpointing_func", None)
        if isinstance(checkpoint, _CheckpointWithPositions):
            self.base_layer._gradient_checkpointing_func = checkpoint.checkpoint

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing to undo: ReFT adapters are never merged."""

    def _edits_of_this_call(self) -> dict[str, torch.Tensor]:
        """Adapter -> positions for the adapters of this layer that edit in the current call."""
        if self._disable_adapters:
            return {}
        positions = _CALL_POSITIONS.get()
        if positions is None:
            if any(name in self.reft_interventions for name in self.active_adapters):
                raise RuntimeError(NO_POSITIONS_MESSAGE)
            return {}
        interventions = self.reft_interventions
        return {name: where for name, where in positions.items() if name in interventions}

    def forward(self, *args: Any, **kwargs: Any):
        edits = self._edits_of_this_call()
        components = self.reft_component
        if all(component == "block_output" for component in components.values()):
            output = self.base_layer(*args, **kwargs)
            return self._edit_output(output, edits) if edits else output
        self._carry_positions_into_checkpoints()
        output = self.base_layer(*args, **kwargs)  # component edits happen inside, in the submodule hooks
        block = {name: where for name, where in edits.items() if components[name] == "block_output"}
        return self._edit_output(output, block) if block else output

    def _carry_positions_into_checkpoints(self) -> None:
        """Wrap the checkpoint function that transformers gives the layer (`gradient_checkpointing_enable` sets
        `_gradient_checkpointing_func`, and may set a new one at any time) in `_CheckpointWithPositions`, once."""
        checkpoint = getattr(self.base_layer, "_gradient_checkpointing_func", None)
        if checkpoint is not None and not isinstance(checkpoint, _CheckpointWithPositions):
            self.base_layer._gradient_checkpointing_func = _CheckpointWithPositions(checkpoint)

    def _edit_component(self, component: str, module: nn.Module, args: Any, output: Any):
        """Forward hook on the attention / MLP submodule: edit its output for the adapters editing `component`."""
        edits = {name: where for name, where in self._edits_of_this_call().items()
                 if self.reft_component.get(name) == component}
        if not edits:
            return None
        if torch.compiler.is_compiling():  # the compiled graph keeps what the backward needs
            return self._edit_output(output, edits)
        # what the edit's backward needs (indices, the selected tokens) is kept, not left to a checkpoint to
        # recompute: a non-reentrant checkpoint then stops its recomputation where it stops without ReFT, before the
        # last matmul of the MLP (whose output only the edit would need), instead of running that matmul again
        with torch.autograd.graph.saved_tensors_hooks(_kept, _kept):
            return self._edit_output(output, edits)

    def _edit_output(self, output: Any, edits: dict[str, torch.Tensor]) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        for name, locations in edits.items():
            if hidden.dim() != 3 or locations.shape[0] != hidden.shape[0]:
                raise RuntimeError(
                    f"ReFT edits hidden states laid out [batch, seq_len, hidden]; {type(self.base_layer).__name__} "
                    f"gives shape {list(hidden.shape)} for a batch of {locations.shape[0]}, so this architecture is "
                    "not supported."
                )
            hidden = add_edits(hidden, self.reft_interventions[name], locations)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __getattr__(self, name: str) -> Any:
        # model code reads attributes of its decoder layers (e.g. `attention_type`): forward them to the wrapped layer
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith(("reft_", "__")):
                raise  # a misspelt adapter attribute is ReftLayer's own error, never the wrapped layer's
            base = super().__getattr__("base_layer")
            try:
                return getattr(base, name)
            except AttributeError:
                raise AttributeError(
                    f"'{type(self).__name__}' object has no attribute {name!r} (nor has the wrapped "
                    f"{type(base).__name__})"
                ) from None

    def __repr__(self) -> str:
        return "reft." + super().__repr__()


class _CheckpointWithPositions:
    """A layer's checkpoint function (`checkpoint(function, *args)`) whose checkpointed function runs with the
    positions of the call that checkpointed it: in the forward pass, and again when the backward pass recomputes the
    layer, after that call is over (both checkpoint flavours, several forward passes before their backward passes).

    Under torch.compile the whole checkpoint is traced (the recomputation is part of the compiled graph) and the
    positions are those of the traced call; a checkpoint that dynamo leaves to eager (a graph break inside the layer)
    binds them as in eager mode.
    """

    def __init__(self, checkpoint: Any):
        self.checkpoint = checkpoint

    def __call__(self, function: Any, *args: Any, **kwargs: Any):
        return self.checkpoint(partial(_run_with_positions, _CALL_POSITIONS.get(), function), *args, **kwargs)


def _run_with_positions(positions: Optional[dict[str, torch.Tensor]], function: Any, *args: Any, **kwargs: Any):
    if torch.compiler.is_compiling():
        return function(*args, **kwargs)
    with _CALL_POSITIONS.bound(positions):
        return function(*args, **kwargs)


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    """Saved-tensor hook that keeps a tensor as it is (and gives it back as it is)."""
    return tensor
