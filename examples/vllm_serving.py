"""Serve ReFT adapters with vLLM's offline engine: several adapters and the base model in one batch.

    python examples/vllm_serving.py --model outputs/smollm2 --adapter emoji=outputs/reft-adapter

Each `--adapter NAME=FOLDER` is declared when the engine starts (vLLM's `additional_config`); each request names its
adapter in `SamplingParams.extra_args`, or none for the base model. Prints one line per (prompt, adapter) with the
greedy answer. Needs `pip install -e ".[vllm]"`; runs on the CPU (float32) or a GPU, in vLLM's default (compiled)
mode.
"""

import argparse
import json
import os

DEFAULT_PROMPTS = ["Who are you?", "What is the capital of France?"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="base model folder (the model the adapters were trained on)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                        help="a saved ReFT adapter to serve (repeatable)")
    parser.add_argument("--prompt", action="append", default=None, help="a user message (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object per answer")
    args = parser.parse_args(argv)
    adapters = {}
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--adapter {item!r}: use NAME=FOLDER, e.g. emoji=outputs/reft-adapter")
        adapters[name] = folder
    return args, adapters


def main(argv=None):
    args, adapters = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU machine
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", max_model_len=2048,
              additional_config={"reft_adapters": adapters})
    tokenizer = llm.get_tokenizer()
    prompts = args.prompt or DEFAULT_PROMPTS
    requests = [(prompt, name) for prompt in prompts for name in [*adapters, None]]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                             extra_args={"reft_adapter": name} if name else None) for _, name in requests]
    for (prompt, name), output in zip(requests, llm.generate(texts, params)):
        answer = output.outputs[0].text
        if args.json:
            print(json.dumps({"prompt": prompt, "adapter": name, "answer": answer}))
        else:
            print(f"[{name or 'base'}] {prompt} -> {answer!r}")


if __name__ == "__main__":
    main()
