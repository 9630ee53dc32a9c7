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

from .config import COMPONENTS, ReftConfig
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


def from_pyreft(base_model, path: str | Path, positions: str, adapter_name: str = "default"):
    """A `PeftModel` with the LoReFT interventions of the pyreft checkpoint at `path`, edits at `positions`.

    Args:
        base_model: the transformers model the checkpoint was trained on.
        path: the directory written by pyreft (`ReftModel.save` or `ReftTrainer.save_model`).
        positions: the positions it was trained with, e.g. `"f7+l7"` (pyreft does not save them). With two
            interventions per layer (`#0` and `#1`), the first gets the first-N window and the second the last-M one.
        adapter_name: the name of the adapter in the returned model.
    """
    from peft import get_peft_model

    component, interventions = read_pyreft_interventions(path)
    layers = sorted({layer for layer, _ in interventions})
    per_layer = {layer: sorted(k for lay, k in interventions if lay == layer) for layer in layers}
    groups = {len(ks) for ks in per_layer.values()}
    if len(groups) != 1 or groups.pop() not in (1, 2):
        raise ValueError(f"Every layer must have the same number (1 or 2) of interventions; found {per_layer}.")
    num_groups = len(per_layer[layers[0]])
    for (layer, k), state in interventions.items():
        if set(state) != {"rotate_layer", "weight", "bias"}:
            raise ValueError(
                f"Intervention #{k} at layer {layer} has keys {sorted(state)}; only LoReFT checkpoints "
                "(rotate_layer, weight, bias) can be imported."
            )
    rank, hidden = interventions[(layers[0], 0)]["weight"].shape
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
