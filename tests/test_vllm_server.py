"""ReFT adapters as models of `vllm serve` (`peft_reft.vllm.server`): listed in `/v1/models`, chosen by `model`,
loaded and unloaded at run time through vLLM's LoRA endpoints, 64 in one engine; every answer is the tokens of
`PeftModel.generate` with the adapter (greedy, float32).

One server for the module (a tiny random Llama with SmolLM2's tokenizer, eager, on the CPU), started with three
declared adapters and room for 64 (`max_reft_adapters`), runtime updating switched on as LoRA users do
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). Needs vLLM (`make test` runs this module in its vLLM environment).
"""

import json
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

if os.environ.get("PEFT_REFT_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here; `make test` runs this module with vLLM")

import openai  # noqa: E402
import requests  # noqa: E402
from vllm_models import (  # noqa: E402
    free_port,
    prompts_of,
    reference_tokens,
    running_server,
    save_adapter,
    save_base,
    smollm2_tokenizer,
)

NEW = 8
DECLARED = {
    "emoji": dict(intervention="loreft", layers=[0, 2], positions="f2+l2", share_weights=False),
    "poet": dict(intervention="noreft", layers=[1, 3], positions="l3", component="mlp_output"),
    "pirate": dict(intervention="nodireft", layers=[1], positions="all", component="attention_output"),
}
MAX_ADAPTERS = 64


class Server:
    def __init__(self, folder: Path, url: str, tokenizer):
        self.folder, self.url, self.tokenizer = folder, url, tokenizer
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        self.base = folder / "base"
        self._references: dict = {}

    def complete(self, model: str, prompt: list[int], max_tokens: int = NEW, **extra) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True, **extra}
        reply = requests.post(f"{self.url}/v1/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def tokens(self, model: str, prompt: list[int], max_tokens: int = NEW) -> list[int]:
        return self.complete(model, prompt, max_tokens)["choices"][0]["token_ids"]

    def expected(self, adapter, prompt: list[int], new_tokens: int = NEW) -> list[int]:
        """`PeftModel.generate`'s tokens (None: the base model); `adapter` is a folder."""
        key = (str(adapter), tuple(prompt), new_tokens)
        if key not in self._references:
            self._references[key] = reference_tokens(self.base, adapter, [prompt], new_tokens)[0]
        return self._references[key]

    def post(self, path: str, **body) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm_server")
    tokenizer = smollm2_tokenizer()
    save_base(folder / "base", "llama", tokenizer)
    for seed, (name, config) in enumerate(DECLARED.items()):
        save_adapter(folder / "base", folder / name, seed=seed + 1, **config)
    port = free_port()
    additional = {"reft_adapters": {name: str(folder / name) for name in DECLARED}, "max_reft_adapters": MAX_ADAPTERS}
    command = [str(Path(sys.executable).with_name("vllm")), "serve", str(folder / "base"), "--served-model-name",
               "base", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--block-size", "32",
               "--port", str(port), "--enable-prompt-tokens-details", "--additional-config", json.dumps(additional)]
    # eager: the server's features (the README's serving test runs `vllm serve` in vLLM's default mode)
    with running_server(command, folder, port, VLLM_CPU_KVCACHE_SPACE="1",
                        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True") as url:
        yield Server(folder, url, tokenizer)


def cached_tokens(reply: dict) -> int:
    return (reply["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def test_models_lists_each_adapter_with_the_base_as_parent(server):
    listing = {card.id: card for card in server.client.models.list().data}
    assert list(listing)[:4] == ["base", *DECLARED]
    for name in DECLARED:
        assert listing[name].parent == "base" and listing[name].root == str(server.folder / name)


def test_model_picks_the_adapter_for_concurrent_completions_chat_and_streams(server):
    prompts = prompts_of((3, 9, 40), seed=0, vocab=len(server.tokenizer))
    sources = [None, *DECLARED]
    jobs = [(prompt, source) for prompt in prompts for source in sources]
    with ThreadPoolExecutor(len(jobs)) as pool:  # one continuous batch of every adapter and the base model
        got = list(pool.map(lambda job: server.complete(job[1] or "base", job[0]), jobs))
    for (prompt, source), reply in zip(jobs, got):
        assert reply["model"] == (source or "base")
        assert reply["choices"][0]["token_ids"] == server.expected(source and server.folder / source, prompt), source
    for source in DECLARED:  # each adapter changes what the model says, else this test could not fail
        assert server.expected(server.folder / source, prompts[2]) != server.expected(None, prompts[2])

    # chat completions with the openai client: `model` is all a client changes; streamed text is the same text
    messages = [{"role": "user", "content": "Who are you?"}]
    for name in DECLARED:
        reply = server.client.chat.completions.create(model=name, messages=messages, max_tokens=NEW, temperature=0,
                                                      extra_body={"return_token_ids": True})
        prompt = reply.model_extra["prompt_token_ids"]
        assert reply.model == name
        assert reply.choices[0].model_extra["token_ids"] == server.expected(server.folder / name, prompt), name
        stream = server.client.chat.completions.create(model=name, messages=messages, max_tokens=NEW, temperature=0,
                                                       stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            reply.choices[0].message.content


def test_an_unknown_model_is_a_404_naming_the_served_models(server):
    with pytest.raises(openai.NotFoundError, match=r"The model `nosuch` does not exist\. Valid models: base, emoji, "
                                                   r"poet, pirate"):
        server.client.completions.create(model="nosuch", prompt="Hi", max_tokens=2)
    # the model and vllm_xargs name different adapters: refused, not guessed
    with pytest.raises(openai.BadRequestError, match=r"names the ReFT adapter 'emoji' in `model` and 'poet'"):
        server.client.completions.create(model="emoji", prompt="Hi", max_tokens=2,
                                         extra_body={"vllm_xargs": {"reft_adapter": "poet"}})


def test_beam_search_is_refused_for_an_adapter_not_answered_by_the_base_model(server):
    for extra in ({}, {"vllm_xargs": {"reft_adapter": "emoji"}}):
        model = "base" if extra else "emoji"
        with pytest.raises(openai.BadRequestError, match=r"Beam search does not carry ReFT adapters"):
            server.client.completions.create(model=model, prompt="Hi", max_tokens=2, n=2,
                                             extra_body={"use_beam_search": True, **extra})
    assert len(server.client.completions.create(model="base", prompt="Hi", max_tokens=2, n=2,
                                                extra_body={"use_beam_search": True}).choices) == 2


def test_adapters_load_and_unload_at_run_time_while_requests_run(server, tmp_path):
    prompt = prompts_of((40,), seed=3, vocab=len(server.tokenizer))[0]  # a full block of 32 under the f3 window
    folder = save_adapter(server.base, tmp_path / "late", seed=11, layers=[0, 3], positions="f3+l3")
    expected = server.expected(folder, prompt)
    long_expected = server.expected(server.folder / "emoji", prompt, 64)
    running: dict = {}
    # a long request for another adapter runs throughout
    thread = threading.Thread(target=lambda: running.update(tokens=server.tokens("emoji", prompt, 64)))
    thread.start()
    assert server.post("/v1/load_lora_adapter", lora_name="late", lora_path=str(folder)).status_code == 200
    assert "late" in [card.id for card in server.client.models.list().data]
    assert server.tokens("late", prompt) == expected
    assert cached_tokens(server.complete("late", prompt)) == 32  # the prompt's first block comes from the cache
    # again under its name: refused unless replacing is asked for
    again = server.post("/v1/load_lora_adapter", lora_name="late", lora_path=str(folder))
    assert again.status_code == 400 and "has already been loaded" in again.text

    # an adapter made for another model is refused with the reason; the server serves on
    wide_base = save_base(tmp_path / "wide_base", "llama", server.tokenizer, hidden=96)
    wide = save_adapter(wide_base, tmp_path / "wide", layers=[0])
    refused = server.post("/v1/load_lora_adapter", lora_name="wide", lora_path=str(wide))
    assert refused.status_code == 400 and "hidden size [96]" in refused.text and "hidden size is 64" in refused.text
    assert "wide" not in [card.id for card in server.client.models.list().data]

    # unloaded while one of its requests runs (streamed: the unload comes after its first tokens): that request
    # finishes with the adapter, new ones are 404s
    body = {"model": "late", "prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True,
            "return_token_ids": True}
    tokens = []
    with requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=300) as stream:
        lines = (line for line in stream.iter_lines() if line.startswith(b"data: {"))
        tokens += json.loads(next(lines)[6:])["choices"][0]["token_ids"]
        before_unload = len(tokens)
        assert server.post("/v1/unload_lora_adapter", lora_name="late").status_code == 200
        for line in lines:
            tokens += json.loads(line[6:])["choices"][0]["token_ids"]
    assert before_unload < 64 and tokens == server.expected(folder, prompt, 64)
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="late", prompt=prompt, max_tokens=2)

    # the name loaded again from the same folder, whose weights changed: none of the old load's KV cache is reused
    save_adapter(server.base, folder, seed=12, layers=[0, 3], positions="f3+l3")
    server._references.clear()
    assert server.post("/v1/load_lora_adapter", lora_name="late", lora_path=str(folder)).status_code == 200
    changed = server.expected(folder, prompt)
    assert changed != expected
    reply = server.complete("late", prompt)
    assert cached_tokens(reply) == 0 and reply["choices"][0]["token_ids"] == changed
    assert server.post("/v1/unload_lora_adapter", lora_name="late").status_code == 200
    thread.join()
    assert running["tokens"] == long_expected


def test_sixty_four_adapters_in_one_engine_in_one_batch(server, tmp_path):
    prompt_of = prompts_of([5 + i % 7 for i in range(MAX_ADAPTERS + 4)], seed=4, vocab=len(server.tokenizer))
    folders = {name: server.folder / name for name in DECLARED}
    for i in range(MAX_ADAPTERS - len(DECLARED)):
        name = f"r{i}"
        folders[name] = save_adapter(server.base, tmp_path / name, seed=100 + i, layers=[i % 4], positions="f3+l2",
                                     low_rank_dimension=2)
        reply = server.post("/v1/load_lora_adapter", lora_name=name, lora_path=str(folders[name]))
        assert reply.status_code == 200, reply.text
    extra = save_adapter(server.base, tmp_path / "one_more", layers=[0])
    refused = server.post("/v1/load_lora_adapter", lora_name="one_more", lora_path=str(extra))
    assert refused.status_code == 400 and "max_reft_adapters" in refused.text
    assert len([c for c in server.client.models.list().data if c.parent == "base"]) == MAX_ADAPTERS

    jobs = [(name, prompt_of[i]) for i, name in enumerate(folders)] + [("base", p) for p in prompt_of[-4:]]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda job: server.tokens(*job), jobs))
    mismatches = [name for (name, prompt), tokens in zip(jobs, got)
                  if tokens != server.expected(folders.get(name), prompt)]
    assert not mismatches, mismatches
    for name in list(folders)[len(DECLARED):]:
        assert server.post("/v1/unload_lora_adapter", lora_name=name).status_code == 200
    shutil.rmtree(tmp_path, ignore_errors=True)
