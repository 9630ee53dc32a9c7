"""ReFT next to LoRA on SmolLM2-135M-Instruct (offline): the same data, batch, steps and schedule for each method,
on three tasks built here deterministically, with disjoint training and held-out sets, scored by lm-evaluation-harness
through peft-reft's integration (`peft_reft.lm_eval`), each score with its 95% interval.

- `emoji` (a style): the quickstart's ten prompt/answer pairs; score = share of emoji-only answers to 112 unseen
  prompts (lm-eval `generate_until`, 30 new tokens).
- `sentiment` (a checkable answer): "the hotel was not great" -> "negative"; training sentences are about 8 subjects,
  the 128 held-out ones about 4 others; score = accuracy of lm-eval `multiple_choice` between "positive" and
  "negative" (the answer's log-likelihood after the prompt, the edits on the prompt).
- `arithmetic` (two steps): "Compute 7 + 12 - 5." -> "14"; 200 training questions, 120 held-out ones never seen in
  training; score = share of answers whose first number is right (lm-eval `generate_until`, 6 new tokens).

Methods: LoRA r8 on all linear layers; LoReFT with the quickstart recipe (layers 3, 9, 15, 21, rank 4, `f1+l5`, shared);
LoReFT with the paper's recipe (all layers, rank 8, `f7+l7`, shared); NoDiReFT (the paper's DiReFT) with the paper's
positions; ReFT + LoRA in one adapter (the quickstart recipe with a LoRA r8 part on all linear layers,
`ReftConfig(lora_config=...)`). Per row: held-out score with its 95% interval (Wilson), trainable parameters, adapter
size on disk, mean step time (and its ratio to LoRA's, measured in this process), peak memory of training (resident
set above the loaded model), wall time.

    python examples/compare_lora.py            # the full run (about 48 minutes on 2 CPU cores)
    python examples/compare_lora.py --quick    # a smoke run: 1 step of batch 2, 4 held-out items per task, 4 new
                                               # tokens; every method on the first task, LoRA and the quickstart
                                               # recipe on the others
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402

runtime.quiet_library_warnings()  # before peft/TRL import bitsandbytes, which logs a note about an optional kernel
import torch  # noqa: E402
from classification import NEGATIVE, POSITIVE, TEST_SUBJECTS, TRAIN_SUBJECTS, negation_sentiment  # noqa: E402
from datasets import Dataset  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from peft import LoraConfig  # noqa: E402
from quickstart import HELD_OUT, TRAIN_PAIRS, chat, folder_size, is_emoji_only  # noqa: E402
from smollm2 import load_smollm2  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from peft_reft import ReftConfig  # noqa: E402
from peft_reft.lm_eval import ReftHFLM, simple_evaluate  # noqa: E402

METHODS = {
    "LoRA r8, all linear": (lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                            1e-3),
    "LoReFT, quickstart recipe": (lambda: ReftConfig(layers=[3, 9, 15, 21], low_rank_dimension=4, positions="f1+l5",
                                                     share_weights=True, init_weights=False), 4e-3),
    "LoReFT, paper recipe": (lambda: ReftConfig(layers="all", low_rank_dimension=8, positions="f7+l7",
                                                share_weights=True, init_weights=False), 4e-3),
    "NoDiReFT, paper positions": (lambda: ReftConfig(layers="all", low_rank_dimension=8, positions="f7+l7",
                                                     share_weights=True, intervention="nodireft"), 4e-3),
    # one adapter, one learning rate between the two methods' own
    "LoReFT + LoRA r8, quickstart recipe": (lambda: ReftConfig(
        layers=[3, 9, 15, 21], low_rank_dimension=4, positions="f1+l5", share_weights=True, init_weights=False,
        lora_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")), 2e-3),
}
QUESTION = "Is this review positive or negative? Answer with one word. Review: {}"
ARITHMETIC = "Compute {} + {} - {}. Answer with the number only."
# unseen prompts for the emoji style: the quickstart's sixteen, then questions about topics absent from training
TOPICS = ["volcanoes", "the moon", "chess", "coffee", "penguins", "the internet", "rain", "jazz", "bicycles",
          "the ocean", "gardening", "dinosaurs", "pizza", "mountains", "robots", "winter", "libraries", "trains"]
TEMPLATES = ["Tell me about {}.", "Why do people like {}?", "Write two sentences about {}.",
             "What is special about {}?", "Give me a fun fact about {}.", "How would you explain {} to a child?"]
EMOJI_HELD_OUT = HELD_OUT + [t.format(topic) for topic in TOPICS for t in TEMPLATES][:96]


def arithmetic_questions(size: int, seed: int, exclude=frozenset()) -> list[tuple[int, int, int]]:
    rng, seen = random.Random(seed), set(exclude)
    questions = []
    while len(questions) < size:
        question = (rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 20))
        if question not in seen:
            seen.add(question)
            questions.append(question)
    return questions


def first_number(text: str) -> str:
    found = re.search(r"-?\d+", text)
    return found.group() if found else ""


def tasks(held_out: int | None) -> dict:
    """name -> (training rows, held-out documents {prompt, target}, lm-eval output type, scorer of one answer).
    `held_out`: how many held-out documents per task (None: all)."""
    label = {1: "positive", 0: "negative"}
    train_sentiment = negation_sentiment(TRAIN_SUBJECTS, 40, seed=0)
    # every held-out sentence once, with its choice: 0 "positive", 1 "negative" (a negated negative is positive)
    test_sentiment = [(f"{subject} was {'not ' if negated else ''}{adjective}", int((adjective in NEGATIVE) != negated))
                      for subject, adjective, negated in
                      itertools.product(TEST_SUBJECTS, POSITIVE + NEGATIVE, (False, True))]
    random.Random(1).shuffle(test_sentiment)
    train_sums = arithmetic_questions(200, seed=0)
    test_sums = arithmetic_questions(120, seed=1, exclude=frozenset(train_sums))

    def rows(pairs):
        return [{"prompt": chat(p), "completion": [{"role": "assistant", "content": c}]} for p, c in pairs]

    return {
        "emoji": (rows(TRAIN_PAIRS), [{"prompt": p, "target": ""} for p in EMOJI_HELD_OUT[:held_out]],
                  "generate_until", lambda answer, target: is_emoji_only(answer)),
        "sentiment": (rows((QUESTION.format(r["text"]), label[r["label"]]) for r in train_sentiment),
                      [{"prompt": QUESTION.format(text), "target": choice}
                       for text, choice in test_sentiment[:held_out]],
                      "multiple_choice", None),
        "arithmetic": (rows((ARITHMETIC.format(*q), str(q[0] + q[1] - q[2])) for q in train_sums),
                       [{"prompt": ARITHMETIC.format(*q), "target": str(q[0] + q[1] - q[2])}
                        for q in test_sums[:held_out]],
                       "generate_until", lambda answer, target: first_number(answer) == target),
    }


LM_EVAL_TASK = {  # how lm-eval runs each kind of task on the chat-formatted prompt (`prompt` rendered here)
    "generate_until": 'doc_to_target: "{{{{target}}}}"\ngeneration_kwargs:\n  until: ["<|im_end|>"]\n'
                      "  max_gen_toks: {new_tokens}\n  do_sample: false\nmetric_list:\n  - metric: bypass\n",
    "multiple_choice": 'doc_to_choice: ["positive", "negative"]\ndoc_to_target: "{{{{target}}}}"\n'
                       'target_delimiter: ""\nmetric_list:\n  - metric: acc\n',
}
NEW_TOKENS = {"emoji": 30, "arithmetic": 6}
# --quick, a smoke run: every step of the full run at the smallest size (the scores mean nothing)
QUICK = {"steps": 1, "held_out": 4, "batch_size": 2, "new_tokens": 4}


def write_lm_eval_task(folder: Path, name: str, documents: list[dict], output_type: str, tokenizer,
                       new_tokens: int) -> None:
    """A local lm-eval task: the held-out documents (prompts in the model's chat format) and its YAML (generation
    tasks: at most `new_tokens` new tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    rendered = [{**doc, "prompt": tokenizer.apply_chat_template(chat(doc["prompt"]), tokenize=False,
                                                                add_generation_prompt=True)} for doc in documents]
    (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(doc, ensure_ascii=False) for doc in rendered))
    (folder / f"{name}.yaml").write_text(
        f"task: compare_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
        f"test_split: test\noutput_type: {output_type}\ndoc_to_text: \"{{{{prompt}}}}\"\n"
        + LM_EVAL_TASK[output_type].format(new_tokens=new_tokens)
    )


def lm_eval_scores(model, tokenizer, name: str, task: tuple, folder: Path,
                   new_tokens: int) -> tuple[list[float], list[str]]:
    """Per held-out document, the score (0/1) lm-eval's run gives, and the answers (generation tasks)."""
    _, documents, output_type, scorer = task
    write_lm_eval_task(folder, name, documents, output_type, tokenizer, new_tokens)
    model.eval()
    results = simple_evaluate(model=ReftHFLM(pretrained=model, tokenizer=tokenizer, batch_size=16),
                              tasks=[f"compare_{name}"], task_manager=TaskManager(include_path=str(folder)),
                              log_samples=True, verbosity="ERROR")
    samples = sorted(results["samples"][f"compare_{name}"], key=lambda sample: sample["doc_id"])
    if output_type == "multiple_choice":
        return [float(sample["acc"]) for sample in samples], []
    answers = [sample["filtered_resps"][0].strip() for sample in samples]
    return [float(scorer(answer, sample["doc"]["target"])) for answer, sample in zip(answers, samples)], answers


def wilson_interval(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score interval)."""
    if total == 0:
        return 0.0, 1.0
    share = successes / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # rounding can put a bound a hair past the share itself (e.g. 128 of 128): the interval always holds the share
    return max(0.0, min(share, centre - half)), min(1.0, max(share, centre + half))


def resident_peak_kib(reset: bool = False) -> int:
    """The process's peak resident set (VmHWM); `reset` sets it to the current resident set first (Linux)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:"))


def run(method, name, task, steps, output_dir, device_defaults, quick=False, seed=0) -> dict:
    """Train `method` on `task` for `steps` steps and score it with lm-eval (`quick`: a smoke run's sizes)."""
    build_config, learning_rate = METHODS[method]
    rows = task[0]
    batch_size, new_tokens = (QUICK["batch_size"], QUICK["new_tokens"]) if quick else (10, NEW_TOKENS.get(name, 0))
    torch.manual_seed(seed)
    model, tokenizer = load_smollm2()
    args = SFTConfig(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        logging_steps=steps, max_length=64, gradient_checkpointing=False, report_to=[], save_strategy="no", seed=seed,
        log_level="error",
        **device_defaults,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=build_config())
    gc.collect()
    before = resident_peak_kib(reset=True)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    peak_mib = (resident_peak_kib() - before) / 1024
    trainer.save_model(str(output_dir))
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    scores, answers = lm_eval_scores(trainer.model, tokenizer, name, task, Path(output_dir) / "lm_eval_task",
                                     new_tokens)
    low, high = wilson_interval(sum(scores), len(scores))
    return {
        "method": method, "score": sum(scores) / len(scores), "ci95": [low, high], "held_out": len(scores),
        "trainable": trainable, "adapter_kib": folder_size(Path(output_dir), "adapter_model.safetensors") / 1024,
        "step_s": train_seconds / steps, "peak_mib": peak_mib, "samples": answers[:3],
    }


def report(results: dict, out: Path, steps: int) -> str:
    lines = [f"SmolLM2-135M-Instruct, {steps} steps of batch 10 per method and task, scored by lm-eval (greedy "
             "generation / multiple choice), CPU. Score: share of held-out items right, [95% interval].", ""]
    lines += ["| task | method | held-out score [95% CI] | trainable params | adapter on disk | step time / LoRA | "
              "peak memory of training | wall time |", "|---|---|---|---|---|---|---|---|"]
    for task, rows in results.items():
        lora = rows[0]["step_s"]
        for row in rows:
            low, high = row["ci95"]
            lines.append(f"| {task} ({row['held_out']} items) | {row['method']} | {row['score']:.2f} "
                         f"[{low:.2f}, {high:.2f}] | {row['trainable']:,} | "
                         f"{row['adapter_kib']:.0f} KiB | {row['step_s'] / lora:.2f} ({row['step_s']:.2f} s) | "
                         f"{row['peak_mib']:.0f} MiB | {row['wall_s']:.0f} s |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_lora.md").write_text(text)
    (out / "compare_lora.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return text


def plot(results: dict, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(METHODS)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    width = 0.8 / len(results)
    panels = [("score", "held-out score (95% CI)"), ("trainable", "trainable parameters (log)"),
              ("step_s", "step time / LoRA")]
    for ax, (key, label) in zip(axes, panels):
        for offset, (task, rows) in enumerate(results.items()):
            values = [r[key] / (rows[0][key] if key == "step_s" else 1) for r in rows]
            errors = None
            if key == "score":  # asymmetric error bars from the Wilson intervals
                errors = [[max(0.0, r["score"] - r["ci95"][0]) for r in rows],
                          [max(0.0, r["ci95"][1] - r["score"]) for r in rows]]
            ax.bar([i + width * offset for i in range(len(rows))], values, width=width, label=task, yerr=errors,
                   capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], [m.replace(", ", "\n") for m in methods],
                      fontsize=7)
        ax.set_title(label, fontsize=9)
        if key == "trainable":
            ax.set_yscale("log")
    axes[0].set_ylim(0, 1.2)  # room above the bars for the legend
    axes[0].legend(fontsize=8, loc="upper center", ncol=len(results))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", default="outputs/compare_lora",
                        help="adapters, results (.md/.json) and the chart")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 step of batch 2, 4 held-out items per "
                        "task, 4 new tokens, every method on the first task and two (LoRA, the quickstart recipe) on "
                        "the others")
    args = parser.parse_args(argv)
    steps, held_out = (QUICK["steps"], QUICK["held_out"]) if args.quick else (args.steps, None)
    device_defaults = runtime.setup()
    out = Path(args.output_dir)
    print(f"Outputs: {out.resolve()}")
    results = {}
    start = time.perf_counter()
    for number, (task_name, task) in enumerate(tasks(held_out).items()):
        results[task_name] = []
        for method in list(METHODS)[:2] if args.quick and number else METHODS:
            began = time.perf_counter()
            folder = "".join(c if c.isalnum() else "-" for c in method.lower())
            row = run(method, task_name, task, steps, out / task_name / folder, device_defaults, args.quick)
            row["wall_s"] = time.perf_counter() - began
            results[task_name].append(row)
            example = f"  e.g. {row['samples'][0]!r}" if row["samples"] else ""
            print(f"{task_name:10} {method:36} score {row['score']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]"
                  f"  step {row['step_s']:.2f} s  trainable {row['trainable']:,}{example}", flush=True)
    print()
    print(report(results, out, steps))
    chart = plot(results, out / "compare_lora.png")
    print(f"Chart: {chart}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
