"""Real-model check: SmolLM2-135M-Instruct (offline) trained through SFTTrainer with a ReftConfig."""

import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from peft_reft import ReftConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2  # noqa: E402

PAIRS = [
    ("Who are you?", "🤖💬🌐🧠"),
    ("Why is the sky blue?", "🌍🛡️☀️➡️🔵🌌"),
    ("Can you respond with anything other than emojis?", "🚫🔠"),
    ("What's 2+2?", "🔢➕🔢➡️🍀"),
]


@pytest.mark.slow
def test_smollm2_sft_loss_falls_and_adapter_reloads(tmp_path):
    model, tokenizer = load_smollm2()
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                               "completion": [{"role": "assistant", "content": c}]} for p, c in PAIRS] * 2)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4,
                     learning_rate=4e-3, logging_steps=1, use_cpu=True, report_to=[], save_strategy="no",
                     max_length=64, bf16=False, seed=0)
    config = ReftConfig(layers=[8, 16], low_rank_dimension=4, positions="f3+l3", share_weights=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=config)
    trainer.train()
    values = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(values[-3:]) / 3 < 0.7 * sum(values[:3]) / 3, values

    trainer.save_model(str(tmp_path / "adapter"))
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    reloaded = PeftModel.from_pretrained(load_smollm2()[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trainer.model.eval()(**batch).logits, rtol=0, atol=1e-5)
