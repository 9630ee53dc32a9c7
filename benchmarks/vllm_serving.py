"""Output tokens/s of vLLM serving 4 ReFT adapters, the base model, and 4 LoRA adapters (vLLM's own LoRA support) on the
same mixed requests, alternated in one run.

    python benchmarks/vllm_serving.py                 # SmolLM2-135M-Instruct, 8 rounds (~15 min on 2 cores)
    python benchmarks/vllm_serving.py --quick         # 2 rounds, fewer requests (a smoke run)
    python benchmarks/vllm_serving.py --device cuda   # a GPU machine with vLLM's CUDA build: bf16

Three engines hold the same base model: plain (no adapters), ReFT (4 LoReFT adapters: rank 4, `f5+l5`, layers
6/12/18/24) and LoRA (`enable_lora`, 4 adapters, r 8, every linear layer). Each round sends the same requests to each
engine in turn (order rotating): 48 chat prompts x 64 new tokens (ignore_eos), the adapter engines spreading them
round-robin over their 4 adapters and the base model (one request in 5 without an adapter). Reported: median over rounds
of the per-round ratios ReFT / base and ReFT / LoRA (output tokens/s), with the interquartile range. Needs
`pip install -e ".[vllm]"`. Writes `benchmarks/results/vllm_serving.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

ADAPTERS = 4
REFT = dict(layers=[6, 12, 18, 24], low_rank_dimension=4, positions="f5+l5")


def make_adapters(base: str, folder: Path) -> tuple[dict, dict]:
    """4 ReFT and 4 LoRA adapters with random (non-identity) weights, saved under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_reft import ReftConfig

    reft, lora = {}, {}
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), ReftConfig(init_weights=False, **REFT))
        model.save_pretrained(folder / f"reft{i}")
        reft[f"reft{i}"] = str(folder / f"reft{i}")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=8, target_modules="all-linear", init_lora_weights="gaussian"))
        model.save_pretrained(folder / f"lora{i}")
        lora[f"lora{i}"] = str(folder / f"lora{i}")
    return reft, lora


def requests(tokenizer, count: int) -> list[str]:
    topics = ["the sea", "a city at night", "bread", "mountains", "a library", "rain", "trains", "a garden"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"Write about {topics[i % len(topics)]} "
                                           f"in {3 + i % 5} sentences."}], tokenize=False, add_generation_prompt=True)
            for i in range(count)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_serving"))
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from smollm2 import smollm2_path
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    rounds = args.rounds or (2 if args.quick else 8)
    count, new_tokens = (10, 16) if args.quick else (48, 64)
    base = str(smollm2_path())
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    common = dict(model=base, dtype=dtype, max_model_len=1024, enable_prefix_caching=False)
    if args.device == "cpu":
        common["enforce_eager"] = True
    folder = Path(tempfile.mkdtemp(prefix="vllm_serving_"))
    reft, lora = make_adapters(base, folder)
    engines = {
        "base": LLM(**common),
        "ReFT": LLM(**common, additional_config={"reft_adapters": reft}),
        "LoRA": LLM(**common, enable_lora=True, max_loras=ADAPTERS, max_lora_rank=8),
    }
    prompts = requests(engines["base"].get_tokenizer(), count)
    lora_requests = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(lora.items())]

    def params(extra=None):
        return SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, extra_args=extra)

    plans = {
        "base": dict(sampling_params=[params() for _ in prompts]),
        "ReFT": dict(sampling_params=[params({"reft_adapter": list(reft)[i % 5]} if i % 5 < ADAPTERS else None)
                                      for i in range(count)]),
        "LoRA": dict(sampling_params=[params() for _ in prompts],
                     lora_request=[lora_requests[i % 5] if i % 5 < ADAPTERS else None for i in range(count)]),
    }

    def run(name):
        start = time.perf_counter()
        outputs = engines[name].generate(prompts, use_tqdm=False, **plans[name])
        elapsed = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed

    for name in engines:  # warm-up
        run(name)
    speeds = {name: [] for name in engines}
    order = list(engines)
    for r in range(rounds):
        for name in order[r % 3:] + order[:r % 3]:
            speeds[name].append(run(name))

    def ratio(a, b):
        values = sorted(x / y for x, y in zip(speeds[a], speeds[b]))
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        return {"median": statistics.median(values), "iqr": [quartiles[0], quartiles[-1]]}

    results = {
        "date": str(date.today()), "device": args.device, "platform": platform.platform(), "rounds": rounds,
        "requests": count, "new_tokens": new_tokens, "reft": REFT, "lora": {"r": 8, "target_modules": "all-linear"},
        "tokens_per_s": {name: statistics.median(values) for name, values in speeds.items()},
        "reft_over_base": ratio("ReFT", "base"), "reft_over_lora": ratio("ReFT", "LoRA"),
        "lora_over_base": ratio("LoRA", "base"),
    }
    rows = [
        "| figure | median | IQR | target |",
        "|---|---|---|---|",
        *(f"| {label} | {results[key]['median']:.3f} | {results[key]['iqr'][0]:.3f}-{results[key]['iqr'][1]:.3f} "
          f"| {target} |" for label, key, target in [
              ("ReFT / base, output tokens/s", "reft_over_base", ">= 0.97"),
              ("ReFT / LoRA, output tokens/s", "reft_over_lora", ">= 1.00"),
              ("LoRA / base, output tokens/s", "lora_over_base", "(reference)")]),
        "",
        "output tokens/s (median): " + ", ".join(f"{k} {v:.1f}" for k, v in results["tokens_per_s"].items()),
    ]
    table = "\n".join(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
