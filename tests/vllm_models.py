"""Tiny models and ReFT adapters saved for the vLLM tests, the tokens `PeftModel.generate` gives with them (the
reference the engine's answers must equal), and a vLLM server process on localhost."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from peft_reft import ReftConfig

NEW_TOKENS = 12


def smollm2_tokenizer():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from smollm2 import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def save_base(folder: Path, arch: str, tokenizer, hidden: int = 64, layers: int = 4) -> Path:
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    config = classes[arch](
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_adapter(base: Path, folder: Path, seed: int = 1, **config) -> Path:
    """A ReFT adapter with random weights, large enough to change greedy tokens."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), ReftConfig(init_weights=False, **config))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.mul_(3.0)
    model.save_pretrained(folder)
    return folder


def reference_tokens(base: Path, adapter: Path | None, prompts: list[list[int]], new_tokens: int = NEW_TOKENS
                     ) -> list[list[int]]:
    """Greedy tokens of `PeftModel.generate` (the base model's with `adapter=None`), float32, one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    tokens = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False)
        tokens.append(out[0, ids.shape[1]:].tolist())
    return tokens


def prompts_of(lengths, seed: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], folder: Path, port: int, **env):
    """Run a server `command` (e.g. `vllm serve ... --port PORT`) in `folder` with the variables `env` added, until it
    answers `/health` (its log, `folder/server.log`, in the error if it stops first); yields its URL, stops it after."""
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(command, cwd=folder, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, folder / "server.log", url)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def wait_until_healthy(process: subprocess.Popen, log: Path, url: str, seconds: int = 600) -> None:
    """Wait until the server `process` at `url` answers `/health`; fail with the end of its `log` if it stops first."""
    import requests

    for _ in range(seconds):
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert process.poll() is None, log.read_text()[-5000:]
        time.sleep(1)
    raise AssertionError(f"{url} did not answer /health within {seconds} s: {log.read_text()[-5000:]}")
