"""`ReftConfig`: the configuration of a ReFT adapter."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft import LoraConfig
from peft.config import PeftConfig
from peft.utils import PeftType, TaskType

from .architecture import COMPONENTS
from .interventions import INTERVENTIONS, identity_init_problem
from .positions import PositionSpec, parse_positions

SUPPORTED_TASK_TYPES = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS)
# LoraConfig fields the LoRA part of a ReFT adapter may set; the others must keep LoRA's defaults (see `lora_config`)
LORA_PART_FIELDS = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "use_rslora",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "use_dora",
)
# what peft itself fills in on any config (bookkeeping, not a LoRA option)
_CONFIG_BOOKKEEPING = ("peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                       "auto_mapping", "peft_version", "runtime_config")


@dataclass
class ReftConfig(PeftConfig):
    """Configuration of a ReFT (Representation Finetuning) adapter.

    At each chosen layer and each chosen token position, the hidden state `h` leaving the layer (or its attention or
    MLP, see `component`) is replaced by `intervention(h)`, e.g. LoReFT's `h + R^T (W h + b - R h)`. The base model
    stays frozen.

    `ReftConfig()` with no arguments is LoReFT of rank 8 at every layer, on the first 7 and last 7 prompt tokens, one
    intervention per layer for both windows: a configuration in which every intervention trains (see
    `share_weights`), starting from the identity.

    Args:
        layers (`int`, `list[int]` or `"all"`):
            Indices into the model's stack of transformer layers (found automatically) at which to intervene.
        component (`str`):
            Which representation to edit. `"block_output"` (default): the residual stream leaving the layer.
            `"attention_output"` / `"mlp_output"`: the output of the layer's attention / MLP submodule, i.e. the
            branch added to the residual stream (found by the names in
            `peft_reft.architecture.COMPONENT_SUBMODULES`). Works with gradient checkpointing.
        low_rank_dimension (`int`):
            The rank r of each intervention, 1 <= r <= hidden size.
        intervention (`str`):
            One of `"loreft"`, `"noreft"`, `"consreft"`, `"lobireft"`, `"direft"`, `"nodireft"` (pyreft's formulas,
            see `peft_reft.interventions`). The paper's DiReFT is `"nodireft"`.
        positions (`str`):
            `"fN"`, `"lM"`, `"fN+lM"` (the first N and last M tokens of each prompt) or `"all"` (every attended token,
            including each generated token during `generate`). See `peft_reft.positions`.
        share_weights (`bool`):
            With `"fN+lM"`: one intervention per layer for both windows (True, the default) or one for each (False).
            Shared by default because every intervention then trains: with separate weights, the first window's
            intervention at the last layer edits only prompt outputs, which no loss reads, so it gets no gradient
            (`get_peft_model` warns when a config does that). Sharing also halves the parameters.
        dropout (`float`):
            Dropout on the edit (not on the residual stream).
        act_fn (`str`, *optional*):
            A `transformers.activations.ACT2FN` key applied to the learned source; None is the identity.
        init_weights (`bool`):
            True: every intervention is the identity at initialisation (peft's convention). False: random, as pyreft.
        target_modules, exclude_modules:
            `target_modules` is filled in by the tuner from `layers` (the transformer-layer module names); setting
            either yourself is an error: choose the layers with `layers`.
        modules_to_save (`list[str]`, *optional*):
            Extra modules to train and save fully (as with LoRA).
        trainable_token_indices (*optional*):
            Token embeddings to train (as with LoRA); TRL sets it when it adds chat-template tokens.
        lora_config (`peft.LoraConfig`, *optional*):
            A LoRA adapter that is part of this adapter (ReFT + LoRA in one model): its layers are injected under the
            same adapter name, trained, saved in the same files, loaded, enabled, disabled, switched and deleted with
            the interventions. Its `target_modules` are matched against the model's own module names, whichever layers
            ReFT wraps (e.g. `["q_proj", "v_proj"]`, or `"all-linear"`, resolved as LoRA resolves it). It may
            set `r`, `lora_alpha`, `lora_dropout`, `target_modules`, `exclude_modules`, `fan_in_fan_out`,
            `use_rslora`, `init_lora_weights` (True, False or "gaussian"), `layers_to_transform`, `layers_pattern`,
            `rank_pattern`, `alpha_pattern` and `use_dora`; heads and token embeddings to train belong in this
            config's `modules_to_save` / `trainable_token_indices`.
        task_type (`str`):
            `"CAUSAL_LM"` (default): positions are taken from each prompt, the tokens before the completion.
            `"SEQ_CLS"`: sequence classification (encoders such as BERT/RoBERTa, or decoders with a classification
            head); positions are taken from the whole attended input (the labels are classes, not tokens) and the
            head (`classifier` / `score`) is trained and saved through `modules_to_save`, as with LoRA.
    """

    layers: Union[int, list[int], str] = field(
        default="all",
        metadata={"help": "Layer indices to intervene on (int, list of ints, or 'all')."},
    )
    component: Literal[COMPONENTS] = field(
        default="block_output",
        metadata={
            "help": "Representation to edit: 'block_output' (the residual stream after the layer), "
            "'attention_output' or 'mlp_output' (the output of the layer's attention / MLP submodule)."
        },
    )
    low_rank_dimension: int = field(
        default=8, metadata={"help": "Rank r of each intervention (1 <= r <= hidden size)."}
    )
    intervention: str = field(
        default="loreft",
        metadata={"help": "Intervention type: " + ", ".join(INTERVENTIONS) + ". The paper's DiReFT is 'nodireft'."},
    )
    positions: str = field(
        default="f7+l7",
        metadata={"help": "Token positions: 'fN', 'lM', 'fN+lM' (first N / last M prompt tokens) or 'all'."},
    )
    share_weights: bool = field(
        default=True,
        metadata={"help": "With 'fN+lM': one intervention for both windows (True) or one per window (False)."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the edit (0 <= p < 1)."})
    act_fn: Optional[str] = field(
        default=None, metadata={"help": "ACT2FN key for the activation of the learned source; None = identity."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: identity at init (peft convention). False: random init, as pyreft."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Set by the tuner from `layers`; do not set it yourself."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Not supported (choose layers with `layers`); setting it is an error."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules apart from the interventions to train and save (e.g. a head)."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token indices whose embeddings are trained (as in LoRA)."}
    )
    lora_config: Optional[Union[LoraConfig, dict]] = field(
        default=None,
        metadata={
            "help": "A peft LoraConfig whose LoRA layers are part of this adapter (ReFT + LoRA in one model), e.g. "
            "LoraConfig(r=8, target_modules='all-linear'); trained, saved and loaded with the interventions."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.REFT
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM
        if self.task_type not in SUPPORTED_TASK_TYPES:
            raise ValueError(
                f"ReftConfig: task_type={self.task_type!r} is not supported; use 'CAUSAL_LM' (the default) or "
                "'SEQ_CLS' (sequence classification)."
            )
        self.layers = self._checked_layers(self.layers)
        if self.component not in COMPONENTS:
            raise ValueError(f"ReftConfig: component={self.component!r} is not supported; use one of {COMPONENTS}.")
        if isinstance(self.low_rank_dimension, bool) or not isinstance(self.low_rank_dimension, int) or (
            self.low_rank_dimension < 1
        ):
            raise ValueError(
                f"ReftConfig: low_rank_dimension={self.low_rank_dimension!r} must be an integer >= 1 "
                "(and at most the model's hidden size)."
            )
        if self.intervention not in INTERVENTIONS:
            raise ValueError(
                f"ReftConfig: intervention={self.intervention!r} is unknown; use one of {list(INTERVENTIONS)}."
            )
        parse_positions(self.positions)
        number = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not number or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ReftConfig: dropout={self.dropout!r} must be a number in [0, 1), e.g. 0.05.")
        if self.act_fn is not None:
            from transformers.activations import ACT2FN

            if self.act_fn not in ACT2FN:
                raise ValueError(
                    f"ReftConfig: act_fn={self.act_fn!r} is not a transformers activation; use None or one of "
                    f"{sorted(ACT2FN)}."
                )
        problem = identity_init_problem(self.intervention, self.act_fn) if self.init_weights else None
        if problem:
            raise ValueError(f"ReftConfig: init_weights=True cannot give an identity at init: {problem}. "
                             "Set init_weights=False (random init, as pyreft) or change act_fn.")
        if self.lora_config is not None:
            self.lora_config = checked_lora_part(self.lora_config)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict; the LoRA part is stored as LoRA stores its own config."""
        result = super().to_dict()
        if self.lora_config is not None:
            lora = self.lora_config.to_dict()
            result["lora_config"] = {k: sorted(v) if isinstance(v, set) else v for k, v in lora.items()}
        return result

    @staticmethod
    def _checked_layers(layers):
        if layers == "all":
            return layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if (
            isinstance(layers, (list, tuple))
            and layers
            and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            if len(set(layers)) != len(layers):
                raise ValueError(f"ReftConfig: layers={list(layers)} lists a layer more than once.")
            return sorted(layers)
        raise ValueError(f"ReftConfig: layers={layers!r} must be an int, a non-empty list of ints, or 'all'.")

    @property
    def position_spec(self) -> PositionSpec:
        """The parsed `positions`."""
        return parse_positions(self.positions)

    @property
    def num_groups(self) -> int:
        """Interventions per layer (2 for untied 'fN+lM', else 1)."""
        return self.position_spec.num_groups(self.share_weights)

    @property
    def classification(self) -> bool:
        """Sequence classification (`task_type="SEQ_CLS"`): labels are classes, not token labels, and positions are
        taken from the whole attended input."""
        return self.task_type == TaskType.SEQ_CLS

    @property
    def edits_prompt(self) -> bool:
        """Whether the positions are prompt windows (`fN` / `lM`) of a causal LM: every forward pass must then tell
        the prompt from the completion (labels, explicit locations, or a whole-prompt inference call)."""
        return not self.position_spec.all and self.task_type == TaskType.CAUSAL_LM


def checked_lora_part(lora_config) -> LoraConfig:
    """A copy of the LoRA part of a ReFT adapter (a `LoraConfig`, or its dict as saved in `adapter_config.json`),
    checked to use only the LoRA options that ReFT + LoRA supports (`LORA_PART_FIELDS`)."""
    if isinstance(lora_config, dict):
        kind = lora_config.get("peft_type", PeftType.LORA)
        if kind != PeftType.LORA:
            raise ValueError(f"ReftConfig: lora_config has peft_type={kind!r}; the part added to ReFT must be LoRA.")
        known = {f.name for f in dataclasses.fields(LoraConfig)}
        unknown = sorted(set(lora_config) - known)
        if unknown:
            raise ValueError(
                f"ReftConfig: lora_config has fields {unknown} that this peft's LoraConfig does not know (saved by a "
                "newer peft?); upgrade peft or remove them."
            )
        lora_config = LoraConfig(**{k: v for k, v in lora_config.items() if k != "peft_type"})
    if type(lora_config) is not LoraConfig:
        raise ValueError(
            f"ReftConfig: lora_config must be a peft.LoraConfig (or its dict), got {type(lora_config).__name__}."
        )
    defaults = LoraConfig()
    changed = sorted(
        f.name for f in dataclasses.fields(LoraConfig)
        if f.name not in LORA_PART_FIELDS + _CONFIG_BOOKKEEPING
        and getattr(lora_config, f.name) != getattr(defaults, f.name)
    )
    if changed:
        raise ValueError(
            f"ReftConfig: lora_config sets {changed}, which the LoRA part of a ReFT adapter does not support. It may "
            f"set {', '.join(LORA_PART_FIELDS)}; put modules to train fully (`modules_to_save`) and token embeddings "
            "(`trainable_token_indices`) on the ReftConfig itself."
        )
    init = lora_config.init_lora_weights
    if not (isinstance(init, bool) or init == "gaussian"):  # the initialisations that leave the base weights alone
        raise ValueError(
            f"ReftConfig: lora_config.init_lora_weights={init!r} is not supported with ReFT; "
            "use True, False or 'gaussian' (the others change the base weights or need data)."
        )
    return copy.deepcopy(lora_config)
