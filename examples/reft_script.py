"""What the TRL-style scripts (`sft.py`, `dpo.py`, `grpo.py`) share: the `--reft_*` flags, local data files, the
model (SmolLM2 by default), TRL's parser with the defaults of this device, and saving plus a clean exit."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Optional

import peft_reft  # noqa: F401  (registers the REFT tuner type with peft)
from peft_reft import ReftConfig

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# ReftConfig field -> its command-line flag (`--reft_<field>`; the rank is `--reft_rank`)
FLAGS = {
    "layers": "reft_layers", "component": "reft_component", "low_rank_dimension": "reft_rank",
    "positions": "reft_positions", "intervention": "reft_intervention", "share_weights": "reft_share_weights",
    "dropout": "reft_dropout", "act_fn": "reft_act_fn", "init_weights": "reft_init_weights",
}


def _flag_fields() -> list[tuple]:
    """The `--reft_*` flags: type, default and help of the ReftConfig field each stands for (`layers` is given as a
    string, 'all' or comma-separated indices)."""
    fields = {f.name: f for f in dataclasses.fields(ReftConfig)}
    types = typing.get_type_hints(ReftConfig)
    result = []
    for name, flag in FLAGS.items():
        source = fields[name]
        kind, help_text = types[name], source.metadata["help"]
        if name == "layers":
            kind, help_text = str, help_text + " On the command line: 'all' or comma-separated indices, e.g. '4,10'."
        result.append((flag, kind, dataclasses.field(default=source.default, metadata={"help": help_text})))
    return result


def _to_config(self, model_args=None) -> ReftConfig:
    """The `ReftConfig`; with TRL's `--use_peft` (in `model_args`), TRL's LoRA flags (`--lora_r`,
    `--lora_target_modules`, ...) give it a LoRA part: ReFT + LoRA in one adapter."""
    from trl import get_peft_config

    values = {name: getattr(self, flag) for name, flag in FLAGS.items()}
    if values["layers"] != "all":
        values["layers"] = [int(i) for i in values["layers"].split(",")]
    return ReftConfig(**values, lora_config=get_peft_config(model_args) if model_args is not None else None)


ReftArguments = dataclasses.make_dataclass(
    "ReftArguments", _flag_fields(), namespace={
        "to_config": _to_config,
        "__doc__": "The ReFT adapter's flags, derived from ReftConfig's fields (see `FLAGS`).",
    },
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


def model_name_and_init_kwargs(model_args, training_args) -> str:
    """The model to train (`--model_name_or_path`, default the offline SmolLM2-135M-Instruct); sets TRL's
    `model_init_kwargs` from the `ModelConfig` flags, as TRL's scripts do."""
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
    return model_name


def train_save_and_finish(trainer, training_args) -> None:
    """Train, save the adapter and `loss.png` to `--output_dir`, and end the run cleanly (also under DDP)."""
    from plotting import loss_history, plot_loss

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


def make_parser(script_args_cls, training_config_cls, device_defaults: Optional[dict] = None):
    """TRL's parser over the script, training, model and ReFT arguments; `device_defaults` (from `runtime.setup()`)
    replace TRL's defaults where the device needs it (on a CPU: `--use_cpu true --bf16 false` unless given)."""
    from trl import ModelConfig, TrlParser

    parser = TrlParser((script_args_cls, training_config_cls, ModelConfig, ReftArguments))
    parser.set_defaults(**(device_defaults or {}))
    return parser


def run_script(main, script_args_cls, training_config_cls) -> None:
    """Parse the command line as TRL's scripts do (plus the `--reft_*` flags) and call `main` with the four argument
    groups. TRL's `--use_peft` and `--lora_*` flags add a LoRA part to the ReFT adapter (`ReftArguments.to_config`)."""
    import runtime

    parser = make_parser(script_args_cls, training_config_cls, runtime.setup())
    main(*parser.parse_args_and_config())
