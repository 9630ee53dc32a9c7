"""peft-reft: Representation Finetuning (ReFT) as a native peft tuner.

Importing this package registers the `REFT` tuner type with peft, so that `peft.get_peft_model(model, ReftConfig(...))`,
`PeftModel.from_pretrained` and TRL's `SFTTrainer(peft_config=ReftConfig(...))` work with ReFT adapters.
"""

import importlib

from .autoload import after_import
from .collator import ReftDataCollator
from .config import ReftConfig
from .interventions import INTERVENTIONS, ConsReFT, DiReFT, LoBiReFT, LoReFT, NoDiReFT, NoReFT
from .layer import ReftLayer
from .model import ReftModel
from .positions import PositionSpec, parse_positions
from .pyreft_import import from_pyreft
from .registration import register

register(ReftConfig, ReftModel)
# plain lm-eval refuses what it would score wrongly (see peft_reft.lm_eval), whichever of the two is imported first
after_import("lm_eval.models.huggingface", lambda _module: importlib.import_module("peft_reft.lm_eval"))
# TRL's vLLM generation (GRPO, RLOO with use_vllm=True) serves a ReFT policy through the vLLM integration
after_import("trl.generation.vllm_generation",
             lambda module: importlib.import_module("peft_reft.vllm.rl").install(module))

__version__ = "0.1.0"

__all__ = [
    "INTERVENTIONS",
    "ConsReFT",
    "DiReFT",
    "LoBiReFT",
    "LoReFT",
    "NoDiReFT",
    "NoReFT",
    "PositionSpec",
    "ReftConfig",
    "ReftDataCollator",
    "ReftLayer",
    "ReftModel",
    "from_pyreft",
    "parse_positions",
]
