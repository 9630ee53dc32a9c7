"""`peft_reft.vllm.proof`: the start-up check's verdict on the log-probabilities of the base and check requests.

The check runs in every engine the vLLM tests start (and refuses the broken ones of `tests/test_vllm.py`); here its
rule is driven with made-up outputs: edits that did not arrive, edits that landed before the edited tokens, and
edits where they belong.
"""

import os
from types import SimpleNamespace

import pytest

if os.environ.get("PEFT_REFT_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here; `make test` runs this module with vLLM")

from peft_reft.vllm.proof import PROBES, PROMPT_LENGTH, judge, probe_prompt  # noqa: E402

PROMPT = probe_prompt(1000)
CONFIG = SimpleNamespace(compilation_config=SimpleNamespace(mode=SimpleNamespace(name="NONE"),
                                                            cudagraph_mode=SimpleNamespace(name="NONE")),
                         use_v2_model_runner=False)


def output(values):
    """A RequestOutput-like object whose output at prompt position p gives the next token the log-probability
    values[p] (the last one: the sampled token)."""
    prompt_logprobs = [None] + [{token: SimpleNamespace(logprob=v)} for token, v in zip(PROMPT[1:], values)]
    sample = SimpleNamespace(token_ids=[7], logprobs=[{7: SimpleNamespace(logprob=values[-1])}])
    return SimpleNamespace(prompt_logprobs=prompt_logprobs, outputs=[sample])


def shifted(base, positions, by):
    return [v + by if p in positions else v for p, v in enumerate(base)]


def test_edits_at_the_last_four_tokens_pass():
    base = [-1.0 - 0.1 * p for p in range(PROMPT_LENGTH)]
    judge([output(base), *(output(shifted(base, {13, 15}, 2.0)) for _ in PROBES)], PROMPT, CONFIG)
    # rounding noise before the edited tokens is tolerated
    judge([output(base), *(output(shifted(shifted(base, {3}, 0.01), {12}, -1.0)) for _ in PROBES)], PROMPT, CONFIG)


def test_edits_that_did_not_arrive_or_landed_early_are_refused():
    base = [-2.0] * PROMPT_LENGTH
    with pytest.raises(RuntimeError, match=r"block_output edits did not arrive \(largest change of a log-probability "
                                           r"at the edited tokens: 0\.1\); attention_output edits did not arrive"):
        judge([output(base), *(output(shifted(base, {14}, 0.1)) for _ in PROBES)], PROMPT, CONFIG)
    with pytest.raises(RuntimeError, match=r"block_output edits reached tokens before the edited ones \(a change of "
                                           r"1\.5\).*\(vLLM [0-9.]+, V1 model runner, compilation NONE, CUDA graphs "
                                           r"NONE\)"):
        judge([output(base), output(shifted(base, {8, 12}, 1.5)), output(shifted(base, {12}, 1.5))], PROMPT, CONFIG)
