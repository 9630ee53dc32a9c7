"""The start-up proof: an engine that serves ReFT adapters shows, through its real model runner, that edits reach the
model's hidden states, or refuses to start.

vLLM's runners, compilation modes and model loaders change from release to release, and not every one can be run in
every test environment. So when a ReFT engine has started (the `LLMEngine` of an offline `vllm.LLM`, and the OpenAI
server's engine before it serves), its front end sends three one-token requests for one fixed prompt: the base model,
and two check adapters that every worker builds next to its model (`PROBES`: a large LoBiReFT edit of the last 4
prompt tokens at every layer, one on the block output, one on the attention output). The adapters' log-probabilities
computed at the edited tokens must differ from the base model's, and those computed before them must not; else an
edit was skipped (a hook not installed, a step whose edits were not bound, a compiled graph without the edit
operators, a loader the plugin cannot see...) or misplaced (a runner whose rows the plan reads wrongly), and the engine
stops with a message that names the vLLM version, the model runner and the compilation mode. The check adapters
cannot be named by any other request.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Sequence

from .adapters import REQUEST_KEY, UID_KEY

# the check adapters: their names (and uids), and the component each one edits
PROBES = {"peft_reft:check:block_output": "block_output", "peft_reft:check:attention_output": "attention_output"}
PROBE_SCALE = 64.0  # the length of the vector each check adapter adds to the hidden state at every layer
PROMPT_LENGTH = 16
PROBE_POSITIONS = "l4"  # the check adapters edit the last 4 prompt tokens (12..15) at every layer
WINDOW_START = PROMPT_LENGTH - 4
# a check adapter passes when a log-probability computed at an edited token moves by more than MIN_CHANGE from the
# base model's, and none computed before the window moves by more than MAX_NOISE (the same computation, up to rounding)
MIN_CHANGE = 0.5
MAX_NOISE = 0.05
# the check requests carry this process's token under this key: no other request can name a check adapter
CHECK_KEY = "reft_start_up_check"
_TOKEN = secrets.token_hex(16)


def is_check_request(extra_args: Any) -> bool:
    """Whether a request's `extra_args` are those of this front end's start-up check."""
    return (isinstance(extra_args, dict) and extra_args.get(CHECK_KEY) == _TOKEN
            and extra_args.get(REQUEST_KEY) in PROBES)


def probe_prompt(vocab_size: int) -> list[int]:
    return [(17 * i + 11) % vocab_size for i in range(PROMPT_LENGTH)]


def probe_params() -> list[Any]:
    """The sampling parameters of the check requests: the base model first, then each check adapter."""
    from vllm import SamplingParams

    return [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, logprobs=0,
                           extra_args=None if name is None else {REQUEST_KEY: name, UID_KEY: name, CHECK_KEY: _TOKEN})
            for name in (None, *PROBES)]


def _log_probs(output: Any, prompt: Sequence[int]) -> list[float]:
    """Index p: the log-probability the model's output at prompt position p gives the token that follows (the next
    prompt token; after the last one, the sampled token)."""
    prompt_lp = [step[token].logprob for step, token in zip(output.prompt_logprobs[1:], prompt[1:])]
    sample = output.outputs[0]
    return [*prompt_lp, sample.logprobs[0][sample.token_ids[0]].logprob]


def judge(outputs: Sequence[Any], prompt: Sequence[int], vllm_config: Any) -> None:
    """Raise unless each check adapter changes the outputs at the tokens it edits and leaves those before them alone
    (`outputs`: as `probe_params` orders them)."""
    base, *checked = (_log_probs(output, prompt) for output in outputs)
    failed = []
    for name, values in zip(PROBES, checked):
        changes = [abs(a - b) for a, b in zip(values, base)]
        before, window = max(changes[:WINDOW_START]), max(changes[WINDOW_START:])
        if not window > MIN_CHANGE:
            failed.append(f"{PROBES[name]} edits did not arrive (largest change of a log-probability at the edited "
                          f"tokens: {window:.2g})")
        elif not before <= MAX_NOISE:
            failed.append(f"{PROBES[name]} edits reached tokens before the edited ones (a change of {before:.2g})")
    if failed:
        raise RuntimeError(
            f"ReFT: this engine's start-up check failed: {'; '.join(failed)}, for check adapters that edit the last "
            f"4 of {PROMPT_LENGTH} prompt tokens at every layer. ReFT edits do not reach the model's hidden states "
            f"where they should in this engine ({describe(vllm_config)}). Serving refused: it would answer wrongly "
            "under the adapters' names. Run a vLLM release and mode that peft-reft supports (see its README)."
        )


def describe(vllm_config: Any) -> str:
    """The vLLM version, model runner and compilation mode of an engine, for messages."""
    import vllm

    compilation = vllm_config.compilation_config
    runner = "V1" if getattr(vllm_config, "use_v2_model_runner", True) is False else "V2"  # 0.34: V2 only
    mode = getattr(compilation.mode, "name", compilation.mode)
    graphs = getattr(compilation.cudagraph_mode, "name", compilation.cudagraph_mode)
    return f"vLLM {vllm.__version__}, {runner} model runner, compilation {mode}, CUDA graphs {graphs}"


def prove_offline(engine: Any) -> None:
    """The check, for the `LLMEngine` of an offline `vllm.LLM` (or one built directly) that serves ReFT."""
    config = engine.vllm_config
    prompt = probe_prompt(config.model_config.get_vocab_size())
    ids = [f"peft-reft-start-up-check-{index}-{os.getpid()}" for index in range(1 + len(PROBES))]
    finished: dict[str, Any] = {}
    for request_id, params in zip(ids, probe_params()):
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    while len(finished) < len(ids):
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    try:
        judge([finished[request_id] for request_id in ids], prompt, config)
    except RuntimeError:
        engine.engine_core.shutdown()  # the engine's processes go with the refusal, not at the interpreter's exit
        raise


async def prove_async(engine_client: Any) -> None:
    """The check, for the engine client of vLLM's OpenAI server."""
    config = engine_client.vllm_config
    prompt = probe_prompt(config.model_config.get_vocab_size())
    outputs = []
    for index, params in enumerate(probe_params()):
        final = None
        async for final in engine_client.generate({"prompt_token_ids": prompt}, params,
                                                  f"peft-reft-start-up-check-{index}-{os.getpid()}"):
            pass
        outputs.append(final)
    judge(outputs, prompt, config)
