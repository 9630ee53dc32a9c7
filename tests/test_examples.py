"""The examples run (at reduced size) so that they cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))


def run(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_is_emoji_only():
    from quickstart import is_emoji_only

    assert is_emoji_only("🤖💬🌐🧠") and is_emoji_only("🚗 1️⃣ 🗺️➡️🌵")
    assert not is_emoji_only("🤖 I am a robot") and not is_emoji_only("") and not is_emoji_only("1. 2. 3.")
    assert not is_emoji_only("🌤️\ufffd")  # a broken multi-byte emoji


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_sft_script_on_local_data(tmp_path, suffix):
    from datasets import Dataset
    from smollm2 import smollm2_path

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2,
    )).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(tmp_path / "model")
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "completion": [{"role": "assistant", "content": f"Answer {i % 3}."}]} for i in range(12)]
    data = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        data.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        Dataset.from_list(rows).to_parquet(str(data))
    run([EXAMPLES / "sft.py", "--model_name_or_path", tmp_path / "model", "--dataset_name", data,
         "--output_dir", tmp_path / "out", "--max_steps", "3", "--per_device_train_batch_size", "4", "--use_cpu",
         "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--reft_layers", "0,2",
         "--reft_rank", "2", "--reft_positions", "l2", "--reft_component", "mlp_output", "--learning_rate", "1e-2"],
        cwd=tmp_path)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["layers"], config["low_rank_dimension"], config["positions"],
            config["component"]) == ("REFT", [0, 2], 2, "l2", "mlp_output")
    assert (tmp_path / "out" / "loss.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "grpo.py"])
def test_scripts_document_every_reft_flag(script):
    out = run([EXAMPLES / script, "--help"], cwd=ROOT)
    for flag in ("--reft_layers", "--reft_component", "--reft_rank", "--reft_positions", "--reft_intervention",
                 "--reft_share_weights", "--reft_dropout", "--reft_act_fn", "--reft_init_weights", "--dataset_name",
                 "--learning_rate"):
        assert flag in out, flag
