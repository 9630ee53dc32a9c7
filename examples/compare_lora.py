"""ReFT next to LoRA on SmolLM2-135M-Instruct (offline): the same data, batch, steps and schedule for each method,
on two tasks built here deterministically, with disjoint training and held-out sets.

- `emoji` (a style): the quickstart's ten prompt/answer pairs; score = share of emoji-only answers to 16 unseen prompts.
- `sentiment` (a checkable answer): "the hotel was not great" -> "negative"; training sentences are about 8 subjects,
  held-out ones about 4 others; score = share of held-out answers whose first word is the right label.

Methods: LoRA r8 on all linear layers; LoReFT with the quickstart recipe (layers 3, 9, 15, 21, rank 4, `f1+l5`, shared);
LoReFT with the paper's recipe (all layers, rank 8, `f7+l7`, shared); NoDiReFT (the paper's DiReFT) with the paper's
positions; ReFT + LoRA in one adapter (the quickstart recipe with a LoRA r8 part on all linear layers,
`ReftConfig(lora_config=...)`). Per row: held-out score, trainable parameters, adapter size on disk, mean step time
(and its ratio to LoRA's, measured in this process), peak memory of training (resident set above the loaded model),
wall time.

    python examples/compare_lora.py            # the full run (about 22 minutes on 2 CPU cores)
    python examples/compare_lora.py --quick    # a smoke run: 1 step, 2 held-out prompts per task
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402

runtime.quiet_library_warnings()  # before peft/TRL import bitsandbytes, which logs a note about an optional kernel
import torch  # noqa: E402
from classification import TEST_SUBJECTS, TRAIN_SUBJECTS, negation_sentiment  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from quickstart import HELD_OUT, TRAIN_PAIRS, answer, chat, folder_size, is_emoji_only  # noqa: E402
from smollm2 import load_smollm2  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from peft_reft import ReftConfig  # noqa: E402

METHODS = {
    "LoRA r8, all linear": (lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                            1e-3),
    "LoReFT, quickstart recipe": (lambda: ReftConfig(layers=[3, 9, 15, 21], low_rank_dimension=4, positions="f1+l5",
                                                     share_weights=True, init_weights=False), 4e-3),
    "LoReFT, paper recipe": (lambda: ReftConfig(layers="all", low_rank_dimension=8, positions="f7+l7",
                                                share_weights=True, init_weights=False), 4e-3),
    "NoDiReFT, paper positions": (lambda: ReftConfig(layers="all", low_rank_dimension=8, positions="f7+l7",
                                                     share_weights=True, intervention="nodireft"), 4e-3),
    # one adapter, one learning rate between the two methods' own
    "LoReFT + LoRA r8, quickstart recipe": (lambda: ReftConfig(
        layers=[3, 9, 15, 21], low_rank_dimension=4, positions="f1+l5", share_weights=True, init_weights=False,
        lora_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")), 2e-3),
}
QUESTION = "Is this review positive or negative? Answer with one word. Review: {}"


def tasks(held_out: int) -> dict:
    """name -> (training rows, held-out prompts, held-out references, scorer, new tokens to generate)."""
    emoji_rows = [{"prompt": chat(p), "completion": [{"role": "assistant", "content": c}]} for p, c in TRAIN_PAIRS]
    train = negation_sentiment(TRAIN_SUBJECTS, 40, seed=0)
    test = negation_sentiment(TEST_SUBJECTS, 40, seed=1)
    label = {1: "positive", 0: "negative"}
    sentiment_rows = [{"prompt": chat(QUESTION.format(r["text"])),
                       "completion": [{"role": "assistant", "content": label[r["label"]]}]} for r in train]
    return {
        "emoji": (emoji_rows, HELD_OUT[:held_out], [None] * held_out,
                  lambda answer, reference: is_emoji_only(answer), 30),
        "sentiment": (sentiment_rows, [QUESTION.format(r["text"]) for r in test][:held_out],
                      [label[r["label"]] for r in test][:held_out],
                      lambda answer, reference: (answer.lower().split() or [""])[0].strip(".!,") == reference, 4),
    }


def resident_peak_kib(reset: bool = False) -> int:
    """The process's peak resident set (VmHWM); `reset` sets it to the current resident set first (Linux)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:"))


def run(method, task, steps, output_dir, device_defaults, seed=0) -> dict:
    build_config, learning_rate = METHODS[method]
    rows, prompts, references, score, new_tokens = task
    torch.manual_seed(seed)
    model, tokenizer = load_smollm2()
    args = SFTConfig(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=10, learning_rate=learning_rate,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, logging_steps=steps, max_length=64,
        gradient_checkpointing=False, report_to=[], save_strategy="no", seed=seed, log_level="error",
        **device_defaults,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=build_config())
    gc.collect()
    before = resident_peak_kib(reset=True)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    peak_mib = (resident_peak_kib() - before) / 1024
    trainer.save_model(str(output_dir))
    got = answer(trainer.model, tokenizer, prompts, new_tokens)
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    return {
        "method": method, "score": sum(score(a, r) for a, r in zip(got, references)) / len(prompts),
        "trainable": trainable, "adapter_kib": folder_size(Path(output_dir), "adapter_model.safetensors") / 1024,
        "step_s": train_seconds / steps, "peak_mib": peak_mib, "samples": got[:3],
    }


def report(results: dict, out: Path, steps: int) -> str:
    lines = [f"SmolLM2-135M-Instruct, {steps} steps of batch 10 per method and task, greedy decoding, CPU.", ""]
    lines += ["| task | method | held-out score | trainable params | adapter on disk | step time / LoRA | "
              "peak memory of training | wall time |", "|---|---|---|---|---|---|---|---|"]
    for task, rows in results.items():
        lora = rows[0]["step_s"]
        for row in rows:
            lines.append(f"| {task} | {row['method']} | {row['score']:.2f} | {row['trainable']:,} | "
                         f"{row['adapter_kib']:.0f} KiB | {row['step_s'] / lora:.2f} ({row['step_s']:.2f} s) | "
                         f"{row['peak_mib']:.0f} MiB | {row['wall_s']:.0f} s |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_lora.md").write_text(text)
    (out / "compare_lora.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return text


def plot(results: dict, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(METHODS)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (key, label) in zip(axes, [("score", "held-out score"), ("trainable", "trainable parameters (log)"),
                                       ("step_s", "step time / LoRA")]):
        for offset, (task, rows) in enumerate(results.items()):
            values = [r[key] / (rows[0][key] if key == "step_s" else 1) for r in rows]
            ax.bar([i + 0.4 * offset for i in range(len(rows))], values, width=0.4, label=task)
        ax.set_xticks([i + 0.2 for i in range(len(methods))], [m.replace(", ", "\n") for m in methods], fontsize=7)
        ax.set_title(label, fontsize=9)
        if key == "trainable":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", default="outputs/compare_lora",
                        help="adapters, results (.md/.json) and the chart")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 step, 2 held-out prompts per task")
    args = parser.parse_args(argv)
    steps, held_out = (1, 2) if args.quick else (args.steps, 16)
    device_defaults = runtime.setup()
    out = Path(args.output_dir)
    print(f"Outputs: {out.resolve()}")
    results = {}
    start = time.perf_counter()
    for task_name, task in tasks(held_out).items():
        results[task_name] = []
        for method in METHODS:
            began = time.perf_counter()
            folder = "".join(c if c.isalnum() else "-" for c in method.lower())
            row = run(method, task, steps, out / task_name / folder, device_defaults)
            row["wall_s"] = time.perf_counter() - began
            results[task_name].append(row)
            print(f"{task_name:9} {method:36} score {row['score']:.2f}  step {row['step_s']:.2f} s  "
                  f"trainable {row['trainable']:,}  e.g. {row['samples'][0]!r}", flush=True)
    print()
    print(report(results, out, steps))
    chart = plot(results, out / "compare_lora.png")
    print(f"Chart: {chart}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
