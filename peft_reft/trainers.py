"""Which TRL trainers train ReFT on the right tokens, and the up-front refusal of those that cannot.

A ReFT adapter with prompt positions (`fN`, `lM`) must know, in every training forward pass, where each prompt ends.
`ReftModel` reads that from `labels` (-100 on the prompt) or explicit `intervention_locations`. TRL's trainers differ
in what they pass to the model:

- `SFTTrainer`: `labels`, -100 on the prompt: trains, also with `padding_free=True` and `packing=True` (strategy
  "bfd": each packed sequence has its prompt windows). Not with `label_smoothing_factor` or `compute_loss_func`
  unless `ReftDataCollator` is the data collator (the loss forward pass then has no labels), nor with the packing
  strategies that cut sequences ("bfd_split", "wrapped").
- `DPOTrainer`, `KTOTrainer`: `labels` of the completion (the reference forward runs with the adapter disabled):
  train.
- `GRPOTrainer`, `RLOOTrainer`: `labels` of the completion, generation through `PeftModel.generate`, or through vLLM
  with `use_vllm=True, vllm_mode="colocate"` (the engine serves the policy as a ReFT adapter and gets its tensors
  after each step: `peft_reft.vllm.rl`, which refuses the modes it cannot serve): train.
- `RewardTrainer`: a classifier's input (`task_type="SEQ_CLS"`): trains; the last window ends at the token the score
  head reads.
- `DistillationTrainer`: runs the transformers backbone inside the PeftModel directly: refused.
- Every other TRL trainer (`trl.experimental`: ORPO, CPO, GKD, Online DPO, TPO, ...): no labels mark the prompt:
  refused with prompt positions; `positions="all"` is let through (tested with ORPO and CPO).

Any trainer whose DeepSpeed configuration offloads to NVMe without the libaio library DeepSpeed needs for it is
refused too.

The check runs when the trainer is built: every TRL trainer ends its `__init__` with `model.add_model_tags(...)`,
which `ReftModel` answers by finding the trainer on the call stack (the first argument of a calling method that is a
`transformers.Trainer`) and reading its configuration from the finished trainer (`args`, `data_collator`,
`compute_loss_func`), whether the trainer wrapped the model (`peft_config=...`) or was given a `PeftModel`. Trainers
from other libraries are not checked here; their forward passes are checked one by one (a training forward without
labels or locations is an error).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

SUPPORTED = ("SFTTrainer", "DPOTrainer", "KTOTrainer", "GRPOTrainer", "RLOOTrainer", "RewardTrainer")
# trainers that run the transformers model inside the PeftModel themselves: no positions reach the layers
CALLS_THE_BACKBONE = ("DistillationTrainer",)
SUPPORTED_LIST = "TRL trainers that train ReFT adapters with prompt positions: " + ", ".join(SUPPORTED) + "."
WHAT_WORKS = (
    SUPPORTED_LIST + " Other trainers work with ReftConfig(positions='all'), which edits every token and needs no "
    "prompt."
)


def _trl_trainer_name(trainer: Any) -> Optional[str]:
    """The name of the first class of `trainer`'s MRO defined in TRL (so user subclasses count as their TRL base)."""
    for cls in type(trainer).__mro__:
        if cls.__module__.split(".")[0] == "trl":
            return cls.__name__
    return None


def calling_trainer(max_depth: int = 60) -> Any:
    """The `transformers.Trainer` one of whose methods is on the call stack (the nearest), or None.

    A frame belongs to a trainer's method when its first argument is a Trainer; only the position of that argument
    is read, never a local variable by name, so helper methods, subclasses passing `**kwargs` and renamed variables
    do not change the answer.
    """
    trainer_cls = getattr(sys.modules.get("transformers"), "Trainer", None)
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None or trainer_cls is None:
            break
        code = frame.f_code
        if code.co_argcount:
            first = frame.f_locals.get(code.co_varnames[0])
            if isinstance(first, trainer_cls):
                return first
        frame = frame.f_back
    return None


def deepspeed_problem(args: Any = None) -> Optional[str]:
    """Why a DeepSpeed configuration cannot run here, or None: NVMe offload needs the `async_io` op, which needs libaio.

    Reads the configuration of `args` (TrainingArguments), else the process-wide one that TrainingArguments with
    `deepspeed=...` sets, so the check also runs where a model is wrapped before any trainer exists."""
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if config is None:
        integration = sys.modules.get("transformers.integrations.deepspeed")
        config = integration.deepspeed_config() if integration is not None else None
    zero = (config or {}).get("zero_optimization", {})
    nvme = [key for key in ("offload_param", "offload_optimizer") if (zero.get(key) or {}).get("device") == "nvme"]
    if not nvme:
        return None
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return (
        f"The DeepSpeed config offloads to NVMe ({', '.join(nvme)} device 'nvme'), which needs DeepSpeed's async_io op "
        "and the libaio library, not found here (apt-get install libaio-dev, then reinstall deepspeed). Offload to "
        "'cpu' instead, or do not offload."
    )


def trainer_problem(trainer: Any, prompt_positions: bool) -> Optional[str]:
    """Why `trainer` (a built trainer: its `args`, `data_collator` and `compute_loss_func` are read) cannot train a
    ReFT adapter, or None. `prompt_positions`: an adapter of the model edits prompt windows (`fN` / `lM`)."""
    args = getattr(trainer, "args", None)
    problem = deepspeed_problem(args)
    if problem:
        return problem
    name = _trl_trainer_name(trainer)
    if name is None:
        return None
    if name in CALLS_THE_BACKBONE:
        return (
            f"TRL's {name} runs the student's transformers backbone directly (inside the PeftModel), so the ReFT "
            f"layers never receive intervention positions. {SUPPORTED_LIST}"
        )
    if name not in SUPPORTED:
        if not prompt_positions:
            return None
        return (
            f"TRL's {name} calls the model without labels that mark the prompt, so ReFT cannot place prompt "
            f"positions ('fN' / 'lM') on the right tokens. {WHAT_WORKS}"
        )
    if name in ("GRPOTrainer", "RLOOTrainer") and getattr(args, "use_vllm", False):
        from .vllm.rl import names_the_policy

        if not names_the_policy(getattr(trainer, "vllm_generation", None)):  # not taken over (peft_reft.vllm.rl)
            return (
                f"TRL's {name} with use_vllm=True generates with a vLLM engine that peft-reft did not set up for the "
                "ReFT policy (TRL's `VLLMGeneration` was not found where peft_reft.vllm.rl hooks it), so vLLM would "
                "generate without the edits. Set use_vllm=False: generation then goes through PeftModel.generate."
            )
    if name == "SFTTrainer" and prompt_positions and getattr(args, "packing", False):
        strategy = getattr(args, "packing_strategy", "bfd")
        if strategy != "bfd":
            return (
                f"TRL's SFTTrainer with packing_strategy={strategy!r} cuts sequences to fill its rows, so a packed "
                "sequence can start inside a completion, where no prompt marks where 'fN' / 'lM' positions go. Use "
                "packing_strategy='bfd' (whole sequences, each with its own prompt windows), or padding_free=True "
                "without packing, or positions='all'."
            )
    if name == "SFTTrainer" and prompt_positions:
        from .collator import ReftDataCollator

        smoothing = getattr(args, "label_smoothing_factor", 0) or 0
        outside = smoothing > 0 or getattr(trainer, "compute_loss_func", None) is not None
        if outside and not isinstance(getattr(trainer, "data_collator", None), ReftDataCollator):
            reason = f"label_smoothing_factor={smoothing}" if smoothing > 0 else "a compute_loss_func"
            return (
                f"TRL's SFTTrainer with {reason} computes the loss outside the model and calls it without labels, so "
                "ReFT cannot tell the prompt in that forward pass. Pass "
                "`data_collator=peft_reft.ReftDataCollator(reft_config, pad_token_id=tokenizer.pad_token_id)`: every "
                "batch then carries explicit `intervention_locations`."
            )
    return None
