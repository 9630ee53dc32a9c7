"""`ReftConfig`: the configuration of a ReFT adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType, TaskType

from .interventions import INTERVENTIONS, identity_init_problem
from .positions import PositionSpec, parse_positions

SUPPORTED_TASK_TYPES = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS)
COMPONENTS = ("block_output", "mlp_output", "attention_output")


@dataclass
class ReftConfig(PeftConfig):
    """Configuration of a ReFT (Representation Finetuning) adapter.

    At each chosen layer and each chosen token position, the hidden state `h` leaving the layer (or its attention or
    MLP, see `component`) is replaced by `intervention(h)`, e.g. LoReFT's `h + R^T (W h + b - R h)`. The base model
    stays frozen.

    Args:
        layers (`int`, `list[int]` or `"all"`):
            Indices into the model's stack of transformer layers (found automatically) at which to intervene.
        component (`str`):
            Which representation to edit. `"block_output"` (default): the residual stream leaving the layer.
            `"attention_output"` / `"mlp_output"`: the output of the layer's attention / MLP submodule, i.e. the
            branch added to the residual stream (found by name: `self_attn`, `attn`, `attention`, `self_attention` /
            `mlp`, `feed_forward`, `ffn`). Works with gradient checkpointing.
        low_rank_dimension (`int`):
            The rank r of each intervention, 1 <= r <= hidden size.
        intervention (`str`):
            One of `"loreft"`, `"noreft"`, `"consreft"`, `"lobireft"`, `"direft"`, `"nodireft"` (pyreft's formulas,
            see `peft_reft.interventions`). The paper's DiReFT is `"nodireft"`.
        positions (`str`):
            `"fN"`, `"lM"`, `"fN+lM"` (the first N and last M tokens of each prompt) or `"all"` (every attended token,
            including each generated token during `generate`). See `peft_reft.positions`.
        share_weights (`bool`):
            With `"fN+lM"`: one intervention per layer for both windows (True) or one for each (False).
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
    component: Literal["block_output", "mlp_output", "attention_output"] = field(
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
        default=False,
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
