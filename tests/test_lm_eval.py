"""lm-evaluation-harness: ReFT adapters get the reference's scores through `python -m peft_reft.lm_eval`,
`peft_reft.lm_eval.simple_evaluate` and `ReftHFLM`, at any batch size; plain lm-eval refuses what it would score
wrongly. Tasks are local JSON files written here (no hub); the reference is `tests/reference.py`."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from peft import PeftModel, get_peft_model
from reference import raw_params, reference_logits
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from peft_reft import ReftConfig
from peft_reft.lm_eval import ReftHFLM, simple_evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import smollm2_path  # noqa: E402

ADAPTERS = {  # name -> (positions, share_weights)
    "untied-f2+l2": ("f2+l2", False),
    "l3": ("l3", True),
    "all": ("all", True),
}
QUESTIONS = [f"Question {i}: what is {i} plus {i + 1}, and why?" for i in range(8)]
CHOICES = [[f" It is {2 * i + 1}, surely", f" maybe {i}", " no"] for i in range(8)]


def _task(folder: Path, name: str, output_type: str, extra: str) -> None:
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {folder / 'train.jsonl'}\n"
        f"    test: {folder / 'test.jsonl'}\ntraining_split: train\ntest_split: test\nfewshot_split: train\n"
        f"output_type: {output_type}\n{extra}"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer saved as a base, ReFT adapters for it, and local lm-eval tasks."""
    folder = tmp_path_factory.mktemp("lm_eval")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    for name, (positions, share) in ADAPTERS.items():
        torch.manual_seed(1)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder / "base"),
                               ReftConfig(layers=[0, 2], low_rank_dimension=4, positions=positions,
                                          share_weights=share))
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 0.5)  # edits large enough to move every score
        model.save_pretrained(folder / name)
    tasks = folder / "tasks"
    tasks.mkdir()
    rows = [{"question": q, "choices": c, "answer": i % 3, "text": q + c[0]}
            for i, (q, c) in enumerate(zip(QUESTIONS, CHOICES))]
    (tasks / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]))
    (tasks / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[6:]))
    _task(tasks, "reft_choice", "multiple_choice",
          'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
          "metric_list:\n  - metric: acc\n")
    # a context ending in whitespace, as a chat template's "<|im_start|>assistant\n": lm-eval moves the "\n" into
    # the continuation it scores; the prompt that training and generate edit still holds it
    _task(tasks, "reft_choice_newline", "multiple_choice",
          'doc_to_text: "{{question}}\\n"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
          'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    _task(tasks, "reft_generate", "generate_until",
          'doc_to_text: "{{question}}"\ndoc_to_target: "{{choices[0]}}"\n'
          'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 5\n  do_sample: false\n'
          "metric_list:\n  - metric: exact_match\n")
    _task(tasks, "reft_rolling", "loglikelihood_rolling",
          'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
    return folder, tokenizer


def _peft_model(folder, name):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base"), folder / name).eval()


def _evaluate(folder, model, task, evaluate=simple_evaluate, **kwargs):
    """Per document, lm-eval's responses and request arguments, in document order."""
    results = evaluate(model=model, tasks=[task], task_manager=TaskManager(include_path=str(folder / "tasks")),
                       log_samples=True, **kwargs)
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [sample["resps"] for sample in samples], [sample["arguments"] for sample in samples]


@functools.cache
def _bare(folder):
    return AutoModelForCausalLM.from_pretrained(folder / "base").eval()


def _encode_pair(tokenizer, context, continuation):
    """lm-eval's tokenisation of a (context, continuation) pair: trailing spaces move to the continuation, and the
    continuation is what the whole string adds to the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


def _reference_loglikelihood(folder, peft_model, name, context_ids, continuation_ids, prompt_length=None):
    """Sum of the continuation's log-probabilities with the edits on the context's positions (the prompt): the
    adapter's raw parameters applied to a bare copy of the base model by the reference's own hooks. The prompt is
    the context's tokens unless `prompt_length` says it reaches into the scored tokens."""
    positions, share = ADAPTERS[name]
    first, last = {"untied-f2+l2": (2, 2), "l3": (0, 3), "all": (0, 0)}[name]
    tokens = torch.tensor([context_ids + continuation_ids[:-1]])
    labels = torch.full_like(tokens, -100)
    prompt_length = prompt_length or len(context_ids)
    labels[0, prompt_length:] = tokens[0, prompt_length:]
    logits = reference_logits(_bare(folder), raw_params(peft_model), "loreft", tokens,
                              torch.ones_like(tokens), labels, first, last, share, everything=positions == "all")
    log_probs = logits[0, len(context_ids) - 1:].double().log_softmax(-1)
    return float(log_probs.gather(1, torch.tensor(continuation_ids)[:, None]).sum())


@pytest.mark.parametrize("name,batch_size,shots,task", [
    ("untied-f2+l2", 4, 0, "reft_choice"), ("untied-f2+l2", 3, 2, "reft_choice"), ("all", 4, 0, "reft_choice"),
    ("untied-f2+l2", 2, 1, "reft_choice_newline"), ("l3", 1, 0, "reft_choice_newline"),
])
def test_choice_loglikelihoods_match_the_reference(setup, name, batch_size, shots, task):
    folder, tokenizer = setup
    peft_model = _peft_model(folder, name)
    responses, arguments = _evaluate(folder, ReftHFLM(pretrained=peft_model, batch_size=batch_size), task,
                                     num_fewshot=shots, random_seed=0, fewshot_random_seed=0)
    got, expected, base = [], [], []
    for per_choice, per_request in zip(responses, arguments):
        for [(loglikelihood, _)], (context, continuation) in zip(per_choice, per_request):
            context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation)
            assert len(continuation_ids) >= 2  # multi-token choices
            prompt_ids = tokenizer(context, add_special_tokens=False)["input_ids"]  # the whole context
            assert (context_ids + continuation_ids)[:len(prompt_ids)] == prompt_ids
            assert len(prompt_ids) == len(context_ids) + (task == "reft_choice_newline")
            got.append(loglikelihood)
            expected.append(_reference_loglikelihood(folder, peft_model, name, context_ids, continuation_ids,
                                                     len(prompt_ids)))
            with peft_model.disable_adapter(), torch.no_grad():
                ids = torch.tensor([context_ids + continuation_ids[:-1]])
                log_probs = peft_model(input_ids=ids).logits[0, len(context_ids) - 1:].double().log_softmax(-1)
                base.append(float(log_probs.gather(1, torch.tensor(continuation_ids)[:, None]).sum()))
    assert len(got) == 18
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=2e-4)
    assert (torch.tensor(got) - torch.tensor(base)).abs().max() > 0.1  # the edits move the scores


def test_generate_until_answers_are_what_generate_answers(setup):
    folder, tokenizer = setup
    peft_model = _peft_model(folder, "untied-f2+l2")
    responses, arguments = _evaluate(folder, ReftHFLM(pretrained=peft_model, batch_size=4), "reft_generate")
    differs_from_base = 0
    for [[answer]], [(context, _)] in zip(responses, arguments):
        ids = tokenizer(context, return_tensors="pt")
        with torch.no_grad():
            out = peft_model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            with peft_model.disable_adapter():
                base = peft_model.generate(**ids, max_new_tokens=5, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).split("\n")[0]
        assert answer == expected
        differs_from_base += not torch.equal(out, base)
    assert differs_from_base > 0


def test_rolling_loglikelihood_refuses_prompt_positions_and_scores_all_positions(setup):
    folder, tokenizer = setup
    with pytest.raises(ValueError, match="loglikelihood_rolling .* has no prompt"):
        _evaluate(folder, ReftHFLM(pretrained=_peft_model(folder, "l3")), "reft_rolling")
    peft_model = _peft_model(folder, "all")
    lm = ReftHFLM(pretrained=peft_model, batch_size=2)
    responses, arguments = _evaluate(folder, lm, "reft_rolling")
    for [[score]], [(text,)] in zip(responses, arguments):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = _reference_loglikelihood(folder, peft_model, "all", [lm.prefix_token_id], tokens)
        assert abs(score - expected) < 2e-4


@pytest.mark.slow
def test_plain_lm_eval_refuses_prompt_positions_and_scores_all_positions_right(setup):
    folder, _ = setup
    with pytest.raises(ValueError, match="replaced by `python -m peft_reft.lm_eval`"):
        _evaluate(folder, HFLM(pretrained=_peft_model(folder, "l3"), batch_size=2), "reft_choice",
                  evaluate=lm_eval.simple_evaluate)
    plain, _ = _evaluate(folder, HFLM(pretrained=_peft_model(folder, "all"), batch_size=2), "reft_choice",
                         evaluate=lm_eval.simple_evaluate)
    reft, _ = _evaluate(folder, ReftHFLM(pretrained=_peft_model(folder, "all"), batch_size=2), "reft_choice")
    torch.testing.assert_close(torch.tensor([[c[0][0] for c in doc] for doc in plain]),
                               torch.tensor([[c[0][0] for c in doc] for doc in reft]), rtol=0, atol=1e-4)


def _cli(folder, command, tmp_path, batch_size):
    args = [*command, "--model", "hf", "--model_args", f"pretrained={folder / 'base'},peft={folder / 'untied-f2+l2'}",
            "--tasks", "reft_choice", "--include_path", str(folder / "tasks"), "--batch_size", str(batch_size),
            "--num_fewshot", "1", "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "out")]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                                 "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_the_one_swap_command_scores_as_the_python_entry_and_plain_lm_eval_names_it(setup, tmp_path):
    folder, _ = setup
    done = _cli(folder, [sys.executable, "-m", "peft_reft.lm_eval"], tmp_path, batch_size=2)
    assert done.returncode == 0, done.stderr[-3000:]
    [samples] = list((tmp_path / "out").rglob("samples_reft_choice_*.jsonl"))
    cli = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    python, _ = _evaluate(folder, "hf", "reft_choice", batch_size=2, num_fewshot=1, device="cpu",
                          model_args=f"pretrained={folder / 'base'},peft={folder / 'untied-f2+l2'}")
    torch.testing.assert_close(torch.tensor([[float(c[0][0]) for c in s["resps"]] for s in cli]),
                               torch.tensor([[c[0][0] for c in doc] for doc in python]), rtol=0, atol=1e-5)
    lm_eval_script = Path(sys.executable).with_name("lm_eval")
    done = _cli(folder, [str(lm_eval_script)], tmp_path, batch_size=2)
    assert done.returncode != 0
    assert "replaced by `python -m peft_reft.lm_eval` (every flag unchanged)" in done.stderr
