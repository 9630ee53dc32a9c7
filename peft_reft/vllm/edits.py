"""Applying ReFT edits inside a vLLM model, for the step in progress.

vLLM runs a step's tokens flattened (`[num_tokens, hidden]`): the edits are the package's own (`peft_reft.edit.
add_edits`, as `ReftLayer` applies them), on the step seen as one row. Its Llama-style decoder layers return
`(branch_output, residual)`: the block output that a transformers layer returns is their sum, formed by the next
layer's fused add-norm (or the final norm). So:

- `block_output`: when the layer edits some token of the step, the sum is formed into `residual` (`branch` set to
  zero; the next layer's sum is then `residual` itself) and edited there, so the next layer reads exactly the edited
  h that `PeftModel` computes;
- `mlp_output`: the branch the layer returns is the MLP's output: edited in place;
- `attention_output`: the output of the layer's attention submodule, edited in place.

The edits are two registered operators, `peft_reft::edit_layer` and `peft_reft::edit_attention`, that every decoder
layer (and its attention submodule) of a ReFT engine calls on its outputs: vLLM's torch.compile traces them into the
model's graph as opaque calls, in place, like its own attention operator, so the engine keeps its compiled mode. They
are added to the compilation's splitting operators, so a piecewise CUDA graph runs them eagerly between captured
pieces. What a call edits travels with the step: `running_step` (or `step_scope` and `set_step`) binds the model's
`LayerEdits` and the step's token indices (`peft_reft.vllm.plan`) around the model runner's forward pass
(`peft_reft.vllm.runners`); outside such a block (vLLM's warm-up,
profiling and graph-capture passes) the operators do nothing, and a step that edits nothing costs one dictionary
look-up per layer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..architecture import component_module
from ..call_state import CallState
from ..edit import add_edits
from .plan import StepEdits

LIBRARY = "peft_reft"
OPERATORS = (f"{LIBRARY}::edit_layer", f"{LIBRARY}::edit_attention")
# (the model's LayerEdits by layer index, the step's edits) of the forward pass in progress, in this thread
_STEP: CallState[tuple[Mapping[int, "LayerEdits"], StepEdits]] = CallState("reft_vllm_step")


@contextlib.contextmanager
def running_step(layers: Mapping[int, "LayerEdits"], edits: StepEdits) -> Iterator[None]:
    """Make `edits` (uid -> the step's token indices, `[1, groups, P]`, see `peft_reft.vllm.plan`) the edits that
    `layers` make in the model forward pass that runs inside this block (this thread only)."""
    with _STEP.bound((layers, edits) if edits else None):
        yield


@contextlib.contextmanager
def step_scope() -> Iterator[None]:
    """A block (a runner's whole step) inside which `set_step` gives the edits of the forward pass that follows; none
    before it, none after the block."""
    with _STEP.bound(None):
        yield


def set_step(layers: Mapping[int, "LayerEdits"], edits: StepEdits) -> None:
    """Inside a `step_scope` block: the edits of the forward pass that runs next in this thread."""
    _STEP.set((layers, edits) if edits else None)


def _fold_block(branch: torch.Tensor, residual: torch.Tensor) -> None:
    """Make `residual` hold the block output `branch + residual` (as the next layer's add forms it) and `branch`
    zero, in place: the next layer's sum is then the (edited) `residual` itself."""
    residual.add_(branch)
    branch.zero_()


def _work(layer: int, component: str) -> list[tuple[nn.ModuleList, torch.Tensor]]:
    step = _STEP.get()
    if step is None:
        return []
    layers, edits = step
    layer_edits = layers.get(layer)
    if layer_edits is None:
        return []
    adapters = layer_edits.by_component[component]
    return [(adapters[uid], locations) for uid, locations in edits.items() if uid in adapters]


def _edit_layer(branch: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    with torch.no_grad():
        for interventions, locations in _work(layer, "mlp_output"):
            add_edits(branch[None], interventions, locations)
        block = _work(layer, "block_output")
        if block:
            _fold_block(branch, residual)
            for interventions, locations in block:
                add_edits(residual[None], interventions, locations)


def _edit_attention(output: torch.Tensor, layer: int) -> None:
    with torch.no_grad():
        for interventions, locations in _work(layer, "attention_output"):
            add_edits(output[None], interventions, locations)


def _nothing(*args: Any) -> None:
    return None


def _define_operators() -> torch.library.Library:
    library = torch.library.Library(LIBRARY, "FRAGMENT")  # noqa: TOR901 (kept for the process's lifetime)
    library.define("edit_layer(Tensor(a!) branch, Tensor(b!) residual, int layer) -> ()")
    library.define("edit_attention(Tensor(a!) output, int layer) -> ()")
    for name, function in (("edit_layer", _edit_layer), ("edit_attention", _edit_attention)):
        library.impl(name, function, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{LIBRARY}::{name}", _nothing, lib=library)
    return library


_LIBRARY = _define_operators()


class LayerEdits:
    """The served adapters' interventions at one decoder layer: `by_component[component][uid]` is the adapter's
    `ModuleList` (index = group). The interventions are not registered as submodules: vLLM's model keeps exactly its
    own modules (and weights)."""

    def __init__(self, layer_index: int):
        self.layer_index = layer_index
        self.by_component: dict[str, dict[str, nn.ModuleList]] = {
            component: {} for component in ("block_output", "mlp_output", "attention_output")}

    def add(self, uid: str, component: str, interventions: nn.ModuleList) -> None:
        """Edit `component` of the layer with `interventions` for the requests of adapter `uid`."""
        self.by_component[component][uid] = interventions

    def remove(self, uid: str) -> None:
        for adapters in self.by_component.values():
            adapters.pop(uid, None)


def attach(layers: nn.ModuleList) -> list[Any]:
    """Make every decoder layer of `layers` (and its attention submodule) call the edit operators on its outputs; the
    hooks hold nothing but the layer's index. Returns the hook handles."""
    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(_LayerHook(index)))
        handles.append(component_module(layer, "attention_output").register_forward_hook(_AttentionHook(index)))
    return handles


class _LayerHook:
    def __init__(self, index: int):
        self.index = index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        branch, residual = _layer_output(module, output)
        torch.ops.peft_reft.edit_layer(branch, residual, self.index)


class _AttentionHook:
    def __init__(self, index: int):
        self.index = index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        torch.ops.peft_reft.edit_attention(output if isinstance(output, torch.Tensor) else output[0], self.index)


def _layer_output(module: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(output, tuple) and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in output)):
        raise RuntimeError(
            f"ReFT: {type(module).__name__} did not return (hidden_states, residual), the layout the vLLM integration "
            "edits; this model is not supported."
        )
    return output
