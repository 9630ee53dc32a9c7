"""GRPO step time with a ReFT policy: generation through vLLM (`use_vllm=True`: colocate, and `trl vllm-serve` in
server mode) against generation through `PeftModel.generate` (`use_vllm=False`), and LoRA with `use_vllm=True`
(colocate), on the same prompts and lengths.

    python benchmarks/grpo_vllm.py            # SmolLM2-135M-Instruct, 8 prompts x 4 generations x 64 tokens
    python benchmarks/grpo_vllm.py --quick    # 2 prompts x 2 generations x 8 tokens (a smoke run)

Each side is a `GRPOTrainer` (ReFT: the quickstart recipe, LoReFT r4 `f5+l5` at 4 layers; LoRA r8 on every linear
layer) trained for `--steps` steps per round, every completion `--tokens` long (no early end), rounds alternated;
reported: the median step time of each side (the first step of each round left out: it compiles and warms up) and the
ratios against ReFT with `use_vllm=False`. The server side starts `trl vllm-serve` once (as the README does, on
the same machine; its start is not timed). Needs `pip install -e ".[vllm]"` (vLLM's CPU build here; a GPU machine
runs vLLM's CUDA build in bf16). Writes `benchmarks/results/grpo_vllm.{json,md}`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
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
    reft = ReftConfig(layers=[6, 12, 18, 24], low_rank_dimension=4, positions="f5+l5")
    sides = {  # peft config, vllm_mode (None: use_vllm=False)
        "ReFT, use_vllm=False": (reft, None),
        "ReFT, use_vllm=True (colocate)": (reft, "colocate"),
        "ReFT, use_vllm=True (server)": (reft, "server"),
        "LoRA, use_vllm=True (colocate)": (LoraConfig(r=8, target_modules="all-linear"), "colocate"),
    }
    server, url = start_server(base, "bfloat16" if torch.cuda.is_available() else "float32")
    times: dict[str, list[float]] = {name: [] for name in sides}
    errors: dict[str, str] = {}
    for r in range(rounds):
        order = list(sides)[r % len(sides):] + list(sides)[:r % len(sides)]
        for name in order:
            if name in errors:
                continue
            peft_config, mode = sides[name]
            length = {"ignore_eos": True} if mode else {"min_new_tokens": tokens}
            config = GRPOConfig(
                output_dir=str(ROOT / "outputs" / "grpo_vllm_bench"), per_device_train_batch_size=prompts * generations,
                num_generations=generations, max_completion_length=tokens, max_steps=steps, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(), use_vllm=mode is not None,
                vllm_mode=mode or "colocate", vllm_server_base_url=url, vllm_max_model_length=512,
                generation_kwargs=length, learning_rate=1e-4, bf16=torch.cuda.is_available())
            model, trainer = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), None
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
                engine = getattr(getattr(trainer, "vllm_generation", None), "llm", None)
                if engine is not None:  # one colocated engine at a time
                    engine.llm_engine.engine_core.shutdown()
                trainer = model = engine = None
                gc.collect()
    server.terminate()
    server.wait(timeout=60)
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


def start_server(model: str, dtype: str):
    """`trl vllm-serve` for `model` with what a ReFT policy needs (the README's command), on a free port; returns the
    process and its URL once it answers."""
    import socket

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).with_name("trl")), "vllm-serve", "--model", model, "--dtype", dtype, "--port",
               str(port), "--max_model_len", "512", "--additional-config", json.dumps({"max_reft_adapters": 1})]
    log = open(ROOT / "outputs" / "grpo_vllm_server.log", "w")
    process = subprocess.Popen(command, env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"trl vllm-serve stopped: see {log.name}")
        time.sleep(1)
    raise RuntimeError(f"trl vllm-serve did not start in 900 s: see {log.name}")


if __name__ == "__main__":
    main()
