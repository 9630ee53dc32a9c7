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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402

runtime.quiet_library_warnings()  # before peft/TRL import bitsandbytes, which logs a note about an optional kernel

import peft_reft  # noqa: E402,F401  (registers the REFT tuner type with peft)
from peft_reft import ReftConfig  # noqa: E402
from peft_reft.interventions import INTERVENTIONS  # noqa: E402

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class ReftArguments:
    """The ReFT adapter: each field is `ReftConfig`'s field of the same name without the `reft_` prefix."""

    reft_layers: str = field(
        default="all",
        metadata={"help": "Layers to intervene on: 'all' or comma-separated indices, e.g. '4,10'."},
    )
    reft_component: str = field(
        default="block_output",
        metadata={"help": "What to edit: 'block_output' (the residual stream), 'attention_output' or 'mlp_output'."},
    )
    reft_rank: int = field(default=8, metadata={"help": "Rank r of each intervention (low_rank_dimension)."})
    reft_positions: str = field(
        default="f7+l7", metadata={"help": "Positions: 'fN', 'lM', 'fN+lM' (first/last prompt tokens) or 'all'."}
    )
    reft_intervention: str = field(
        default="loreft", metadata={"help": f"Intervention type: {', '.join(INTERVENTIONS)}."}
    )
    reft_share_weights: bool = field(
        default=False, metadata={"help": "One intervention per layer for both windows of 'fN+lM'."}
    )
    reft_dropout: float = field(default=0.0, metadata={"help": "Dropout on the edit."})
    reft_act_fn: Optional[str] = field(
        default=None, metadata={"help": "Activation (ACT2FN key) of the learned source."}
    )
    reft_init_weights: bool = field(
        default=True, metadata={"help": "Identity at init (True) or random init as pyreft (False)."}
    )

    def to_config(self) -> ReftConfig:
        layers = "all" if self.reft_layers == "all" else [int(i) for i in self.reft_layers.split(",")]
        return ReftConfig(
            layers=layers, component=self.reft_component, low_rank_dimension=self.reft_rank,
            positions=self.reft_positions,
            intervention=self.reft_intervention, share_weights=self.reft_share_weights, dropout=self.reft_dropout,
            act_fn=self.reft_act_fn, init_weights=self.reft_init_weights,
        )


def load_data(name: str, config_name: Optional[str] = None):
    """A `DatasetDict` from a local file (.json/.jsonl/.parquet/.csv/.arrow), a local folder, or a hub dataset name."""
    from datasets import load_dataset

    path = Path(name)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in LOCAL_FORMATS:
            raise ValueError(
                f"--dataset_name {name}: unknown file type {suffix!r}; use one of {sorted(LOCAL_FORMATS)}."
            )
        return load_dataset(LOCAL_FORMATS[suffix], data_files={"train": str(path)})
    return load_dataset(name, name=config_name)


def main(script_args, training_args, model_args, reft_args):
    from plotting import loss_history, plot_loss
    from trl import SFTTrainer

    model_name = model_args.model_name_or_path
    if model_name is None:
        from smollm2 import smollm2_path

        model_name = str(smollm2_path())
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
    }
    if script_args.dataset_name is None:
        raise ValueError("Pass --dataset_name: a local .json/.jsonl/.parquet/.csv file or folder, or a dataset name.")
    dataset = load_data(script_args.dataset_name, script_args.dataset_config)
    train_split = dataset[script_args.dataset_train_split]
    eval_split = None
    if training_args.eval_strategy != "no":
        eval_split = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None

    trainer = SFTTrainer(
        model=model_name, args=training_args, train_dataset=train_split, eval_dataset=eval_split,
        peft_config=reft_args.to_config(),
    )
    if trainer.accelerator.is_main_process:
        trainer.model.print_trainable_parameters()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        plot = plot_loss(loss_history(trainer.state.log_history), Path(training_args.output_dir) / "loss.png")
        curve = f"; loss curve {plot}" if plot else ""
        trainer.accelerator.print(f"Adapter saved to {training_args.output_dir}{curve}")
    accelerator = trainer.accelerator
    # free the DDP model before its process group: freeing it afterwards, at exit, can deadlock gloo's teardown
    del trainer
    accelerator.free_memory()
    accelerator.end_training()  # also tears down the process group under DDP


def make_parser(device_defaults: Optional[dict] = None):
    """TRL's parser over the script, SFT, model and ReFT arguments; `device_defaults` (from `runtime.setup()`) replace
    TRL's defaults where the device needs it (on a CPU: `--use_cpu true --bf16 false` unless given)."""
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, ReftArguments))
    parser.set_defaults(**(device_defaults or {}))
    return parser


if __name__ == "__main__":
    script_args, training_args, model_args, reft_args = make_parser(runtime.setup()).parse_args_and_config()
    if model_args.use_peft:
        raise SystemExit("--use_peft builds a LoRA adapter; this script trains ReFT: use the --reft_* flags instead.")
    main(script_args, training_args, model_args, reft_args)
