"""Supervised fine-tuning with a ReFT adapter, in the style of TRL's own `trl/scripts/sft.py`.

Every `SFTConfig` and `ModelConfig` flag works as in TRL; the `--reft_*` flags build the `ReftConfig` that replaces
TRL's LoRA options. `--help` lists them all.

```bash
# the bundled SmolLM2-135M-Instruct (offline) on a local JSONL file with "prompt"/"completion" or "messages"
python examples/sft.py --dataset_name data.jsonl --output_dir out/reft \
    --reft_layers 4,10,16,22 --reft_rank 4 --reft_positions f3+l3 --reft_share_weights \
    --learning_rate 4e-3 --num_train_epochs 3 --per_device_train_batch_size 8

# several processes (DDP); on a CPU-only machine this starts 2 gloo processes
accelerate launch --multi_gpu --num_processes 2 examples/sft.py --dataset_name data.jsonl --output_dir out/reft
```

After training, the adapter (`adapter_config.json`, `adapter_model.safetensors`) and `loss.png` are in
`--output_dir`. Without a GPU the script trains on the CPU in float32 (`--use_cpu true --bf16 false`, TRL's `bf16=True`
default needs a GPU) with the CPU threads the load leaves free (`OMP_NUM_THREADS` overrides); it says which.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402

runtime.quiet_library_warnings()  # before peft/TRL import bitsandbytes, which logs a note about an optional kernel

from reft_script import load_data, model_name_and_init_kwargs, run_script, train_save_and_finish  # noqa: E402


def main(script_args, training_args, model_args, reft_args):
    from trl import SFTTrainer

    model_name = model_name_and_init_kwargs(model_args, training_args)
    if script_args.dataset_name is None:
        raise ValueError("Pass --dataset_name: a local .json/.jsonl/.parquet/.csv file or folder, or a dataset name.")
    dataset = load_data(script_args.dataset_name, script_args.dataset_config)
    train_split = dataset[script_args.dataset_train_split]
    eval_split = None
    if training_args.eval_strategy != "no":
        eval_split = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None

    trainer = SFTTrainer(
        model=model_name, args=training_args, train_dataset=train_split, eval_dataset=eval_split,
        peft_config=reft_args.to_config(model_args),
    )
    train_save_and_finish(trainer, training_args)


if __name__ == "__main__":
    from trl import ScriptArguments, SFTConfig

    run_script(main, ScriptArguments, SFTConfig)
