"""Import a LoReFT checkpoint written by pyreft (`ReftModel.save` / `ReftTrainer.save_model`) as a peft ReFT adapter.

pyreft writes one `intkey_<key>.bin` per intervention (a `torch.save`d state dict), the key naming the layer and the
component: `layer_<l>_comp_<component>_unit_pos_nunit_<n>#<k>`, with component `block_output`, `mlp_output` or
`attention_output` here (pyvene's names, which `ReftConfig.component` shares). `#0` is the first intervention at a
layer and `#1` the second; with untied prefix/suffix interventions pyreft gives the prefix (first-N) positions to `#0`
and the suffix (last-M) positions to `#1`. A LoReFT state dict holds `rotate_layer` (R^T, `[d, r]`), `weight` (W,
`[r, d]`) and `bias` (b, `[r]`). pyreft does not save the positions, so they are given here.

Files are read with `torch.load(weights_only=True)`, which loads tensors only and never executes code from the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .architecture import COMPONENTS, checked_layer_indices, hidden_size_of
from .config import ReftConfig
from .layer import ReftLayer

_KEY = re.compile(r"^intkey_layer_(\d+)_comp_(\w+?)_unit_pos_nunit_\d+#(\d+)\.bin$")


def read_pyreft_interventions(path: str | Path) -> tuple[str, dict[tuple[int, int], dict[str, torch.Tensor]]]:
    """The component and the `{(layer, k): state dict}` of the interventions in a pyreft checkpoint directory."""
    path = Path(path)
    folders = [path, path / "intervenable_model"]
    files = [f for folder in folders if folder.is_dir() for f in sorted(folder.iterdir()) if _KEY.match(f.name)]
    if not files:
        raise ValueError(f"No pyreft intervention files (intkey_layer_<l>_comp_..._#<k>.bin) found in {path}.")
    interventions, components = {}, set()
    for file in files:
        layer, component, k = _KEY.match(file.name).groups()
        if component not in COMPONENTS:
            raise ValueError(f"{file.name}: component {component!r} is not supported; use one of {COMPONENTS}.")
        components.add(component)
        interventions[(int(layer), int(k))] = torch.load(file, map_location="cpu", weights_only=True)
    if len(components) > 1:
        raise ValueError(f"The checkpoint mixes components {sorted(components)}; one adapter edits one component.")
    return components.pop(), interventions


def _check_checkpoint(interventions: dict[tuple[int, int], dict[str, torch.Tensor]],
                      model) -> tuple[list[int], int, int]:
    """Validate every tensor of a pyreft LoReFT checkpoint against the model before anything is built; return the
    layers, the rank and the number of interventions per layer."""
    layers = sorted({layer for layer, _ in interventions})
    checked_layer_indices(model, layers, f"The checkpoint's layer list {layers}")
    hidden_size = hidden_size_of(model)
    per_layer = {layer: sorted(k for lay, k in interventions if lay == layer) for layer in layers}
    groups = {tuple(ks) for ks in per_layer.values()}
    if len(groups) != 1 or groups.pop() not in ((0,), (0, 1)):
        raise ValueError(
            f"Every layer must have intervention #0, or #0 and #1; the checkpoint has {per_layer} (layer: numbers)."
        )
    rank = None
    for (layer, k), state in sorted(interventions.items()):
        where = f"intervention #{k} at layer {layer}"
        if set(state) != {"rotate_layer", "weight", "bias"}:
            raise ValueError(
                f"{where} has keys {sorted(state)}; only LoReFT checkpoints (rotate_layer, weight, bias) can be "
                "imported."
            )
        if rank is None:
            rank = state["weight"].shape[0] if state["weight"].dim() == 2 else -1
        expected = {"rotate_layer": (hidden_size, rank), "weight": (rank, hidden_size), "bias": (rank,)}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape or not state[key].is_floating_point():
                raise ValueError(
                    f"{where}: `{key}` has shape {list(state[key].shape)} ({state[key].dtype}); expected a float "
                    f"tensor of shape {list(shape)} (hidden size {hidden_size} of the model, rank {rank} of the "
                    "checkpoint)."
                )
    if not 1 <= rank <= hidden_size:
        raise ValueError(f"The checkpoint's rank {rank} must be in 1..{hidden_size} (the model's hidden size).")
    return layers, rank, len(per_layer[layers[0]])


def from_pyreft(base_model, path: str | Path, positions: str, adapter_name: str = "default"):
    """A `PeftModel` with the LoReFT interventions of the pyreft checkpoint at `path`, edits at `positions`.

    The whole checkpoint is checked against the model (keys, shapes, rank, hidden size, layer indices) before the
    model is touched: on an error, `base_model` is left as it was.

    Args:
        base_model: the transformers model the checkpoint was trained on.
        path: the directory written by pyreft (`ReftModel.save` or `ReftTrainer.save_model`).
        positions: the positions it was trained with, e.g. `"f7+l7"` (pyreft does not save them). With two
            interventions per layer (`#0` and `#1`), the first gets the first-N window and the second the last-M one.
        adapter_name: the name of the adapter in the returned model.
    """
    from peft import get_peft_model

    component, interventions = read_pyreft_interventions(path)
    layers, rank, num_groups = _check_checkpoint(interventions, base_model)
    config = ReftConfig(layers=layers, low_rank_dimension=rank, positions=positions, intervention="loreft",
                        share_weights=num_groups == 1, init_weights=False, component=component)
    if config.num_groups != num_groups:
        raise ValueError(
            f"positions={positions!r} needs {config.num_groups} intervention(s) per layer, the checkpoint has "
            f"{num_groups}: use 'fN+lM' for two, 'fN' / 'lM' (or shared 'fN+lM') for one."
        )
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    layer_modules = {int(name.rsplit(".", 1)[1]): module for name, module in model.named_modules()
                     if isinstance(module, ReftLayer)}
    with torch.no_grad():
        for (layer, k), state in interventions.items():
            target = layer_modules[layer].reft_interventions[adapter_name][k]
            target.rotate_layer.weight.copy_(state["rotate_layer"].float().T)  # R^T [d, r] -> R [r, d]
            target.learned_source.weight.copy_(state["weight"].float())
            target.learned_source.bias.copy_(state["bias"].float())
    return model
