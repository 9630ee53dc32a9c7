"""Run a vLLM engine in its own process (vLLM spawns its engine core and must run under `__main__`) and write what it
generated as JSON.

    python tests/vllm_engine.py SPEC.json RESULT.json

SPEC: {"model": folder, "engine": {LLM keyword arguments}, "batches": [[request, ...], ...]}, a request being
{"prompt_token_ids": [...], "adapter": name or null, "max_tokens": n, "n": completions (default 1)}. Each batch is one
`LLM.generate` call, in order.
RESULT: {"batches": [[{"tokens": [...], "cached": num_cached_tokens, "all": [each completion's tokens]}, ...] or
{"error": message}, ...], "preemptions": the engine's preemption count}.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# vLLM's default (compiled) mode, with dynamo's eager backend instead of inductor: start-up in seconds (a test that
# wants inductor sets it to 0)
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")


def main(spec_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(spec_path) as file:
        spec = json.load(file)
    llm = LLM(model=spec["model"], dtype="float32", disable_log_stats=False, **spec["engine"])
    results = []
    for batch in spec["batches"]:
        prompts = [{"prompt_token_ids": request["prompt_token_ids"]} for request in batch]
        params = [
            SamplingParams(max_tokens=request["max_tokens"], n=request.get("n", 1),
                           # n > 1: vLLM refuses greedy sampling; sampling from the one most likely token is greedy
                           **(dict(temperature=1.0, top_k=1) if request.get("n", 1) > 1 else dict(temperature=0.0)),
                           extra_args={"reft_adapter": request["adapter"]} if request["adapter"] else None)
            for request in batch
        ]
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        except ValueError as error:
            results.append({"error": str(error)})
            continue
        results.append([{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens,
                         "all": [list(c.token_ids) for c in o.outputs]} for o in outputs])
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    with open(result_path, "w") as file:
        json.dump({"batches": results, "preemptions": preemptions}, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
