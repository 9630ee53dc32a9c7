"""Applying ReFT edits inside a vLLM model, for the step in progress.

vLLM runs a step's tokens flattened (`[num_tokens, hidden]`). Its Llama-style decoder layers return
`(branch_output, residual)`: the block output that a transformers layer returns is their sum, formed by the next
layer's fused add-norm (or the final norm). So:

- `block_output`: at an edited token, h = branch + residual is edited, written into `residual`, and `branch` is set to
  zero, so that the sum the next layer forms is exactly the edited h (as `PeftModel` computes it, bit for bit);
- `mlp_output`: the branch the layer returns is the MLP's output: edited in place;
- `attention_output`: the output of the layer's attention submodule, edited by a hook on that submodule.

The edits of a step travel with the step (`running_step`, bound by the model runner around its forward pass), never as
attributes left on modules. Outside such a block (vLLM's warm-up and profiling passes) nothing is edited.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..architecture import component_module
from ..call_state import CallState
from .plan import StepEdits

_STEP_EDITS: CallState[StepEdits] = CallState("reft_vllm_step_edits")


@contextlib.contextmanager
def running_step(edits: StepEdits) -> Iterator[None]:
    """Make `edits` the edits of the model forward pass that runs inside this block (this thread only)."""
    with _STEP_EDITS.bound(edits):
        yield


def _edited_rows(hidden: torch.Tensor, interventions: nn.ModuleList, groups: list[torch.Tensor]) -> None:
    """`hidden[t] = intervention_g(hidden[t])` for the tokens t of each group g, in place."""
    for intervention, index in zip(interventions, groups):
        if index.numel():
            hidden.index_copy_(0, index, intervention.edited(hidden.index_select(0, index)))


def _edited_block(branch: torch.Tensor, residual: torch.Tensor, interventions: nn.ModuleList,
                  groups: list[torch.Tensor]) -> None:
    """The block output `branch + residual` edited at the tokens of each group: the edited sum goes into `residual`,
    zero into `branch`, in place."""
    for intervention, index in zip(interventions, groups):
        if index.numel():
            block = branch.index_select(0, index) + residual.index_select(0, index)
            residual.index_copy_(0, index, intervention.edited(block))
            branch.index_fill_(0, index, 0)


class LayerEdits:
    """The served adapters' interventions at one decoder layer: `by_component[component][uid]` is the adapter's
    `ModuleList` (index = group). Its methods are the layer's forward hooks; it owns no state of a step. The
    interventions are not registered as submodules: vLLM's model keeps exactly its own modules (and weights)."""

    def __init__(self, layer_index: int):
        self.layer_index = layer_index
        self.by_component: dict[str, dict[str, nn.ModuleList]] = {
            component: {} for component in ("block_output", "mlp_output", "attention_output")}
        self.handles: list[Any] = []
        self._attention_hooked = False

    def attach(self, layer: nn.Module) -> None:
        """Hook the layer (`block_output` and `mlp_output` edits)."""
        self.handles.append(layer.register_forward_hook(self.edit_layer))

    def add(self, uid: str, component: str, interventions: nn.ModuleList, layer: nn.Module) -> None:
        """Edit `component` of the layer with `interventions` for the requests of adapter `uid`."""
        if component == "attention_output" and not self._attention_hooked:
            attention = component_module(layer, "attention_output")
            self.handles.append(attention.register_forward_hook(self.edit_attention))
            self._attention_hooked = True
        self.by_component[component][uid] = interventions

    def remove(self, uid: str) -> None:
        for adapters in self.by_component.values():
            adapters.pop(uid, None)

    def _work(self, component: str) -> list[tuple[nn.ModuleList, list[torch.Tensor]]]:
        edits = _STEP_EDITS.get()
        if not edits:
            return []
        adapters = self.by_component[component]
        return [(adapters[uid], groups) for uid, groups in edits.items() if uid in adapters]

    def edit_layer(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the decoder layer: `block_output` and `mlp_output` edits."""
        block, branch = self._work("block_output"), self._work("mlp_output")
        if not (block or branch):
            return None
        hidden, residual = _layer_output(module, output)
        for interventions, groups in branch:
            _edited_rows(hidden, interventions, groups)
        for interventions, groups in block:
            _edited_block(hidden, residual, interventions, groups)
        return output

    def edit_attention(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the layer's attention submodule: `attention_output` edits."""
        for interventions, groups in self._work("attention_output"):
            _edited_rows(output if isinstance(output, torch.Tensor) else output[0], interventions, groups)
        return None


def _layer_output(module: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(output, tuple) and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in output)):
        raise RuntimeError(
            f"ReFT: {type(module).__name__} did not return (hidden_states, residual), the layout the vLLM integration "
            "edits; this model is not supported."
        )
    return output
