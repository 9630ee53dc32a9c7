"""Serving ReFT adapters with vLLM.

Installing peft-reft with vLLM (`pip install "peft-reft[vllm]"`) registers a vLLM general plugin
(`peft_reft.vllm.plugin`). Declare adapters by name and folder when the engine starts, in vLLM's `additional_config`
(`max_reft_adapters`: how many it holds, default 64), and name one per request in `SamplingParams.extra_args`, or
none for the base model; adapters and base requests mix in one batch. The OpenAI server serves each adapter as a
model, chosen by `model`, and loads and unloads adapters at run time through vLLM's LoRA endpoints::

    llm = LLM(model="outputs/smollm2", additional_config={"reft_adapters": {"emoji": "outputs/reft-emoji"}})
    llm.generate(prompts, SamplingParams(max_tokens=32, extra_args={"reft_adapter": "emoji"}))

    vllm serve outputs/smollm2 --additional-config '{"reft_adapters": {"emoji": "outputs/reft-emoji"}}'
    client.chat.completions.create(model="emoji", ...)

Edits on prompt positions are computed once, when the prompt is, and live in the KV cache: decode steps run the base
model's work only. The position rule and the intervention modules are the package's own (`peft_reft.positions`,
`peft_reft.interventions`).
"""

from .adapters import ADAPTERS_KEY, MAX_ADAPTERS_KEY, REQUEST_KEY

__all__ = ["ADAPTERS_KEY", "MAX_ADAPTERS_KEY", "REQUEST_KEY"]
