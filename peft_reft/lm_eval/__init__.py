"""lm-evaluation-harness integration: ReFT adapters scored with their edits where training and `generate` put them.

lm-eval's `hf` model scores a multiple-choice answer with one forward pass over context + continuation, with no
attention mask and no labels, rows right-padded: a prompt-position adapter (`fN`, `lM`) would then edit the whole input
as its "prompt" (an `lM` window lands inside the continuation, or on the padding). Here:

- `ReftHFLM` is lm-eval's `HFLM` with ReFT-aware `loglikelihood`: each (context, continuation) row carries its padding
  mask and the continuation's tokens as labels, so the package's position rule (`peft_reft.positions`) edits the
  context, the prompt, exactly as in training (prompt labels -100) and in `generate` (the context is the prompt).
  `generate_until` is lm-eval's own: it calls `generate` with the padding mask, which edits the prompt.
  `loglikelihood_rolling` (perplexity of a text with no prompt) is refused for prompt-position adapters: there is no
  prompt to edit, and scoring the base model under the adapter's name would be wrong; `positions="all"` adapters score
  every token, as they were trained.
- `python -m peft_reft.lm_eval ...` is the `lm_eval` command with `ReftHFLM` behind `--model hf` (also `hf-auto`,
  `huggingface`): every flag unchanged. `simple_evaluate(...)` is `lm_eval.simple_evaluate` likewise.
- Plain lm-eval is never silently wrong: once peft_reft is loaded (imported, or by the start-up hook when peft is
  imported, see `peft_reft.autoload`), `HFLM`'s own log-likelihood refuses a prompt-position ReFT adapter with an error
  that names the command above. Models without ReFT adapters (LoRA, the base model) are scored by lm-eval's code,
  unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..model import ReftModel
from ..positions import IGNORE_INDEX

HF_ALIASES = ("hf", "hf-auto", "huggingface")  # lm-eval's names for HFLM
COMMAND = "python -m peft_reft.lm_eval"

PLAIN_LM_EVAL_ERROR = (
    "This model has ReFT adapter(s) {names} that edit prompt positions, and lm-eval's `hf` model scores "
    "log-likelihoods without telling the context from the continuation: the scores would be wrong. Run the same "
    f"command with `lm_eval` replaced by `{COMMAND}` (every flag unchanged); in Python, call "
    "`peft_reft.lm_eval.simple_evaluate(...)` with the arguments of `lm_eval.simple_evaluate`, or pass "
    "`peft_reft.lm_eval.ReftHFLM(pretrained=...)` as the model."
)
ROLLING_ERROR = (
    "loglikelihood_rolling (perplexity tasks such as wikitext) scores a text that has no prompt, and ReFT adapter(s) "
    "{names} edit prompt positions only: there is nothing for them to edit, and the base model's score would be "
    "reported under the adapter's name. Evaluate these adapters on tasks with a prompt (multiple choice, generation), "
    "or train an adapter with positions='all' for perplexity."
)


def reft_tuner(model: Any) -> ReftModel | None:
    """The ReFT tuner of a PeftModel (lm-eval's `self.model`), or None for any other model."""
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, ReftModel) else None


def prompt_position_adapters(model: Any) -> list[str]:
    """Names of the active ReFT adapters of `model` that edit prompt positions (empty for any other model)."""
    tuner = reft_tuner(model)
    return [] if tuner is None else tuner._prompt_position_adapters()


class ReftHFLM(HFLM):
    """lm-eval's `HFLM` that scores ReFT adapters with their edits on the context (see the module docstring).

    Takes `HFLM`'s arguments (`pretrained=` a model name/path or a loaded `PeftModel`, `peft=` an adapter path, ...).
    """

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if reft_tuner(self.model) is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if self.backend != "causal":
            raise ValueError("ReFT adapters are scored on causal language models only (lm-eval backend 'causal').")
        # requests with the same input and the same prompt (choices of one token after one context) share a pass
        rows: dict[tuple[tuple[int, ...], int, int], list[int]] = {}
        for index, (strings, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(
                    f"Cannot score a continuation of {len(continuation)} token(s) after a context of {len(context)}: "
                    f"both must be non-empty and the continuation at most max_length={self.max_length} tokens."
                )
            tokens = tuple(context + continuation[:-1])
            rows.setdefault((tokens, self._prompt_length(strings, context, continuation), len(continuation)),
                            []).append(index)
        keys = sorted(rows, key=lambda key: -len(key[0]))  # longest first, as lm-eval does
        batch_size = override_bs or self.batch_size
        if batch_size == "auto":
            batch_size = self._detect_batch_size()
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="ReFT loglikelihood")
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            for key, scores in zip(chunk, self._continuation_log_probs(chunk)):
                for index in rows[key]:
                    request, _, continuation = requests[index]
                    target = torch.tensor(continuation, device=scores.device)
                    answer = (float(scores.gather(1, target[:, None]).sum()), bool((scores.argmax(1) == target).all()))
                    results[index] = answer
                    if request is not None:  # None: a window of loglikelihood_rolling, cached per text there
                        self.cache_hook.add_partial("loglikelihood", request, answer)
                    progress.update(1)
        progress.close()
        return results

    def _prompt_length(self, strings: tuple[str, str] | None, context: list[int], continuation: list[int]) -> int:
        """Tokens of the prompt. lm-eval moves a context's trailing whitespace into the continuation (a chat
        template's `<|im_start|>assistant\n` then scores `\n` as part of the answer); the prompt that training and
        `generate` edit is the whole context, so it keeps those tokens when they tokenize on their own."""
        if strings is None or strings[0] == strings[0].rstrip():
            return len(context)
        whole = self.tok_encode(strings[0])
        return len(whole) if (context + continuation)[:len(whole)] == whole else len(context)

    def _continuation_log_probs(self, chunk) -> list[torch.Tensor]:
        """For rows (input tokens, prompt length, continuation length): log-probabilities `[continuation length,
        vocab]` of the tokens that predict the continuation. The input, context + continuation[:-1], is truncated on
        the left to max_length as lm-eval truncates; its labels mark what follows the prompt, so the prompt (what is
        left of it) is where the package's position rule puts the edits."""
        inputs = [list(tokens)[-self.max_length:] for tokens, _, _ in chunk]
        width = max(map(len, inputs))
        input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, ((tokens, prompt, _), kept) in enumerate(zip(chunk, inputs)):
            input_ids[row, :len(kept)] = torch.tensor(kept)
            attention_mask[row, :len(kept)] = 1
            completion = max(0, len(tokens) - prompt)  # tokens after the prompt, all kept by the truncation
            labels[row, len(kept) - completion:len(kept)] = input_ids[row, len(kept) - completion:len(kept)]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            logits = self.model(**{key: value.to(self.device) for key, value in batch.items()}).logits
        return [
            F.log_softmax(logits[row, len(kept) - scored:len(kept)], dim=-1, dtype=self.softmax_dtype)
            for row, ((_, _, scored), kept) in enumerate(zip(chunk, inputs))
        ]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        names = prompt_position_adapters(self.model)
        if names:
            raise ValueError(ROLLING_ERROR.format(names=names))
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)


def refuse_plain_scoring(hflm_class: type) -> None:
    """Make lm-eval's own `HFLM` log-likelihood refuse prompt-position ReFT adapters (idempotent). Installed when
    `lm_eval.models.huggingface` and peft_reft are both imported; `ReftHFLM` does not reach it for ReFT models."""
    original = hflm_class._loglikelihood_tokens
    if getattr(original, "_refuses_reft", False):
        return

    @functools.wraps(original)
    def _loglikelihood_tokens(self, *args, **kwargs):
        names = prompt_position_adapters(self.model)
        if names:
            raise ValueError(PLAIN_LM_EVAL_ERROR.format(names=names))
        return original(self, *args, **kwargs)

    _loglikelihood_tokens._refuses_reft = True
    hflm_class._loglikelihood_tokens = _loglikelihood_tokens


refuse_plain_scoring(HFLM)


@contextlib.contextmanager
def reft_scoring():
    """Inside the block, lm-eval's `hf` model names (`hf`, `hf-auto`, `huggingface`) resolve to `ReftHFLM`."""
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own names first)
    from lm_eval.api.registry import model_registry

    entries = getattr(model_registry, "_objs", None)
    if not isinstance(entries, dict):
        raise RuntimeError(
            "This lm-eval version keeps its model registry in a form peft_reft does not know; install the lm-eval "
            "version named in peft-reft's `lm-eval` extra (pip install 'peft-reft[lm-eval]')."
        )
    saved = {alias: entries.get(alias) for alias in HF_ALIASES}
    entries.update(dict.fromkeys(HF_ALIASES, ReftHFLM))
    try:
        yield
    finally:
        for alias, entry in saved.items():
            if entry is None:
                entries.pop(alias, None)
            else:
                entries[alias] = entry


def simple_evaluate(*args: Any, **kwargs: Any) -> dict | None:
    """`lm_eval.simple_evaluate` with ReFT adapters scored right: same arguments, same results dictionary
    (`model="hf", model_args="pretrained=BASE,peft=ADAPTER"`, or `model=ReftHFLM(pretrained=peft_model)`)."""
    import lm_eval

    with reft_scoring():
        return lm_eval.simple_evaluate(*args, **kwargs)


def main() -> None:
    """`python -m peft_reft.lm_eval`: lm-eval's command line, with ReFT adapters scored right behind `--model hf`."""
    from lm_eval.__main__ import cli_evaluate

    with reft_scoring():
        cli_evaluate()
