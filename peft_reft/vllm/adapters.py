"""ReFT adapters as a serving engine holds them: declared by name and folder, read from the folder (JSON config and
safetensors: no code from the file runs), checked against the served model, and built from the package's own
interventions.

Nothing here imports vLLM: the checks run in vLLM's front end (when the engine's config is built, so that a bad
adapter stops the server before it starts) and again in each worker, which loads the weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from peft.utils import TaskType
from safetensors import safe_open
from torch import nn

from ..config import ReftConfig
from ..interventions import build_intervention
from ..positions import PositionSpec

ADAPTERS_KEY = "reft_adapters"  # vLLM's `additional_config`: {adapter name: adapter folder}
MAX_ADAPTERS_KEY = "max_reft_adapters"  # vLLM's `additional_config`: how many adapters the engine holds at once
DEFAULT_MAX_ADAPTERS = 64
REQUEST_KEY = "reft_adapter"  # a request's `SamplingParams.extra_args` (the server's `vllm_xargs`): the adapter's name
# set by the engine's front end on its own copy of a request's sampling parameters: which load of the named adapter
# serves the request (a name reused after an unload is another adapter, with KV cache blocks of its own)
UID_KEY = "reft_adapter_uid"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# decoder layers whose forward returns `(branch output, residual)`, the block output being their sum: the layout the
# edits in `peft_reft.vllm.edits` are written for (tested: Llama, Qwen2)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_KEY = re.compile(r"\.(\d+)\.reft_interventions\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ServedAdapter:
    """A declared adapter: its name, its folder and its (checked) config."""

    name: str
    path: str
    config: ReftConfig
    # this load of the adapter: its name for adapters declared at start-up, `name@<random>` for one loaded at run time
    uid: str = ""

    def __post_init__(self):
        if not self.uid:
            object.__setattr__(self, "uid", self.name)

    @property
    def spec(self) -> PositionSpec:
        return self.config.position_spec

    @property
    def share_weights(self) -> bool:
        return self.config.share_weights

    @property
    def num_groups(self) -> int:
        return self.config.num_groups


def reft_enabled(additional_config: Any) -> bool:
    """Whether an engine serves ReFT adapters: its `additional_config` declares some (`reft_adapters`) or makes room
    for adapters loaded at run time (`max_reft_adapters`), as `enable_lora` / `max_loras` do for LoRA."""
    return isinstance(additional_config, Mapping) and (
        ADAPTERS_KEY in additional_config or MAX_ADAPTERS_KEY in additional_config)


def max_adapters(additional_config: Any) -> int:
    """How many ReFT adapters the engine holds at once (`max_reft_adapters`, default 64)."""
    limit = additional_config.get(MAX_ADAPTERS_KEY, DEFAULT_MAX_ADAPTERS) if isinstance(
        additional_config, Mapping) else DEFAULT_MAX_ADAPTERS
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"additional_config[{MAX_ADAPTERS_KEY!r}] must be a positive integer; got {limit!r}.")
    return limit


def declared_adapters(additional_config: Any) -> dict[str, str]:
    """The adapters declared in vLLM's `additional_config` (`{"reft_adapters": {name: folder}}`), {} if none."""
    if not isinstance(additional_config, Mapping) or ADAPTERS_KEY not in additional_config:
        return {}
    declared = additional_config[ADAPTERS_KEY]
    if not isinstance(declared, Mapping) or not all(
        isinstance(name, str) and name and isinstance(path, str) and path for name, path in declared.items()
    ) or not (declared or MAX_ADAPTERS_KEY in additional_config):
        raise ValueError(
            f"additional_config[{ADAPTERS_KEY!r}] must map adapter names to adapter folders, e.g. "
            f'{{"{ADAPTERS_KEY}": {{"emoji": "outputs/reft-emoji"}}}}; got {declared!r}.'
        )
    limit = max_adapters(additional_config)
    if len(declared) > limit:
        raise ValueError(
            f"{len(declared)} ReFT adapters are declared, more than the engine holds ({MAX_ADAPTERS_KEY}={limit}): "
            f'raise it, e.g. additional_config {{"{MAX_ADAPTERS_KEY}": {len(declared)}, ...}}.'
        )
    return dict(declared)


def is_reft_folder(path: str) -> bool:
    """Whether `path` holds a saved adapter whose config says it is a ReFT adapter (JSON only; a LoRA folder is not)."""
    try:
        fields = json.loads((Path(path).expanduser() / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(fields, dict) and fields.get("peft_type") == "REFT"


def read_adapter(name: str, path: str, uid: str = "") -> ServedAdapter:
    """Read and check the config of the adapter saved in `path` (`save_pretrained`'s folder); `uid`: which load of
    the adapter this is (default: its name, as for adapters declared at start-up)."""
    folder = Path(path).expanduser()
    config_file = folder / CONFIG_FILE
    if not config_file.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"ReFT adapter {name!r}: {folder} holds no saved adapter ({CONFIG_FILE} and {WEIGHTS_FILE}, as "
            "`PeftModel.save_pretrained` writes them)."
        )
    try:
        fields = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"ReFT adapter {name!r}: {config_file} is not valid JSON ({error}).") from None
    if not isinstance(fields, dict) or fields.get("peft_type") != "REFT":
        kind = fields.get("peft_type") if isinstance(fields, dict) else None
        raise ValueError(
            f"ReFT adapter {name!r}: {config_file} is not a ReFT adapter (peft_type={kind!r}). Serve LoRA adapters "
            "with vLLM's own `enable_lora` / `--lora-modules`."
        )
    config = ReftConfig.from_peft_type(**fields)  # the same checks as ReftConfig(...); plain values only
    unsupported = []
    if config.task_type != TaskType.CAUSAL_LM:
        unsupported.append(f"task_type={config.task_type!r} (serving generates text: CAUSAL_LM only)")
    if config.lora_config is not None:
        unsupported.append("a LoRA part (lora_config)")
    if config.modules_to_save:
        unsupported.append(f"modules_to_save={config.modules_to_save}")
    if config.trainable_token_indices:
        unsupported.append("trainable_token_indices")
    if unsupported:
        raise ValueError(
            f"ReFT adapter {name!r} ({folder}) cannot be served with vLLM: it has {'; '.join(unsupported)}, which "
            "the vLLM integration does not apply. Serve it with `PeftModel.generate`, or train an adapter without them."
        )
    return ServedAdapter(name=name, path=str(folder), config=config, uid=uid)


def served_key(saved_key: str) -> str:
    """The name a serving engine gives a tensor of a saved adapter (`...layers.3.reft_interventions.1.W.weight` ->
    `3.1.W.weight`: layer, group, parameter)."""
    match = _KEY.search(saved_key)
    if match is None:
        raise ValueError(f"{saved_key!r} is not an intervention parameter of a ReFT adapter.")
    return f"{match.group(1)}.{match.group(2)}.{match.group(3)}"


def _tensor_shapes(adapter: ServedAdapter) -> dict[tuple[int, int, str], tuple[int, ...]]:
    """(layer, group, parameter) -> shape, for every tensor of the adapter's safetensors file (header only)."""
    shapes = {}
    with safe_open(str(Path(adapter.path) / WEIGHTS_FILE), framework="pt") as weights:
        for key in weights.keys():
            match = _KEY.search(key)
            if match is None:
                raise ValueError(
                    f"ReFT adapter {adapter.name!r}: {WEIGHTS_FILE} holds {key!r}, which is not an intervention "
                    "parameter; the vLLM integration serves interventions only."
                )
            layer, group, parameter = int(match.group(1)), int(match.group(2)), match.group(3)
            shapes[(layer, group, parameter)] = tuple(weights.get_slice(key).get_shape())
    return shapes


def check_fits(adapter: ServedAdapter, architectures: list[str], hidden_size: int, num_layers: int) -> list[int]:
    """Check that `adapter` was made for a model like the served one (its architecture, `hidden_size` and
    `num_layers`); return the adapter's layer indices. A ValueError names the adapter and what does not fit."""
    name = adapter.name
    if not set(architectures or ()) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(
            f"ReFT adapter {name!r}: the served model is {architectures}; the vLLM integration edits "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models (their layers' residual-stream layout). Serve this model's "
            "adapters with `PeftModel.generate`."
        )
    shapes = _tensor_shapes(adapter)
    layers = sorted({layer for layer, _, _ in shapes})
    expected = list(range(num_layers)) if adapter.config.layers == "all" else adapter.config.layers
    if not layers or any(i >= num_layers for i in layers) or layers != sorted(expected):
        raise ValueError(
            f"ReFT adapter {name!r} edits layers {layers} (config: {adapter.config.layers}), but the served model has "
            f"{num_layers} layers (0..{num_layers - 1}): the adapter was made for another base model."
        )
    groups = {group for _, group, _ in shapes}
    if groups != set(range(adapter.num_groups)):
        raise ValueError(
            f"ReFT adapter {name!r}: its weights hold intervention groups {sorted(groups)} but its config "
            f"(positions={adapter.config.positions!r}, share_weights={adapter.config.share_weights}) has "
            f"{adapter.num_groups}; the folder's files do not belong together."
        )
    widths = {shape[-1] for (_, _, parameter), shape in shapes.items() if parameter.endswith("weight")}
    if widths != {hidden_size}:
        raise ValueError(
            f"ReFT adapter {name!r} was trained on hidden size {sorted(widths)}, but the served model's hidden size "
            f"is {hidden_size}: the adapter was made for another base model."
        )
    return layers


def load_interventions(
    adapter: ServedAdapter, hidden_size: int, device: torch.device | str
) -> dict[int, nn.ModuleList]:
    """Layer index -> the adapter's interventions at that layer (index = group), built by the package's
    `build_intervention` and loaded from the safetensors file, in eval mode, float32, on `device`."""
    config = adapter.config
    layers: dict[int, nn.ModuleList] = {}
    states: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    with safe_open(str(Path(adapter.path) / WEIGHTS_FILE), framework="pt") as weights:
        for key in weights.keys():
            match = _KEY.search(key)
            states.setdefault((int(match.group(1)), int(match.group(2))), {})[match.group(3)] = weights.get_tensor(key)
    for layer in sorted({layer for layer, _ in states}):
        interventions = nn.ModuleList(
            build_intervention(config.intervention, hidden_size, config.low_rank_dimension, dropout=0.0,
                               act_fn=config.act_fn, init_weights=False)
            for _ in range(adapter.num_groups)
        )
        for group, intervention in enumerate(interventions):
            intervention.load_state_dict(states[(layer, group)], strict=True)
        layers[layer] = interventions.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return layers
