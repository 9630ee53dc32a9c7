"""The LoRA part of a ReFT adapter (`ReftConfig.lora_config`): ReFT + LoRA in one model.

peft keeps one tuner type per `PeftModel`, so the LoRA layers of a ReFT adapter are injected by `ReftModel` itself,
with peft's own LoRA code and under the ReFT adapter's name. From then on they are ordinary peft tuner layers inside
the ReFT model: peft's structural state-dict code saves and loads them with the interventions, and enabling,
disabling, switching and deleting the adapter reach them as they reach the `ReftLayer`s.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from peft import LoraConfig, LoraModel
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .layer import ReftLayer


@contextlib.contextmanager
def _reft_layers_unwrapped(model: nn.Module) -> Iterator[None]:
    """Put each `ReftLayer`'s wrapped layer back in its place for the duration of the block.

    peft's injection does not look inside existing tuner layers; with the ReFT layers out of the way, the LoRA part sees
    the model's own module names (`model.layers.3.self_attn.q_proj`) whatever layers ReFT adapters have wrapped, so a
    saved LoRA part loads into any model. The LoRA layers it injects land inside the wrapped layers, which the
    `ReftLayer`s wrap again on exit.
    """
    places = [(_get_submodules(model, name)[0], name.rsplit(".", 1)[-1], module)
              for name, module in model.named_modules() if isinstance(module, ReftLayer)]
    for parent, child_name, layer in places:
        setattr(parent, child_name, layer.base_layer)
    try:
        yield
    finally:
        for parent, child_name, layer in places:
            setattr(parent, child_name, layer)


@contextlib.contextmanager
def _peft_config_set_aside(model: nn.Module) -> Iterator[None]:
    """peft's tuners share a `peft_config` dict they find on the model they wrap; the LoRA injection must not find
    (and write into) the ReFT model's, so it is set aside for the injection and put back after."""
    missing = object()
    saved = model.__dict__.pop("peft_config", missing)
    try:
        yield
    finally:
        model.__dict__.pop("peft_config", None)
        if saved is not missing:
            model.__dict__["peft_config"] = saved


def inject_lora_part(model: nn.Module, adapter_name: str, reft_config, low_cpu_mem_usage: bool = False) -> None:
    """Inject the LoRA layers of `reft_config.lora_config` into `model` under `adapter_name`, in place, with peft's
    LoRA code.

    As with LoRA, `"all-linear"` becomes the names of the model's linear layers (output head, classification head and
    the modules inside peft's `modules_to_save` wrappers excepted) and is written back into `lora_config`, so the
    saved config names what it adapted.
    """
    lora_config = reft_config.lora_config
    lora_config.inference_mode = reft_config.inference_mode
    lora_config.task_type = reft_config.task_type  # peft's "all-linear" leaves a SEQ_CLS head alone
    with _reft_layers_unwrapped(model), _peft_config_set_aside(model):
        if _targets_all_linear(lora_config):
            _maybe_include_all_linear_layers(lora_config, model)
            wrappers = [name for name, module in model.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)]
            lora_config.target_modules = {
                name for name in lora_config.target_modules
                if not any(name.startswith(wrapper + ".") for wrapper in wrappers)
            }
        LoraModel(model, lora_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)


def _targets_all_linear(lora_config: LoraConfig) -> bool:
    targets = lora_config.target_modules
    return isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND

