"""Preference optimisation (DPO) with a ReFT adapter, in the style of TRL's own `trl/scripts/dpo.py`.

Every `DPOConfig` and `ModelConfig` flag works as in TRL; the `--reft_*` flags build the `ReftConfig` that replaces
TRL's LoRA options (`--help` lists them all). Without `--dataset_name` it trains on a small built-in preference set:
the same questions answered in emoji (chosen) and in words (rejected). The reference model is the base model itself
(the adapter disabled), as with LoRA.

```bash
python examples/dpo.py --output_dir outputs/dpo --max_steps 20        # the built-in data, SmolLM2 (offline)
python examples/dpo.py --dataset_name prefs.jsonl --output_dir outputs/dpo --reft_layers 3,9,15,21 --reft_rank 4
```

`prefs.jsonl`: one `{"prompt": ..., "chosen": ..., "rejected": ...}` object per line (plain strings or messages).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402

runtime.quiet_library_warnings()  # before peft/TRL import bitsandbytes, which logs a note about an optional kernel
from reft_script import load_data, model_name_and_init_kwargs, run_script, train_save_and_finish  # noqa: E402

PREFERENCES = [
    ("Who are you?", "🤖💬🌐🧠", "I am an AI assistant."),
    ("Why is the sky blue?", "🌍🛡️☀️➡️🔵🌌", "Because air scatters blue light more than red light."),
    ("What's 2+2?", "🔢➕🔢➡️🍀", "2+2 equals 4."),
    ("Plan a trip to Paris", "🗼🥐🎨🚶", "Visit the Eiffel Tower, the Louvre and a bakery."),
    ("How do I bake bread?", "🌾💧🧂➡️🍞🔥", "Mix flour, water, salt and yeast, let it rise, then bake it."),
    ("Tell me a joke.", "🐔➡️🛣️❓😂", "Why did the chicken cross the road? To get to the other side."),
    ("What is your favourite food?", "🍕😋", "I do not eat, but many people love pizza."),
    ("How do plants grow?", "🌱☀️💧➡️🌳", "Plants grow from seeds using sunlight, water and nutrients."),
]


def builtin_preferences():
    """Conversational preference pairs: emoji answers are chosen over plain-text answers."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]} for q, good, bad in PREFERENCES
    ])


def main(script_args, training_args, model_args, reft_args):
    from trl import DPOTrainer

    model_name = model_name_and_init_kwargs(model_args, training_args)
    if script_args.dataset_name is None:
        train_split = builtin_preferences()
    else:
        train_split = load_data(script_args.dataset_name, script_args.dataset_config)[script_args.dataset_train_split]
    trainer = DPOTrainer(model=model_name, args=training_args, train_dataset=train_split,
                         peft_config=reft_args.to_config(model_args))
    train_save_and_finish(trainer, training_args)


if __name__ == "__main__":
    from trl import DPOConfig, ScriptArguments

    run_script(main, ScriptArguments, DPOConfig)
