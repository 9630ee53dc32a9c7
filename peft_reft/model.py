"""`ReftModel`: the peft tuner that wraps transformer layers (decoder or encoder) in `ReftLayer`s (plus the LoRA
layers of an adapter's LoRA part) and hands each call's intervention positions to them.

Data flows one way: a batch -> `peft_reft.positions.adapter_positions` (per adapter, the token indices to edit) ->
`call_positions` (for that call only) -> `ReftLayer.forward`. Mixed-adapter batches are in `peft_reft.mixed_batches`,
generation in `peft_reft.generation`, what ReFT needs to know about the model in `peft_reft.architecture`.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTuner, _get_submodules, _remove_adapter_name_from_state_dict_key
from torch import nn

from . import generation
from .architecture import (
    check_model_fits,
    checked_layer_indices,
    classifier_pad_token_id,
    component_module,
    find_layer_stack,
    hidden_size_of,
)
from .config import ReftConfig
from .layer import MERGE_ERROR, ReftLayer, call_positions
from .lora_part import inject_lora_part
from .mixed_batches import BASE_ADAPTER, current_mixed_batch, mixed_batch, register_adapter_names_hooks
from .positions import INTERVENTION_LOCATIONS, adapter_group_map, adapter_positions, batch_tokens
from .trainers import calling_trainer, deepspeed_problem, trainer_problem


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
        problem = deepspeed_problem()  # refused before a trainer sets DeepSpeed up
        if problem:
            raise ValueError(problem)
        check_model_fits(self.model, peft_config.task_type, peft_config.modules_to_save)
        stack_name, stack = find_layer_stack(self.model)
        num_layers = len(stack)
        indices = list(range(num_layers)) if peft_config.layers == "all" else peft_config.layers
        checked_layer_indices(self.model, indices, f"ReftConfig: layers={peft_config.layers}")
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
        if edits_last_layer and own_first_window and peft_config.edits_prompt:
            warnings.warn(
                f"ReFT: positions={peft_config.positions!r} gives the first-window tokens an intervention of their "
                f"own at the last layer ({last}), where it changes only the outputs at prompt tokens, which no loss "
                "reads: it gets no gradient and stays as initialised. Leave the last layer out of `layers` "
                "(e.g. layers=list(range(num_layers - 1))) or tie the windows with share_weights=True.",
                stacklevel=2,
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
        one (`ReftConfig.lora_config`), under the same adapter name; the peft modules that take `adapter_names` get
        the hook of mixed-adapter batches."""
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        config = self.peft_config[adapter_name]
        if config.lora_config is not None:
            inject_lora_part(model, adapter_name, config, low_cpu_mem_usage)
        register_adapter_names_hooks(model)  # for mixed-adapter batches

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
        names = self._active_reft_configs() if adapters is None else adapters
        pad_token_id = classifier_pad_token_id(self.model)
        return {name: adapter_group_map(self.peft_config[name], batch, pad_token_id) for name in names}

    def intervention_positions(
        self, batch: dict[str, Any], adapters: Optional[list[str]] = None
    ) -> dict[str, torch.Tensor]:
        """Per active adapter (per adapter of a mixed batch, or per name in `adapters`), the token indices
        `[batch, groups, P]` (-1 = empty) that its interventions edit (`peft_reft.positions.adapter_positions`); in a
        mixed batch, rows of other adapters are empty."""
        mixed = current_mixed_batch()
        rows_of = None
        if mixed is not None:
            examples = batch_tokens(batch).shape[0]
            if adapters is None and len(mixed.names) != examples:
                raise ValueError(
                    f"adapter_names has {len(mixed.names)} entries for a batch of {examples} examples; give one "
                    "adapter name per example."
                )
            rows_of = mixed.rows_of
            adapters = mixed.adapters if adapters is None else adapters
        names = self._active_reft_configs() if adapters is None else adapters
        configs = {name: self.peft_config[name] for name in names}
        return adapter_positions(configs, batch, rows_of, classifier_pad_token_id(self.model))

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """`adapter_names=[...]` in `forward`/`generate`: example i uses adapter `adapter_names[i]` (`"__base__"`: no
        adapter), as with LoRA (see `peft_reft.mixed_batches`). Called by PeftModel around the forward pass."""
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
        with mixed_batch(adapter_names):
            yield

    def forward(self, *args: Any, **kwargs: Any):
        """Run the model with the interventions applied at the batch's positions.

        Positions come from the batch key `intervention_locations` (popped here, never passed to the transformers
        model) or are derived from `attention_mask` and `labels`.
        """
        locations = kwargs.pop(INTERVENTION_LOCATIONS, None)
        batch = {**kwargs, "input_ids": kwargs.get("input_ids", args[0] if args else None),
                 INTERVENTION_LOCATIONS: locations}
        if locations is None and generation.non_empty_cache(kwargs):
            raise ValueError(
                "ReFT cannot derive prompt positions for a forward pass that continues a non-empty KV cache; use "
                "`generate` (which edits the prompt once, at prefill) or pass `intervention_locations`."
            )
        if self.training and locations is None and kwargs.get("labels") is None:
            self._check_unlabelled_training_forward()
        with call_positions(self.intervention_positions(batch)):
            return self.model(*args, **kwargs)

    def _prompt_position_adapters(self) -> list[str]:
        return sorted(name for name, config in self._active_reft_configs().items() if config.edits_prompt)

    def _check_unlabelled_training_forward(self) -> None:
        prompt_based = self._prompt_position_adapters()
        if prompt_based:
            trainer = calling_trainer()
            caller = f" (called by {type(trainer).__name__})" if trainer is not None else ""
            raise ValueError(
                f"ReFT adapter(s) {prompt_based} edit prompt positions, but this training forward pass{caller} has "
                "neither `labels` (-100 on the prompt) nor `intervention_locations`, so the prompt cannot be told "
                "from the completion. Pass `labels`, or add `intervention_locations` to each batch with "
                "`peft_reft.ReftDataCollator(reft_config, pad_token_id=...)` as the data collator, or use "
                "positions='all'. For inference, call `model.eval()` first: the whole input is then the prompt."
            )

    def add_model_tags(self, tags: list[str]) -> None:
        """transformers' `add_model_tags`, which every TRL trainer calls at the end of its `__init__`: the trainer,
        now built, is checked first (`peft_reft.trainers`), so a trainer that cannot train these adapters on the right
        tokens is refused before it trains, whether it wrapped the model or was given a `PeftModel`."""
        trainer = calling_trainer()
        if trainer is not None:
            problem = trainer_problem(trainer, prompt_positions=bool(self._prompt_position_adapters()))
            if problem:
                raise ValueError(problem)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(tags)

    # ----------------------------------------------------------------------------------------------- generation
    def generate(self, *args: Any, **kwargs: Any):
        """`transformers` generate with the interventions applied to the prompt: in the prefill pass with a KV cache
        (decode steps then cost what the base model costs), in every step without one (`use_cache=False`).

        Positions are derived from the prompt's 2-D `attention_mask` (left or right padding) or given as
        `intervention_locations` for the prompt. With `positions="all"` every generated token is edited as well.
        Greedy search, sampling, beam search and `num_return_sequences` are supported; `assistant_model` (assisted
        decoding) and `prefill_chunk_size` are refused (see `peft_reft.generation`).
        """
        return generation.generate(self, *args, **kwargs)

    # transformers' continuous batching (`generate_batch`, `transformers serve --continuous_batching`): refused when
    # called (see `peft_reft.generation.CONTINUOUS_BATCHING_ERROR`), not left to fail request by request
    def generate_batch(self, *args: Any, **kwargs: Any):
        """Refused: transformers' continuous batching runs the model without ReFT positions; use `generate`."""
        raise ValueError(generation.CONTINUOUS_BATCHING_ERROR.format(name="generate_batch"))

    def init_continuous_batching(self, *args: Any, **kwargs: Any):
        """Refused, as `generate_batch`."""
        raise ValueError(generation.CONTINUOUS_BATCHING_ERROR.format(name="init_continuous_batching"))

    def continuous_batching_context_manager(self, *args: Any, **kwargs: Any):
        """Refused, as `generate_batch`."""
        raise ValueError(generation.CONTINUOUS_BATCHING_ERROR.format(name="continuous_batching_context_manager"))
