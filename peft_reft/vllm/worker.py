"""The ReFT adapters one vLLM worker holds for its model: added at start-up and at run time, retired when unloaded.

A worker's model gets one `ServedModel` when its weights are loaded (in an engine that serves ReFT). Adapters are kept
by uid (one load of an adapter, see `ServedAdapter.uid`), so a request keeps the adapter it started with when the
name is unloaded or loaded again while it runs: a retired adapter's interventions are dropped once no request of the
model runner still names it. The front end reaches a worker through vLLM's `collective_rpc` with the methods of
`WorkerMethods`, which the plugin adds to vLLM's worker base class.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .adapters import ServedAdapter, check_fits, load_interventions
from .edits import LayerEdits, attach


class ServedModel:
    """A vLLM model's decoder `layers` and the ReFT adapters they apply.

    Every layer calls the edit operators (`peft_reft.vllm.edits.attach`) from the start, whatever adapters come later:
    a compiled model is traced once, so an adapter loaded at run time edits layers that the trace already calls."""

    def __init__(self, layers: nn.ModuleList, architectures: list[str], hidden_size: int, device: torch.device):
        self.layers = layers
        self.architectures = architectures
        self.hidden_size = hidden_size
        self.device = device
        self.adapters: dict[str, ServedAdapter] = {}  # uid -> adapter
        self.interventions: dict[str, dict[int, nn.ModuleList]] = {}  # uid -> layer index -> interventions
        self.retired: set[str] = set()
        self.layer_edits: dict[int, LayerEdits] = {index: LayerEdits(index) for index in range(len(layers))}
        self.hooks = attach(layers)

    def add(self, adapter: ServedAdapter) -> None:
        """Check `adapter` against the model, build its interventions and hook them into their layers."""
        check_fits(adapter, self.architectures, self.hidden_size, len(self.layers))
        interventions = load_interventions(adapter, self.hidden_size, self.device)
        for index, modules in interventions.items():
            self.layer_edits[index].add(adapter.uid, adapter.config.component, modules)
        self.adapters[adapter.uid] = adapter
        self.interventions[adapter.uid] = interventions
        self.retired.discard(adapter.uid)

    def add_check_adapters(self) -> None:
        """Add the start-up check's adapters (`peft_reft.vllm.proof.PROBES`): at every layer, a LoBiReFT edit of the
        last prompt tokens that adds a fixed vector (the same on every rank) to the block output or the attention
        output."""
        from ..config import ReftConfig
        from ..interventions import build_intervention
        from .proof import PROBE_POSITIONS, PROBE_SCALE, PROBES

        generator = torch.Generator().manual_seed(0)
        for uid, component in PROBES.items():
            config = ReftConfig(intervention="lobireft", layers="all", positions=PROBE_POSITIONS,
                                low_rank_dimension=1, component=component)
            interventions = {}
            for index in range(len(self.layers)):
                intervention = build_intervention("lobireft", self.hidden_size, 1, dropout=0.0, act_fn=None,
                                                  init_weights=False)
                with torch.no_grad():
                    intervention.rotate_layer.weight.copy_(torch.randn(1, self.hidden_size, generator=generator))
                    intervention.learned_source.fill_(PROBE_SCALE)
                interventions[index] = nn.ModuleList([intervention]).to(self.device).eval().requires_grad_(False)
                self.layer_edits[index].add(uid, component, interventions[index])
            self.adapters[uid] = ServedAdapter(name=uid, path="", config=config, uid=uid)
            self.interventions[uid] = interventions

    def retire(self, uid: str) -> None:
        """No new request names this adapter; its interventions go once the requests that do have finished."""
        if uid in self.adapters:
            self.retired.add(uid)

    def drop_retired(self, in_use: Iterable[str]) -> None:
        """Drop the retired adapters that no request in `in_use` (the uids of the runner's requests) names."""
        for uid in self.retired - set(in_use):
            for edits in self.layer_edits.values():
                edits.remove(uid)
            del self.adapters[uid]
            del self.interventions[uid]
            self.retired.discard(uid)

    def state(self, uid: str) -> dict[str, torch.Tensor]:
        """The adapter's intervention tensors as `intervention_state` names them."""
        return intervention_state(self._held(uid))

    def update(self, uid: str, state: dict[str, torch.Tensor]) -> None:
        """Write new values into the adapter's interventions, in place (the weights of a policy being trained; keys
        as `intervention_state` names them: every tensor of the adapter, none other)."""
        interventions = self._held(uid)
        if set(state) != set(intervention_state(interventions)):
            missing = sorted(set(intervention_state(interventions)) - set(state))[:3]
            unknown = sorted(set(state) - set(intervention_state(interventions)))[:3]
            raise ValueError(f"ReFT adapter {uid!r}: the update does not hold the adapter's tensors (missing: "
                             f"{missing}, unknown: {unknown}).")
        with torch.no_grad():
            for key, value in state.items():
                layer, group, name = _split(key)
                target = dict(interventions[layer][group].state_dict(keep_vars=True))[name]
                if target.shape != value.shape:
                    raise ValueError(f"ReFT adapter {uid!r}: {key} has shape {tuple(value.shape)}, the served one "
                                     f"{tuple(target.shape)}.")
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def _held(self, uid: str) -> dict[int, nn.ModuleList]:
        if uid not in self.interventions:
            raise ValueError(f"ReFT adapter {uid!r} is not held by this engine (held: {sorted(self.interventions)}).")
        return self.interventions[uid]


def intervention_state(interventions: dict[int, nn.ModuleList]) -> dict[str, torch.Tensor]:
    """`{"<layer>.<group>.<parameter>": tensor}` for an adapter's interventions (layer index -> groups)."""
    return {f"{layer}.{group}.{name}": tensor for layer, modules in interventions.items()
            for group, module in enumerate(modules) for name, tensor in module.state_dict(keep_vars=True).items()}


def _split(key: str) -> tuple[int, int, str]:
    layer, group, name = key.split(".", 2)
    return int(layer), int(group), name


class WorkerMethods:
    """What the front end asks of every worker through `collective_rpc` (method names start with `peft_reft_`)."""

    def peft_reft_add_adapter(self, name: str, path: str, uid: str) -> str:
        """Load the ReFT adapter saved in `path` as `name` (this load: `uid`) into the worker's model."""
        from .plugin import add_adapter_in_worker

        return add_adapter_in_worker(self, name, path, uid)

    def peft_reft_retire_adapter(self, uid: str) -> None:
        """Retire the adapter loaded as `uid`: its interventions go once no request names it."""
        from .plugin import served_model_of_worker

        served_model_of_worker(self).retire(uid)

    def peft_reft_update_adapter(self, uid: str, state: dict) -> None:
        """Write new tensor values into the adapter loaded as `uid` (`ServedModel.update`)."""
        from .plugin import served_model_of_worker

        served_model_of_worker(self).update(uid, state)

    def peft_reft_adapter_state(self, uid: str) -> dict:
        """The adapter's tensors as the worker holds them, as nested lists of floats (exact for float32; plain JSON,
        so that the server's development endpoint `POST /collective_rpc` can return them too)."""
        from .plugin import served_model_of_worker

        return {k: v.detach().float().cpu().tolist() for k, v in served_model_of_worker(self).state(uid).items()}

    def peft_reft_adapters(self) -> list[str]:
        """The uids of the adapters the worker holds (retired ones still in use included), in the order of loading."""
        from .plugin import served_model_of_worker
        from .proof import PROBES

        return [uid for uid in served_model_of_worker(self).adapters if uid not in PROBES]


def find_layer_stack(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The `ModuleList` of a vLLM model's `num_layers` decoder layers, found by the package's rule
    (`peft_reft.architecture.find_layer_stack`, as for a transformers model)."""
    from ..architecture import find_layer_stack as package_rule

    try:
        _, stack = package_rule(model)
    except ValueError as error:
        raise ValueError(f"ReFT: {error} This model is not supported by the vLLM integration.") from None
    if len(stack) != num_layers:
        raise ValueError(
            f"ReFT: the layer stack of {type(model).__name__} has {len(stack)} layers, its config {num_layers}; this "
            "model is not supported by the vLLM integration."
        )
    return stack


__all__ = ["ServedModel", "WorkerMethods", "find_layer_stack"]
