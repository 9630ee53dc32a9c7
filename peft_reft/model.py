"""`ReftModel`: the peft tuner that wraps transformer layers (decoder or encoder) in `ReftLayer`s (plus the LoRA
layers of an adapter's LoRA part) and routes intervention positions to them."""

from __future__ import annotations

import contextlib
import contextvars
import re
import warnings
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTuner, _get_submodules, _remove_adapter_name_from_state_dict_key
from peft.utils import TaskType
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .config import ReftConfig
from .layer import MERGE_ERROR, ReftLayer, call_positions, component_module, replace_call_positions
from .lora_part import inject_lora_part
from .positions import intervention_group_map, locations_from_group_map, positions_per_group
from .trainers import calling_trainer, trainer_problem

INTERVENTION_LOCATIONS = "intervention_locations"
BASE_ADAPTER = "__base__"  # in `adapter_names`: the example runs without any adapter
CLASSIFIER_MODULE_NAMES = ("classifier", "score")  # the heads peft's SEQ_CLS model adds to `modules_to_save`
# models whose layers see hidden states laid out [seq_len, batch, hidden]: a square batch could not be told apart
TIME_MAJOR_MODEL_TYPES = ("xlnet", "fsmt")
# `adapter_names=[...]` of the mixed-adapter call in progress (set by `_enable_peft_forward_hooks`, per thread)
_BATCH_ADAPTER_NAMES: contextvars.ContextVar[Optional[list[str]]] = contextvars.ContextVar(
    "reft_batch_adapter_names", default=None
)
# the `generate` call in progress in this thread (its model-call hooks act only for it)
_GENERATION: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar("reft_generation", default=None)


def _aux_adapter_names_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Forward pre-hook of a `modules_to_save` / trainable-token wrapper or a LoRA-part layer during a mixed-adapter
    call: pass it the per-example adapter names of this thread's call, repeated when beams or samples expanded the
    batch."""
    names = _BATCH_ADAPTER_NAMES.get()
    if names is None:
        return None
    rows = (args[0] if args else next(iter(kwargs.values()))).shape[0]
    return args, {**kwargs, "adapter_names": [name for name in names for _ in range(rows // len(names))]}


def _kv_cache(kwargs: dict[str, Any]):
    """The KV cache of a model call: `cache` (transformers >= 5.24) or `past_key_values`."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the stack of transformer layers (decoder or encoder blocks): the `ModuleList` of identical blocks with one
    entry per hidden layer.

    Works without a per-architecture table: among the module lists of the model whose entries are all of one class,
    it prefers one of `config.num_hidden_layers` entries whose class is in the model's `_no_split_modules`.
    """
    config = _text_config(model)
    num_layers = getattr(config, "num_hidden_layers", None)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(m.get_base_layer() if isinstance(m, ReftLayer) else m) for m in module}
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
    config = _text_config(model)
    for attribute in ("hidden_size", "n_embd", "d_model"):
        size = getattr(config, attribute, None)
        if isinstance(size, int):
            return size
    raise ValueError(f"Could not read the hidden size of {type(model).__name__} from its config.")


class ReftModel(BaseTuner):
    """Creates a ReFT model from a transformers model (use `peft.get_peft_model` with a `ReftConfig`).

    The layers listed in `ReftConfig.layers` are wrapped in `ReftLayer`; an adapter with a LoRA part
    (`ReftConfig.lora_config`) also gets peft's LoRA layers under its name (see `peft_reft.lora_part`). On every
    forward pass the intervention
    positions of the batch (explicit `intervention_locations`, or derived from `attention_mask` and `labels`, see
    `peft_reft.positions`) are computed once and reach the layers with that call only (`call_positions`). `generate`
    edits the prompt positions in the prefill pass (every step without KV cache), so decoding costs what the base
    model costs.

    Example:

        ```py
        >>> import peft_reft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_reft.ReftConfig(layers=[4, 8], low_rank_dimension=4))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = "reft_"
    # peft switches, freezes and deletes adapters on the layers of this class; LoRA parts (`ReftConfig.lora_config`)
    # live in LoraLayers under the same adapter names and follow along
    tuner_layer_cls = (ReftLayer, LoraLayer)
    target_module_mapping: dict = {}

    # ----------------------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: ReftConfig, model_config: dict) -> ReftConfig:
        self._check_model_fits(peft_config)
        stack_name, stack = find_layer_stack(self.model)
        num_layers = len(stack)
        indices = list(range(num_layers)) if peft_config.layers == "all" else peft_config.layers
        out_of_range = [i for i in indices if not 0 <= i < num_layers]
        if out_of_range:
            raise ValueError(
                f"ReftConfig: layers={peft_config.layers} has index(es) {out_of_range} out of range: "
                f"{type(self.model).__name__} has {num_layers} layers (valid indices 0..{num_layers - 1})."
            )
        first = stack[indices[0]]
        # raises if the layers lack the submodule that `component` names
        component_module(first.get_base_layer() if isinstance(first, ReftLayer) else first, peft_config.component)
        hidden_size = hidden_size_of(self.model)
        if peft_config.low_rank_dimension > hidden_size:
            raise ValueError(
                f"ReftConfig: low_rank_dimension={peft_config.low_rank_dimension} is larger than the model's hidden "
                f"size {hidden_size}; use 1 <= low_rank_dimension <= {hidden_size}."
            )
        self._warn_dead_first_window(peft_config, num_layers - 1 in indices, num_layers - 1)
        target_modules = rf"{re.escape(stack_name)}\.({'|'.join(str(i) for i in indices)})"
        if peft_config.target_modules not in (None, target_modules):  # a saved config holds the computed value
            raise ValueError(
                f"ReftConfig: target_modules={peft_config.target_modules!r} was set, but ReFT picks the layers it "
                f"wraps from `layers` (here {target_modules!r}); leave target_modules unset and choose with `layers`."
            )
        if peft_config.exclude_modules:
            raise ValueError(
                f"ReftConfig: exclude_modules={peft_config.exclude_modules!r} is not supported; choose the layers to "
                "edit with `layers`."
            )
        peft_config.target_modules = target_modules
        return peft_config

    @staticmethod
    def _warn_dead_first_window(peft_config: ReftConfig, edits_last_layer: bool, last: int) -> None:
        """At the last layer, an edit of the first prompt tokens changes only the outputs at those tokens, which no
        causal-LM loss reads (their labels are -100): its own intervention would never get a gradient."""
        spec = peft_config.position_spec
        own_first_window = spec.first and (not spec.last or not peft_config.share_weights)
        if edits_last_layer and own_first_window and peft_config.task_type == TaskType.CAUSAL_LM:
            warnings.warn(
                f"ReFT: positions={peft_config.positions!r} gives the first-window tokens an intervention of their "
                f"own at the last layer ({last}), where it changes only the outputs at prompt tokens, which no loss "
                "reads: it gets no gradient and stays as initialised. Leave the last layer out of `layers` "
                "(e.g. layers=list(range(num_layers - 1))) or tie the windows with share_weights=True.",
                stacklevel=2,
            )

    def _check_model_fits(self, peft_config: ReftConfig) -> None:
        trainer, trainer_args = calling_trainer()
        if trainer is not None:
            prompt_positions = not peft_config.position_spec.all and peft_config.task_type == TaskType.CAUSAL_LM
            problem = trainer_problem(trainer, trainer_args, prompt_positions)
            if problem:
                raise ValueError(problem)
        name = type(self.model).__name__
        model_type = getattr(_text_config(self.model), "model_type", None)
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
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
        if peft_config.task_type == TaskType.CAUSAL_LM and hasattr(self.model, "can_generate") and (
            not self.model.can_generate()
        ):
            raise ValueError(
                f"ReftConfig(task_type='CAUSAL_LM') needs a model that generates text, and {name} does not. For a "
                "model with a classification head (e.g. AutoModelForSequenceClassification) use task_type='SEQ_CLS'."
            )
        # peft's SEQ_CLS model adds `classifier` and `score` to modules_to_save; a head named otherwise is listed there
        heads = set(CLASSIFIER_MODULE_NAMES) | set(peft_config.modules_to_save or ())
        if peft_config.task_type == TaskType.SEQ_CLS and not any(
            module_name.rsplit(".", 1)[-1] in heads for module_name, _ in self.model.named_modules()
        ):
            raise ValueError(
                f"ReftConfig(task_type='SEQ_CLS') needs a model with a classification head (a `classifier` or `score` "
                f"module, e.g. from AutoModelForSequenceClassification, or a head named in `modules_to_save`); {name} "
                "has none."
            )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Wrap the chosen layers in `ReftLayer`s (peft's injection), then inject the adapter's LoRA part, if it has
        one (`ReftConfig.lora_config`), under the same adapter name."""
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        config = self.peft_config[adapter_name]
        if config.lora_config is not None:
            inject_lora_part(model, adapter_name, config, low_cpu_mem_usage)

    def _create_and_replace(
        self,
        peft_config: ReftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if isinstance(target, ReftLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = ReftLayer(target, adapter_name, peft_config, hidden_size=hidden_size_of(self.model))
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Interventions are created in float32 and stay float32 (`autocast_adapter_dtype=True`, peft's default).
        With `autocast_adapter_dtype=False` (TRL passes it under DeepSpeed ZeRO-3) they take the dtype of the layer
        they wrap, as LoRA weights do."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if isinstance(module, ReftLayer) and adapter_name in module.reft_interventions:
                dtype = next((p.dtype for p in module.base_layer.parameters() if p.is_floating_point()), None)
                if dtype is not None:
                    module.reft_interventions[adapter_name].to(dtype)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # `...layers.3.reft_interventions.<adapter>.0.rotate_layer.weight` -> `...layers.3.reft_interventions.0...`
        pattern = rf"(\.{cls.prefix}\w+)\.{re.escape(adapter_name)}(?=\.|$)"
        if re.search(pattern, key):
            return re.sub(pattern, r"\1", key, count=1)
        # a LoRA-part key, e.g. `...layers.3.base_layer.self_attn.q_proj.lora_A.<adapter>.weight`: saved under the
        # model's own module path (`...layers.3.self_attn.q_proj.lora_A.weight`), whichever layers ReFT has wrapped
        return _remove_adapter_name_from_state_dict_key(key, adapter_name).replace(".base_layer.", ".")

    # ----------------------------------------------------------------------------------------------- merging
    def _check_merge_allowed(self):
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ):
        if merge:
            self._check_merge_allowed()
        # innermost first: the LoRA layers of a LoRA part sit inside the layers that ReftLayers wrap
        for key, module in reversed(list(self.model.named_modules())):
            if isinstance(module, (ReftLayer, LoraLayer)):
                if isinstance(module, ReftLayer):
                    module.remove_component_hooks()
                replacement = module.get_base_layer()
            elif hasattr(module, "unload_and_optionally_merge_module"):  # e.g. modules_to_save wrappers
                replacement = module.unload_and_optionally_merge_module(
                    merge=False, safe_merge=safe_merge, adapter_names=adapter_names
                )
            else:
                continue
            parent, _, target_name = _get_submodules(self.model, key)
            setattr(parent, target_name, replacement)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # ----------------------------------------------------------------------------------------------- positions
    def _active_reft_configs(self) -> dict[str, ReftConfig]:
        return {name: self.peft_config[name] for name in self.active_adapters if name in self.peft_config}

    def group_maps(self, batch: dict[str, Any], adapters: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
        """Per active adapter (or per name in `adapters`), the group map `[batch, seq_len]` of a batch: for each token,
        the index of the intervention that edits it, or -1 (see `peft_reft.positions`)."""
        maps, by_rule = {}, {}
        for name in self._active_reft_configs() if adapters is None else adapters:
            config = self.peft_config[name]
            classification = config.task_type == TaskType.SEQ_CLS  # labels are classes, not token labels
            rule = (config.positions, config.share_weights, classification)
            if rule not in by_rule:
                by_rule[rule] = intervention_group_map(
                    config.position_spec, config.share_weights, batch, classification,
                    head_pad_token_id=self._classifier_pad_token_id() if classification else None,
                )
            maps[name] = by_rule[rule]
        return maps

    def intervention_positions(
        self, batch: dict[str, Any], adapters: Optional[list[str]] = None
    ) -> dict[str, torch.Tensor]:
        """Per active adapter (per adapter of a mixed batch, or per name in `adapters`), the token indices
        `[batch, groups, P]` (-1 = empty) that its interventions edit; in a mixed batch, rows of other adapters are
        empty. P is fixed by the config (e.g. N + M for shared `fN+lM`) or by the width of explicit
        locations, so nothing is read back from the device."""
        explicit = batch.get(INTERVENTION_LOCATIONS)
        per_example = _BATCH_ADAPTER_NAMES.get()
        if adapters is None and per_example is not None:
            if len(per_example) != len(self._batch_rows(batch)):
                raise ValueError(
                    f"adapter_names has {len(per_example)} entries for a batch of {len(self._batch_rows(batch))} "
                    "examples; give one adapter name per example."
                )
            adapters = sorted(set(per_example) - {BASE_ADAPTER})
        positions = {}
        for name, group_map in self.group_maps(batch, adapters).items():
            config = self.peft_config[name]
            widths = positions_per_group(config.position_spec, config.share_weights, group_map.shape[1])
            width = max(widths) if explicit is None else explicit.shape[-1]
            locations = locations_from_group_map(group_map, config.num_groups, width)
            if per_example is not None:  # mixed batch: rows of other adapters (or the base model) edit nothing
                rows = torch.tensor([n == name for n in per_example], device=locations.device)
                rows = rows.repeat_interleave(locations.shape[0] // rows.shape[0])  # beams expand the batch
                locations = torch.where(rows[:, None, None], locations, -1)
            positions[name] = locations
        return positions

    @staticmethod
    def _batch_rows(batch: dict[str, Any]) -> torch.Tensor:
        return batch["input_ids"] if batch.get("input_ids") is not None else batch["inputs_embeds"]

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """`adapter_names=[...]` in `forward`/`generate`: example i uses adapter `adapter_names[i]` (`"__base__"`: no
        adapter), as with LoRA. Called by PeftModel around the forward pass."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call `model.eval()`.")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(
                f"adapter_names contains {unknown}, which are not adapters of this model; use one of "
                f"{sorted(self.peft_config)} or {BASE_ADAPTER!r}."
            )
        token = _BATCH_ADAPTER_NAMES.set(list(adapter_names))
        # peft's wrappers of `modules_to_save` heads and trainable tokens, and the layers of LoRA parts, take
        # `adapter_names` as a forward argument; the hook reads this thread's names, so another thread's calls are
        # left alone
        handles = [module.register_forward_pre_hook(_aux_adapter_names_hook, with_kwargs=True)
                   for module in self.model.modules() if isinstance(module, (AuxiliaryTrainingWrapper, LoraLayer))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            _BATCH_ADAPTER_NAMES.reset(token)

    def _classifier_pad_token_id(self) -> Optional[int]:
        """For a decoder classifier (a `score` head, e.g. LlamaForSequenceClassification), the padding id by which
        transformers finds the token the head reads: the rightmost token that is not padding. None for encoders
        (their head reads a pooled first token) and for decoders without a padding id (they read the last token)."""
        if not isinstance(getattr(self.model, "score", None), nn.Module):
            return None
        pad_token_id = getattr(_text_config(self.model), "pad_token_id", None)
        return pad_token_id if isinstance(pad_token_id, int) else None

    @staticmethod
    def _non_empty_cache(past_key_values) -> bool:
        return past_key_values is not None and hasattr(past_key_values, "get_seq_length") and (
            past_key_values.get_seq_length() > 0
        )

    def forward(self, *args: Any, **kwargs: Any):
        """Run the model with the interventions applied at the batch's positions.

        Positions come from the batch key `intervention_locations` (popped here, never passed to the transformers
        model) or are derived from `attention_mask` and `labels`.
        """
        locations = kwargs.pop(INTERVENTION_LOCATIONS, None)
        batch = {**kwargs, "input_ids": kwargs.get("input_ids", args[0] if args else None),
                 INTERVENTION_LOCATIONS: locations}
        if locations is None and self._non_empty_cache(_kv_cache(kwargs)):
            raise ValueError(
                "ReFT cannot derive prompt positions for a forward pass that continues a non-empty KV cache; use "
                "`generate` (which edits the prompt once, at prefill) or pass `intervention_locations`."
            )
        if self.training and locations is None and kwargs.get("labels") is None:
            self._check_unlabelled_training_forward()
        with call_positions(self.intervention_positions(batch)):
            return self.model(*args, **kwargs)

    def _check_unlabelled_training_forward(self) -> None:
        prompt_based = sorted(
            name for name, c in self._active_reft_configs().items()
            if not c.position_spec.all and c.task_type == TaskType.CAUSAL_LM
        )
        if prompt_based:
            trainer = calling_trainer()[0]
            caller = f" (called by {type(trainer).__name__})" if trainer is not None else ""
            raise ValueError(
                f"ReFT adapter(s) {prompt_based} edit prompt positions, but this training forward pass{caller} has "
                "neither `labels` (-100 on the prompt) nor `intervention_locations`, so the prompt cannot be told "
                "from the completion. Pass `labels`, or add `intervention_locations` to each batch with "
                "`peft_reft.ReftDataCollator(reft_config, pad_token_id=...)` as the data collator, or use "
                "positions='all'. For inference, call `model.eval()` first: the whole input is then the prompt."
            )

    # ----------------------------------------------------------------------------------------------- generation
    def generate(self, *args: Any, **kwargs: Any):
        """`transformers` generate with the interventions applied to the prompt: in the prefill pass with a KV cache
        (decode steps then cost what the base model costs), in every step without one (`use_cache=False`).

        Positions are derived from the prompt's 2-D `attention_mask` (left or right padding) or given as
        `intervention_locations` for the prompt. With `positions="all"` every generated token is edited as well.
        Greedy search, sampling, beam search and `num_return_sequences` are supported; `assistant_model` (assisted
        decoding) and `prefill_chunk_size` are refused.
        """
        locations = kwargs.pop(INTERVENTION_LOCATIONS, None)
        for unsupported in ("assistant_model", "prefill_chunk_size"):
            if kwargs.get(unsupported) is not None or getattr(kwargs.get("generation_config"), unsupported, None):
                raise ValueError(
                    f"ReFT does not support `generate(..., {unsupported}=...)`: it needs one prefill pass."
                )
        if self._non_empty_cache(_kv_cache(kwargs)):
            raise ValueError(
                "ReFT cannot continue generation from a non-empty KV cache (`cache` / `past_key_values`): pass the "
                "full prompt."
            )
        prompt = {
            "input_ids": kwargs.get("input_ids", args[0] if args else None),
            "inputs_embeds": kwargs.get("inputs_embeds"),
            "attention_mask": kwargs.get("attention_mask"),
            INTERVENTION_LOCATIONS: locations,
        }
        prompt_positions = self.intervention_positions(prompt)
        prompt_length = self._batch_rows(prompt).shape[1]
        every_token = [name for name in prompt_positions if self.peft_config[name].position_spec.all]
        this_generation = object()  # the hook below acts for the model calls of this generate call only
        calls = 0

        def enter_step(module, call_args, call_kwargs):
            nonlocal calls
            if _GENERATION.get() is not this_generation:
                return  # a call of another thread's generate
            calls += 1
            new_ids = call_kwargs.get("input_ids", call_args[0] if call_args else None)
            reference = new_ids if new_ids is not None else call_kwargs["inputs_embeds"]
            # known on the host, no look into the cache (a static cache's length is a device tensor): the first call
            # (prefill) and every call without a KV cache (use_cache=False) run the whole sequence; the others are
            # cached decode steps, past the prompt
            whole_sequence = calls == 1 or _kv_cache(call_kwargs) is None
            if not whole_sequence and not every_token:  # a cached decode step: nothing to edit, nothing to pay
                replace_call_positions({})
                return
            if whole_sequence and reference.shape[1] < prompt_length:
                raise RuntimeError(
                    f"ReFT expected a model call over the whole sequence ({prompt_length}+ tokens) in this generation "
                    f"step and got {reference.shape[1]} token(s); this generation mode is not supported."
                )
            # the positions of this model call; the next call replaces them
            replace_call_positions(self._step_positions(
                prompt_positions if whole_sequence else {}, every_token, reference, call_kwargs.get("attention_mask")
            ))

        generation = _GENERATION.set(this_generation)
        handle = self.model.register_forward_pre_hook(enter_step, with_kwargs=True)
        try:
            with call_positions({}):
                return self.model.generate(*args, **kwargs)
        finally:
            handle.remove()
            _GENERATION.reset(generation)

    def _step_positions(
        self,
        prompt_positions: dict[str, torch.Tensor],
        every_token: list[str],
        step_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Positions for one model call of `generate`: the prompt positions in a call over the whole sequence
        (`prompt_positions`, empty for a cached decode step), and every new token of the `positions="all"` adapters.

        Prompt positions are edited in the prefill pass, and again in every step of a generation without KV cache
        (`use_cache=False`), which reruns the whole sequence; never in a cached decode step, which costs what the base
        model costs.
        """
        batch_size, new_tokens = step_ids.shape[:2]
        positions = {
            name: where.repeat_interleave(batch_size // where.shape[0], dim=0)  # beams, num_return_sequences
            for name, where in prompt_positions.items() if name not in every_token
        }
        if every_token:
            step = {"input_ids": step_ids, "attention_mask": None}
            if attention_mask is not None and attention_mask.dim() == 2:
                step["attention_mask"] = attention_mask[:, -new_tokens:]
            positions.update(self.intervention_positions(step, every_token))
        return positions
