"""What ReFT needs to know about a transformers model: its stack of transformer layers, the width of its residual
stream, the submodule each `component` names, and whether the model fits ReFT at all."""

from __future__ import annotations

from typing import Optional, Sequence

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import TaskType
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from torch import nn

# what `ReftConfig.component` may name: the layer's output, or the output of its attention / MLP submodule, found by
# one of these attribute names
COMPONENT_SUBMODULES = {
    "block_output": (),
    "mlp_output": ("mlp", "feed_forward", "ffn"),
    "attention_output": ("self_attn", "attn", "attention", "self_attention"),
}
COMPONENTS = tuple(COMPONENT_SUBMODULES)
# models whose layers see hidden states laid out [seq_len, batch, hidden]: a square batch could not be told apart
TIME_MAJOR_MODEL_TYPES = ("xlnet", "fsmt")


def component_module(layer: nn.Module, component: str) -> nn.Module:
    """The module of `layer` whose output `component` edits: the layer itself for `"block_output"`, else its attention
    or MLP submodule (found by name, see `COMPONENT_SUBMODULES`)."""
    if component == "block_output":
        return layer
    for name in COMPONENT_SUBMODULES[component]:
        child = layer._modules.get(name)
        if child is not None:
            return child
    raise ValueError(
        f"component={component!r} is not available for {type(layer).__name__}: it has no submodule named "
        f"{' / '.join(COMPONENT_SUBMODULES[component])} (its submodules: {list(layer._modules)}). "
        "Use component='block_output'."
    )


def text_config(model: nn.Module):
    """The model's config, or the text part of a multimodal one."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the stack of transformer layers (decoder or encoder blocks): the `ModuleList` of identical blocks with one
    entry per hidden layer.

    Works without a per-architecture table: among the module lists of the model whose entries are all of one class,
    it prefers one of `config.num_hidden_layers` entries whose class is in the model's `_no_split_modules`.
    """
    num_layers = getattr(text_config(model), "num_hidden_layers", None)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(_unwrapped(m)) for m in module}
        if len(classes) != 1:
            continue
        cls = classes.pop()
        score = (cls.__name__ in no_split, len(module) == num_layers, len(module))
        candidates.append((score, name, module))
    if not candidates:
        raise ValueError(
            f"Could not find the transformer layers of {type(model).__name__}: no nn.ModuleList of identical blocks."
        )
    best = max(c[0] for c in candidates)
    tied = [name for score, name, _ in candidates if score == best]
    if len(tied) > 1:
        raise ValueError(
            f"{type(model).__name__} has several stacks of transformer layers ({', '.join(tied)}) and ReFT cannot tell "
            "which one holds the hidden states to edit; it supports models with one stack (decoders and encoders)."
        )
    _, name, module = max(candidates, key=lambda c: c[0])
    return name, module


def hidden_size_of(model: nn.Module) -> int:
    """The width of the residual stream, from the model's (text) config."""
    config = text_config(model)
    for attribute in ("hidden_size", "n_embd", "d_model"):
        size = getattr(config, attribute, None)
        if isinstance(size, int):
            return size
    raise ValueError(f"Could not read the hidden size of {type(model).__name__} from its config.")


def checked_layer_indices(model: nn.Module, layers: Sequence[int], what: str) -> list[int]:
    """`layers` if every index is one of the model's transformer layers; else a ValueError that starts with `what`
    (where the indices come from)."""
    num_layers = len(find_layer_stack(model)[1])
    out_of_range = [i for i in layers if not 0 <= i < num_layers]
    if out_of_range:
        raise ValueError(
            f"{what} has index(es) {out_of_range} out of range: {type(model).__name__} has {num_layers} layers (valid "
            f"indices 0..{num_layers - 1})."
        )
    return list(layers)


def classifier_pad_token_id(model: nn.Module) -> Optional[int]:
    """For a decoder classifier (a `score` head, e.g. LlamaForSequenceClassification), the padding id by which
    transformers finds the token the head reads: the rightmost token that is not padding. None for encoders (their
    head reads a pooled first token) and for decoders without a padding id (they read the last token)."""
    if not isinstance(getattr(model, "score", None), nn.Module):
        return None
    pad_token_id = getattr(text_config(model), "pad_token_id", None)
    return pad_token_id if isinstance(pad_token_id, int) else None


def check_model_fits(model: nn.Module, task_type: str, modules_to_save: Optional[Sequence[str]]) -> None:
    """Raise a ValueError that says what to use instead when ReFT cannot edit `model` for `task_type`."""
    name = type(model).__name__
    model_type = getattr(text_config(model), "model_type", None)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"{name} ({model_type}) is an encoder-decoder model, which ReFT does not support: the prompt is the "
            "encoder's input while labels and generation live in the decoder, so positions derived from a batch "
            "would land on the wrong stack. Use a decoder-only model (causal LM) or an encoder with a "
            "classification head (task_type='SEQ_CLS')."
        )
    if model_type in TIME_MAJOR_MODEL_TYPES:
        raise ValueError(
            f"{name} ({model_type}) is not supported: its layers run on hidden states laid out [seq_len, batch, "
            "hidden], while ReFT places its edits on [batch, seq_len, hidden]."
        )
    if task_type == TaskType.CAUSAL_LM and hasattr(model, "can_generate") and not model.can_generate():
        raise ValueError(
            f"ReftConfig(task_type='CAUSAL_LM') needs a model that generates text, and {name} does not. For a "
            "model with a classification head (e.g. AutoModelForSequenceClassification) use task_type='SEQ_CLS'."
        )
    # peft's SEQ_CLS model adds its head names (`classifier`, `score`) to modules_to_save; a head named otherwise is
    # listed there
    heads = set(SEQ_CLS_HEAD_NAMES) | set(modules_to_save or ())
    if task_type == TaskType.SEQ_CLS and not any(
        module_name.rsplit(".", 1)[-1] in heads for module_name, _ in model.named_modules()
    ):
        raise ValueError(
            f"ReftConfig(task_type='SEQ_CLS') needs a model with a classification head (a `classifier` or `score` "
            f"module, e.g. from AutoModelForSequenceClassification, or a head named in `modules_to_save`); {name} "
            "has none."
        )
