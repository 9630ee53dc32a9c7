"""Online RL (GRPO) with a ReFT adapter, in the style of TRL's own `trl/scripts/grpo.py`.

Every `GRPOConfig` and `ModelConfig` flag works as in TRL; the `--reft_*` flags build the `ReftConfig` that replaces
TRL's LoRA options (`--help` lists them all). Completions are generated through `PeftModel.generate`, which edits each
prompt once, in the prefill pass, or with `--use_vllm` by vLLM serving the policy as a ReFT adapter
(`peft_reft.vllm.rl`, in an environment with vLLM): `--vllm_mode colocate` in the training process, `--vllm_mode
server` on `trl vllm-serve` started as the README says; the loss forward pass
edits the same prompt tokens. Without `--dataset_name` it trains on built-in prompts with a built-in reward:
the share of emoji among the characters of each completion.

```bash
python examples/grpo.py --output_dir outputs/grpo --max_steps 20      # built-in prompts and reward, SmolLM2 (offline)
python examples/grpo.py --dataset_name prompts.jsonl --reward_funcs my_rewards.brevity --output_dir outputs/grpo
```
"""

from __future__ import annotations

import importlib
import os
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402

runtime.quiet_library_warnings()  # before peft/TRL import bitsandbytes, which logs a note about an optional kernel
from reft_script import load_data, model_name_and_init_kwargs, run_script, train_save_and_finish  # noqa: E402
from trl import ScriptArguments  # noqa: E402

PROMPTS = ["Who are you?", "Why is the sky blue?", "What's 2+2?", "Plan a trip to Paris", "How do I bake bread?",
           "Tell me a joke.", "What is your favourite food?", "How do plants grow?"]


def emoji_share(completions, **kwargs) -> list[float]:
    """Reward: the share of emoji ('Symbol, other') among the non-space characters of each completion."""
    rewards = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        characters = [ch for ch in text if not ch.isspace()]
        rewards.append(sum(unicodedata.category(ch) == "So" for ch in characters) / max(1, len(characters)))
    return rewards


@dataclass
class GRPOScriptArguments(ScriptArguments):
    """TRL's script arguments plus the reward functions, as in TRL's GRPO script."""

    reward_funcs: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Reward functions: 'emoji_share' (built in, the default) or dotted import paths, e.g. "
                          "'my_rewards.brevity'."},
    )


def reward_functions(names: Optional[list[str]]):
    functions = []
    for name in names or ["emoji_share"]:
        if name == "emoji_share":
            functions.append(emoji_share)
        elif "." in name:
            module, function = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            functions.append(getattr(importlib.import_module(module), function))
        else:
            raise ValueError(f"Unknown reward function {name!r}: use 'emoji_share' or a dotted import path.")
    return functions


def main(script_args, training_args, model_args, reft_args):
    from datasets import Dataset
    from trl import GRPOTrainer

    model_name = model_name_and_init_kwargs(model_args, training_args)
    if script_args.dataset_name is None:
        train_split = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    else:
        train_split = load_data(script_args.dataset_name, script_args.dataset_config)[script_args.dataset_train_split]
    trainer = GRPOTrainer(model=model_name, reward_funcs=reward_functions(script_args.reward_funcs), args=training_args,
                          train_dataset=train_split, peft_config=reft_args.to_config(model_args))
    train_save_and_finish(trainer, training_args)


if __name__ == "__main__":
    from trl import GRPOConfig

    run_script(main, GRPOScriptArguments, GRPOConfig)
