"""TRL's GRPO and RLOO with `use_vllm=True` and a ReFT policy (`peft_reft.vllm.rl`): the engine (TRL's colocated one,
or a `trl vllm-serve` process) serves the policy as a ReFT adapter, gets its tensors after each optimizer step, and
generates the tokens `PeftModel.generate` gives with the policy's current weights; what cannot be served is refused
when the trainer is built.

A tiny random Llama (SmolLM2's tokenizer) saved to a temporary folder. Colocate: vLLM runs in this process, as TRL runs
it (one engine at a time: each test drops its trainer before the next builds one). Server: `trl vllm-serve` on
localhost, started as the README says. Needs vLLM (`make test` runs this module in its vLLM environment).
"""

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if os.environ.get("PEFT_REFT_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here; `make test` runs this module with vLLM")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import requests  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402
from vllm_models import free_port, running_server, save_base, smollm2_tokenizer  # noqa: E402

from peft_reft import ReftConfig  # noqa: E402

NEW = 8
WORDS = ["yes", "no", "cat", "dog"]


@pytest.fixture(scope="module", autouse=True)
def one_plain_process_afterwards():
    """TRL's colocate mode sets the variables of a distributed launch and starts torch.distributed in this process, as
    a launcher would; they are taken back after the module, so that later tests run in a plain single process (else
    their Trainers wrap the model in DDP)."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {name: os.environ.get(name) for name in names}
    yield
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tokenizer = smollm2_tokenizer()
    return save_base(tmp_path_factory.mktemp("rl") / "base", "llama", tokenizer), tokenizer


def _reward(completions, **_):
    return [float(c.count("a")) - 0.1 * len(c) for c in completions]


def build(trainer_cls, config_cls, base, reft=None, reward=_reward, **overrides):
    folder, tokenizer = base
    settings = dict(output_dir=str(folder.parent / "out"), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=NEW, max_steps=3, logging_steps=1, report_to=[], use_vllm=True,
                    vllm_mode="colocate", vllm_max_model_length=128, learning_rate=5e-2, use_cpu=True,
                    save_strategy="no", seed=0)
    settings.update(overrides)
    reft = reft or ReftConfig(layers=[1, 2], positions="f2+l2", low_rank_dimension=2, init_weights=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": f"Say {w}"} for w in WORDS * 2])
    return trainer_cls(model=model, reward_funcs=reward, args=config_cls(**settings), train_dataset=data,
                       processing_class=tokenizer, peft_config=reft)


def drop(trainer):
    """Shut the trainer's engine down before another is built (one colocated engine per process at a time)."""
    trainer.vllm_generation.llm.llm_engine.engine_core.shutdown()
    del trainer
    gc.collect()


class FollowThePolicy(TrainerCallback):
    """After each optimizer step: sync as TRL does before its next generation, then read the engine's copy of the
    adapter and generate greedily with the engine and with the policy."""

    def __init__(self, prompts):
        self.prompts, self.trainer, self.steps, self.loads = prompts, None, [], []

    def on_step_end(self, args, state, control, **kwargs):
        from peft_reft.vllm.rl import policy_state

        generation, model = self.trainer.vllm_generation, self.trainer.model
        generation.sync_weights()
        served, engine = self.served(generation) if generation.mode == "server" else self.colocated(generation)
        policy = {k: v.detach().cpu().clone() for k, v in policy_state(model, "default").items()}
        model.eval()
        with torch.no_grad():
            expected, base = [], []
            for prompt in self.prompts:
                ids = torch.tensor([prompt])
                kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
                expected.append(model.generate(**kwargs)[0, len(prompt):].tolist())
                with model.disable_adapter():
                    base.append(model.generate(**kwargs)[0, len(prompt):].tolist())
        model.train()
        self.steps.append(dict(engine=engine, policy=policy, served=served, expected=expected, base=base))

    def colocated(self, generation):
        from vllm import SamplingParams

        engine = generation.llm.collective_rpc("peft_reft_adapter_state", args=("policy",))[0]
        outputs = generation.llm.generate(
            [{"prompt_token_ids": p} for p in self.prompts],
            SamplingParams(temperature=0.0, max_tokens=NEW, extra_args={"reft_adapter": "policy"}), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], {k: torch.tensor(v) for k, v in engine.items()}

    def served(self, generation):
        """The server's tokens for `policy` (by `model`, as TRL asks) and its one load's tensors (read through vLLM's
        development endpoint `/collective_rpc`, which `trl vllm-serve` enables)."""
        url = generation.vllm_client.base_url
        held = server_rpc(url, "peft_reft_adapters")  # in the order of loading
        # a new load per sync (TRL's before its generation, this one); older ones are freed once no request runs with
        # them (at most the one before the newest is held)
        assert held[-1] not in self.loads and held[-1].startswith("policy@") and len(held) <= 2, (held, self.loads)
        self.loads.append(held[-1])
        tokens = [requests.post(f"{url}/v1/completions", json=dict(model="policy", prompt=p, max_tokens=NEW,
                                                                   temperature=0, return_token_ids=True),
                                timeout=120).json()["choices"][0]["token_ids"] for p in self.prompts]
        return tokens, {k: torch.tensor(v) for k, v in server_rpc(url, "peft_reft_adapter_state", held[-1]).items()}


def server_rpc(url: str, method: str, *args):
    """The first worker's answer to `method` through the server's development endpoint `/collective_rpc`."""
    reply = requests.post(f"{url}/collective_rpc", json={"method": method, "args": list(args)}, timeout=120)
    return reply.json()["results"][0]


def assert_followed(follow, steps):
    """After each step the engine held the policy's tensors and generated `PeftModel.generate`'s tokens; the adapter
    changes what the model says (else the token check could not fail), and training moved it."""
    assert len(follow.steps) == steps
    for step in follow.steps:
        assert set(step["engine"]) == set(step["policy"]) and all(
            torch.equal(step["engine"][k], step["policy"][k]) for k in step["policy"])
        assert step["served"] == step["expected"]
    assert any(s["expected"] != s["base"] for s in follow.steps)
    first, last = follow.steps[0]["policy"], follow.steps[-1]["policy"]
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_grpo_colocate_engine_holds_and_generates_the_current_policy_after_each_step(base):
    _, tokenizer = base
    prompts = [tokenizer(f"Say {w}").input_ids for w in WORDS] + [list(range(5, 40))]
    trainer = build(GRPOTrainer, GRPOConfig, base)
    # TRL leaves the dtype to vLLM, whose "auto" runs a float32 checkpoint in half precision: the policy's is kept
    assert trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.float32
    follow = FollowThePolicy(prompts)
    follow.trainer = trainer
    trainer.add_callback(follow)
    engine, sent = trainer.vllm_generation.llm, []
    real_generate = engine.generate
    engine.generate = lambda *args, **kwargs: sent.append(
        kwargs.get("sampling_params", args[1] if len(args) > 1 else None)) or real_generate(*args, **kwargs)
    trainer.train()
    drop(trainer)

    trl_requests = [p for p in sent if p.temperature == 1.0]  # TRL samples; the callback is greedy
    assert len(trl_requests) == 3 and all(p.extra_args == {"reft_adapter": "policy"} for p in trl_requests)
    assert_followed(follow, 3)


def test_a_toy_reward_rises_with_vllm_generation_as_without(base):
    """GRPO on a toy reward: 1 when the first completion token falls in S, the tenth of the vocabulary whose output
    embeddings point most along a random direction (about 7% of the base model's first-token mass). 30 steps raise
    the mean reward, and the policy's probability of S, with use_vllm=True as with use_vllm=False (same seed)."""
    folder, tokenizer = base
    head = AutoModelForCausalLM.from_pretrained(folder).lm_head.weight.detach()
    direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(1))
    chosen = torch.topk(head @ direction, head.shape[0] // 10).indices
    in_s = set(chosen.tolist())

    def first_token_in_s(completion_ids, **_):
        return [float(bool(ids) and ids[0] in in_s) for ids in completion_ids]

    prompt = torch.tensor([tokenizer("Say yes").input_ids])
    figures = {}
    for use_vllm in (True, False):
        trainer = build(GRPOTrainer, GRPOConfig, base, reward=first_token_in_s, use_vllm=use_vllm, max_steps=30,
                        per_device_train_batch_size=32, num_generations=8, max_completion_length=2, seed=1,
                        reft=ReftConfig(layers=[1, 2], positions="f2+l2", low_rank_dimension=2))
        trainer.train()
        rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
        model = trainer.model.eval()
        with torch.no_grad():
            policy = model(input_ids=prompt).logits[0, -1].softmax(-1)[chosen].sum().item()
            with model.disable_adapter():
                base_mass = model(input_ids=prompt).logits[0, -1].softmax(-1)[chosen].sum().item()
        figures[use_vllm] = dict(steps=len(rewards), first=sum(rewards[:10]) / 10, last=sum(rewards[-10:]) / 10,
                                 policy=policy, base=base_mass)
        if use_vllm:
            drop(trainer)
    print(figures)
    for side in figures.values():
        assert side["steps"] == 30 and side["last"] > side["first"] + 0.05, figures
        assert side["policy"] > 1.5 * side["base"], figures


def test_rloo_colocate_trains_with_the_engine_following_the_policy(base):
    _, tokenizer = base
    prompts = [tokenizer(f"Say {w}").input_ids for w in WORDS]
    trainer = build(RLOOTrainer, RLOOConfig, base, max_steps=2,
                    reft=ReftConfig(layers=[0, 3], positions="l3", low_rank_dimension=2, init_weights=False,
                                    component="mlp_output"))
    follow = FollowThePolicy(prompts)
    follow.trainer = trainer
    trainer.add_callback(follow)
    trainer.train()
    drop(trainer)
    assert_followed(follow, 2)


def test_grpo_server_mode_loads_the_policy_into_trl_vllm_serve_and_sends_it_after_each_step(base, tmp_path):
    """`trl vllm-serve` as the README starts it for a ReFT policy; TRL's requests name the policy by `model`; each
    sync is a new load of the policy's folder (kilobytes), and no NCCL weight-transfer group is opened."""
    folder, tokenizer = base
    prompts = [tokenizer(f"Say {w}").input_ids for w in WORDS] + [list(range(5, 40))]
    port = free_port()
    command = [str(Path(sys.executable).with_name("trl")), "vllm-serve", "--model", str(folder), "--port", str(port),
               "--dtype", "float32", "--max_model_len", "128", "--enforce_eager",
               "--additional-config", json.dumps({"max_reft_adapters": 1})]
    with running_server(command, tmp_path, port, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
                        VLLM_CPU_KVCACHE_SPACE="1") as url:
        trainer = build(GRPOTrainer, GRPOConfig, base, vllm_mode="server", vllm_server_base_url=url)
        client = trainer.vllm_generation.vllm_client
        assert getattr(client, "communicator", None) is None  # TRL's NCCL group was not opened (no CUDA here)
        bodies, real_post = [], client.session.post
        client.session.post = lambda address, **kwargs: bodies.append((address, kwargs.get("json"))) or real_post(
            address, **kwargs)
        follow = FollowThePolicy(prompts)
        follow.trainer = trainer
        follow.loads = server_rpc(url, "peft_reft_adapters")  # the load made when the trainer was built
        assert len(follow.loads) == 1
        trainer.add_callback(follow)
        trainer.train()
        listed = [m["id"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]]
    completions = [body for address, body in bodies if address.endswith("/v1/completions")]
    assert len(completions) == 3 and all(body["model"] == "policy" for body in completions)
    loads = [body for address, body in bodies if address.endswith("/v1/load_lora_adapter")]
    # one per sync: TRL's before each generation, the callback's after each step
    assert len(loads) == 3 + 3 and all(body["lora_name"] == "policy" and body["load_inplace"] for body in loads)
    assert listed == [str(folder), "policy"]
    assert_followed(follow, 3)


@pytest.mark.parametrize("status, body, reason", [
    (400, {"error": {"message": "ReFT adapter 'policy': this server was started without ReFT; start it with "
                                "--additional-config ..."}}, r"this server was started without ReFT; start it with"),
    (404, {"detail": "Not Found"}, r'\{"detail": "Not Found"\}'),
], ids=["server_without_reft", "no_runtime_loading"])
def test_a_server_that_does_not_load_the_policy_stops_the_trainer_saying_what_it_needs(status, body, reason):
    """The server's refusal (a server started as for LoRA; one without vLLM's runtime loading switch) reaches the user
    with what a server needs, when the trainer is built (`load_policy` runs in `_init_vllm`)."""
    import types

    from peft_reft.vllm.rl import load_policy

    reply = types.SimpleNamespace(status_code=status, json=lambda: body, text=json.dumps(body))
    client = types.SimpleNamespace(base_url="http://localhost:8000", session=types.SimpleNamespace(
        post=lambda url, json: reply))
    with pytest.raises(RuntimeError, match=r"vllm_mode='server' with a ReFT policy: the vLLM server at "
                                           r"http://localhost:8000 did not load the policy from /tmp/policy \(HTTP "
                                           rf"{status}: .*{reason}.*\)\. A server serves a ReFT policy with peft-reft "
                                           r"installed beside vLLM, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True .*"
                                           r"max_reft_adapters"):
        load_policy(client, "/tmp/policy")


def test_sleep_mode_is_refused_when_the_trainer_is_built(base):
    with pytest.raises(ValueError, match=r"vllm_enable_sleep_mode=True and a ReFT policy: .* Set "
                                         r"vllm_enable_sleep_mode=False"):
        build(GRPOTrainer, GRPOConfig, base, vllm_enable_sleep_mode=True)


def test_a_policy_with_a_lora_part_is_refused_when_the_trainer_is_built(base):
    reft = ReftConfig(layers=[1], positions="f2", lora_config=LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"use_vllm=True with this ReFT policy: ReFT adapter 'policy' .* cannot be "
                                         r"served with vLLM: it has a LoRA part .* With use_vllm=False"):
        build(GRPOTrainer, GRPOConfig, base, reft=reft)


def test_fsdp_is_refused_for_a_reft_policy():
    """Under FSDP the sync would read shards of the intervention tensors: refused (TRL's `DistributedBackend` says
    whether FSDP runs)."""
    import types

    from peft_reft.vllm.rl import generation_problem

    for mode in ("colocate", "server"):
        generation = types.SimpleNamespace(mode=mode, enable_sleep_mode=False,
                                           _dist=types.SimpleNamespace(is_fsdp=True))
        assert generation_problem(generation) == (
            "use_vllm=True under FSDP with a ReFT policy: the weight sync sends whole intervention tensors, which FSDP "
            "shards. Train with DDP or DeepSpeed (ZeRO-3 included), or use_vllm=False.")
        generation._dist.is_fsdp = False
        assert generation_problem(generation) is None


ZERO3_RUN = textwrap.dedent("""
    import sys
    import deepspeed, torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from peft_reft import ReftConfig
    from peft_reft.vllm.rl import policy_state

    folder, out = sys.argv[1], sys.argv[2]
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                      max_steps=3, report_to=[], use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128,
                      use_cpu=True, save_strategy="no", learning_rate=5e-2, seed=0)
    data = Dataset.from_list([{"prompt": f"Say {w}"} for w in ["yes", "no", "cat", "dog"] * 2])
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                          reward_funcs=lambda completions, **_: [float(c.count("a")) for c in completions], args=args,
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(folder),
                          peft_config=ReftConfig(layers=[1, 2], positions="f2+l2", low_rank_dimension=2,
                                                 init_weights=False))
    assert trainer.vllm_generation._dist.is_zero3

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            generation = trainer.vllm_generation
            generation.sync_weights()
            engine = generation.llm.collective_rpc("peft_reft_adapter_state", args=("policy",))[0]
            params = [p for n, p in trainer.model.named_parameters() if ".reft_interventions." in n]
            held = max(p.numel() for p in params)  # ZeRO-3 placeholders: the values live in DeepSpeed's partitions
            with deepspeed.zero.GatheredParameters(params):
                policy = {k: v.detach().cpu().clone() for k, v in policy_state(trainer.model, "default").items()}
            equal = set(engine) == set(policy) and all(torch.equal(torch.tensor(engine[k]), policy[k]) for k in policy)
            print(f"step {state.global_step}: placeholder numel {held}, engine equals the gathered policy: {equal}, "
                  f"{sum(v.numel() for v in policy.values())} values")

    trainer.add_callback(Check())
    trainer.train()
""")


def test_zero3_sync_gathers_the_policy_tensors(base, tmp_path):
    """Under DeepSpeed ZeRO-3 (one process, `accelerate launch` with the README's config) the policy's parameters are
    placeholders; each sync gathers them as TRL gathers parameters, and the engine holds the whole tensors."""
    folder, _ = base
    (tmp_path / "run.py").write_text(ZERO3_RUN)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    root = Path(__file__).resolve().parents[1]
    config = root / "examples" / "accelerate" / "deepspeed_zero3.yaml"
    done = subprocess.run([accelerate, "launch", "--config_file", str(config), "--num_processes", "1", "run.py",
                           str(folder), str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    values = 2 * (2 * 2 * 64 + 2)  # 2 layers of LoReFT r2 on hidden 64: R and W (2 x 64 each), b (2)
    assert lines == [f"step {n}: placeholder numel 0, engine equals the gathered policy: True, {values} values"
                     for n in (1, 2, 3)], done.stdout[-3000:]
