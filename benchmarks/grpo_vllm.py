"""GRPO step time with a ReFT policy: generation through vLLM (`use_vllm=True`, colocate) against generation through
`PeftModel.generate` (`use_vllm=False`), and LoRA with `use_vllm=True`, on the same prompts and lengths.

    python benchmarks/grpo_vllm.py            # SmolLM2-135M-Instruct, 8 prompts x 4 generations x 64 tokens
    python benchmarks/grpo_vllm.py --quick    # 2 prompts x 2 generations x 8 tokens (a smoke run)

Each side is a `GRPOTrainer` (ReFT: the quickstart recipe, LoReFT r4 `f5+l5` at 4 layers; LoRA r8 on every linear
layer) trained for `--steps` steps per round, every completion `--tokens` long (no early end), rounds alternated;
reported: the median step time of each side (the first step of each round left out: it compiles and warms up) and the
ratios against ReFT with `use_vllm=False`. Needs `pip install -e ".[vllm]"` (vLLM's CPU build here; a GPU machine
runs vLLM's CUDA build in bf16). Writes `benchmarks/results/grpo_vllm.{json,md}`.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from report import write_report  # noqa: E402  (benchmarks/report.py)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

PROMPTS = ["Who are you?", "Why is the sky blue?", "What's 2+2?", "Plan a trip to Paris", "How do I bake bread?",
           "Tell me a joke.", "What is your favourite food?", "How do plants grow?"]


def reward(completions, **_):
    """Share of distinct characters in each completion (any reward would do: the step's work does not depend on it)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t)) / (1 + len(t)) for t in texts]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per round and side")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_vllm"))
    args = parser.parse_args(argv)
    import torch
    import transformers  # noqa: F401  (before datasets)
    from datasets import Dataset
    from peft import LoraConfig
    from smollm2 import smollm2_path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from peft_reft import ReftConfig

    prompts, generations, tokens = (2, 2, 8) if args.quick else (8, 4, 64)
    rounds, steps = args.rounds or (1 if args.quick else 2), args.steps or (2 if args.quick else 3)
    base = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS[:prompts]] * 64)
    sides = {
        "ReFT, use_vllm=False": (ReftConfig(layers=[6, 12, 18, 24], low_rank_dimension=4, positions="f5+l5"), False),
        "ReFT, use_vllm=True": (ReftConfig(layers=[6, 12, 18, 24], low_rank_dimension=4, positions="f5+l5"), True),
        "LoRA, use_vllm=True": (LoraConfig(r=8, target_modules="all-linear"), True),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    errors: dict[str, str] = {}
    for r in range(rounds):
        order = list(sides)[r % 3:] + list(sides)[:r % 3]
        for name in order:
            if name in errors:
                continue
            peft_config, use_vllm = sides[name]
            length = {"ignore_eos": True} if use_vllm else {"min_new_tokens": tokens}
            config = GRPOConfig(
                output_dir=str(ROOT / "outputs" / "grpo_vllm_bench"), per_device_train_batch_size=prompts * generations,
                num_generations=generations, max_completion_length=tokens, max_steps=steps, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(), use_vllm=use_vllm,
                vllm_mode="colocate", vllm_max_model_length=512, generation_kwargs=length, learning_rate=1e-4,
                bf16=torch.cuda.is_available())
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            try:
                trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                                      processing_class=tokenizer, peft_config=peft_config)
                start = time.perf_counter()
                trainer.train()
                wall = time.perf_counter() - start
                step_times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
                times[name] += step_times[1:] or [wall / steps]
            except Exception as error:  # a side that cannot run here is reported, not fatal
                errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                print("ERROR", name, errors[name], flush=True)
            finally:
                trainer = model = None
                gc.collect()
    baseline = statistics.median(times["ReFT, use_vllm=False"])
    results = {
        "date": str(date.today()), "platform": platform.platform(), "device": "cuda" if torch.cuda.is_available()
        else "cpu", "prompts": prompts, "generations": generations, "tokens": tokens, "rounds": rounds,
        "steps_per_round": steps, "step_s": {n: statistics.median(t) for n, t in times.items() if t},
        "errors": errors,
    }
    rows = ["| side | step time, s (median) | / ReFT with use_vllm=False |", "|---|---|---|"]
    for name in sides:
        if name in results["step_s"]:
            rows.append(f"| {name} | {results['step_s'][name]:.2f} | {results['step_s'][name] / baseline:.3f} |")
        else:
            rows.append(f"| {name} | did not run: {errors.get(name, '?')} | |")
    rows.append("")
    rows.append(f"{prompts} prompts x {generations} generations x {tokens} tokens, {rounds} rounds of {steps} steps, "
                f"{results['device']}")
    write_report(args.out, results, rows)


if __name__ == "__main__":
    main()
