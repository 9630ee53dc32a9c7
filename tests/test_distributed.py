"""Two processes over gloo on this CPU: DDP with SFTTrainer, FSDP2, DeepSpeed ZeRO-2/3 and a plain accelerate loop,
against one process (`accelerate launch --cpu --num_processes 2` runs ONE process on a CPU-only machine, so the tests
use torchrun; examples/sft.py under `accelerate launch --multi_gpu` is the README's command, run by test_readme.py)."""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_reft  # noqa: F401  (registers REFT with peft, needed by PeftModel.from_pretrained)

# `pytest -n 2`: the multi-process tests run one at a time on one worker (two ranks each), beside the other's tests
pytestmark = pytest.mark.xdist_group("multiprocess")
ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "distributed"


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(pid: int) -> None:
    """Kill a launcher and every process below it. The ranks that torchrun starts live in sessions of their own, so
    killing the launcher's process group would leave them running (and holding the pipes open)."""
    try:
        launcher = psutil.Process(pid)
        processes = [*launcher.children(recursive=True), launcher]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


GLOO_ABORT = "terminate called without an active exception"


def launch(command, timeout=150):
    """Run a multi-process command; on a timeout kill it with all its ranks and try once more on a fresh port, since
    a gloo run on a loaded 2-core machine can stall; the same when a rank is aborted by gloo's C++ threads (FSDP2:
    once in four suite runs, beside another test on 2 cores). A second stall or abort fails the test."""
    for attempt in range(2):
        command = [str(part).replace("{port}", str(free_port())) for part in command]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.communicate()
            if attempt == 1:
                raise
            continue
        if attempt == 0 and process.returncode != 0 and GLOO_ABORT in stderr:
            continue
        break
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert GLOO_ABORT not in stderr  # clean gloo shutdown
    return stdout


def torchrun(script, *args, processes=2):
    return launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", "{port}", str(script), *map(str, args)])


def single_process(script, *args, timeout=300):
    result = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                            env=_env(), timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("options", ["", "gc intervention=nodireft component=mlp_output"])
def test_sft_trainer_ddp_matches_single_process_and_ranks_agree(tmp_path, options):
    """DDP over 2 processes against one process with the same global batch; `gc`: gradient checkpointing in both, with
    an MLP-output edit (the edit inside the checkpointed layer runs again in the recomputation)."""
    torchrun(WORKERS / "sft_worker.py", tmp_path / "ddp", 2, 16, *options.split())
    single_process(WORKERS / "sft_worker.py", tmp_path / "single", 4, 16, *options.split())
    rank0, rank1 = (load_file(tmp_path / "ddp" / f"params-{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 12
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # bit-identical on both ranks
    ddp_losses = json.loads((tmp_path / "ddp" / "losses-0.json").read_text())
    single_losses = json.loads((tmp_path / "single" / "losses-0.json").read_text())
    assert len(ddp_losses) == len(single_losses) == 16
    # the logged DDP loss is the mean of the two ranks' losses over the same 4 examples: equal up to float sums
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-5)
    assert sum(ddp_losses[-4:]) < 0.97 * sum(ddp_losses[:4])
    # only the main process writes the adapter (the Trainer's should_save), and it is there
    assert [json.loads((tmp_path / "ddp" / f"writes-{r}.json").read_text()) for r in (0, 1)] == [True, False]
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").exists()

    single = load_file(tmp_path / "single" / "params-0.safetensors")
    for name in rank0:
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, pad_token_id=0, eos_token_id=2, bos_token_id=1,
    ))
    loaded = PeftModel.from_pretrained(base, tmp_path / "ddp" / "adapter")
    for name, param in loaded.named_parameters():
        if ".reft_interventions." in name:
            assert torch.equal(param, rank0[name]), name


@pytest.mark.slow
def test_fsdp2_sharded_training_matches_single_process(tmp_path):
    # accelerate starts FSDP only on GPUs; torch's FSDP2 (`fully_shard`, what accelerate uses) runs on gloo
    torchrun(WORKERS / "fsdp_worker.py", tmp_path, "fsdp")
    single_process(WORKERS / "fsdp_worker.py", tmp_path, "single")
    from safetensors import safe_open

    assert safe_open(tmp_path / "fsdp-0.safetensors", "pt").metadata() == {"sharded": "True"}
    rank0, rank1, single = (load_file(tmp_path / f) for f in ("fsdp-0.safetensors", "fsdp-1.safetensors",
                                                                "single-0.safetensors"))
    assert len(rank0) == 12
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_accelerate_loop_syncs_init_grads_and_params_without_hanging(tmp_path):
    torchrun(WORKERS / "accelerate_worker.py", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1))
    for key in ("initial", "final"):
        for name in rank0[key]:
            assert torch.equal(rank0[key][name], rank1[key][name]), (key, name)
    for step, (g0, g1) in enumerate(zip(rank0["grads"], rank1["grads"])):
        for name in g0:
            assert torch.equal(g0[name], g1[name]), (step, name)
    assert any(not torch.equal(rank0["initial"][n], rank0["final"][n]) for n in rank0["initial"])


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """The workers' tiny Llama, saved: ZeRO-3 with zero3_init_flag partitions the weights it loads from here."""
    sys.path.insert(0, str(WORKERS))
    from sft_worker import tiny_model

    path = tmp_path_factory.mktemp("base")
    tiny_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single_runs(saved_base, tmp_path_factory):
    """The single-process run for an adapter's settings (e.g. "intervention=noreft component=attention_output"),
    made once per module."""
    runs = {}

    def run(settings: str):
        if settings not in runs:
            runs[settings] = tmp_path_factory.mktemp("single")
            single_process(WORKERS / "sft_worker.py", runs[settings], 4, 8, *settings.split(), f"base={saved_base}")
        return runs[settings]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("options", ["lora", "zero3 lora"])
def test_reft_with_a_lora_part_matches_single_process(tmp_path, saved_base, options):
    """ReFT + LoRA in one adapter under DDP and under DeepSpeed ZeRO-3: the same training as one process."""
    single = tmp_path / "single"
    single_process(WORKERS / "sft_worker.py", single, 4, 8, "lora", f"base={saved_base}")
    torchrun(WORKERS / "sft_worker.py", tmp_path / "run", 2, 8, *options.split(), f"base={saved_base}")
    rank0, rank1 = (load_file(tmp_path / "run" / f"params-{r}.safetensors") for r in (0, 1))
    alone = load_file(single / "params-0.safetensors")
    assert rank0.keys() == rank1.keys() == alone.keys()
    assert sum(".lora_A." in n or ".lora_B." in n for n in rank0) == 3 * 2 * 2 and len(rank0) == 12 + 12
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], alone[name], rtol=1e-4, atol=1e-5)
    losses, single_losses = (json.loads((d / "losses-0.json").read_text()) for d in (tmp_path / "run", single))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-5)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base), tmp_path / "run" / "adapter")
    reloaded = {name: param for name, param in loaded.named_parameters() if name in rank0}
    assert reloaded.keys() == rank0.keys()
    for name, param in reloaded.items():
        assert torch.equal(param, rank0[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    "zero2", "zero3", "zero3 init gc", "zero3 offload",
    "zero3 intervention=noreft component=attention_output",
    "zero3 gc intervention=nodireft component=mlp_output",
])
def test_deepspeed_zero_matches_single_process(tmp_path, saved_base, single_runs, options):
    """ZeRO-2/3 through the HF Trainer (TrainingArguments(deepspeed=...)), 2 CPU processes, global batch 4 = the
    single process's batch; ZeRO-3 partitions every tensor (the interventions' too). `init`: the base model is
    partitioned from construction; `gc`: gradient checkpointing; `offload`: ZeRO-3 parameter offload to the CPU;
    NoReFT / NoDiReFT read their projection through a module call, which ZeRO-3 gathers; attention / MLP edits run in
    hooks on partitioned submodules."""
    single_run = single_runs(" ".join(o for o in options.split() if "=" in o))
    torchrun(WORKERS / "sft_worker.py", tmp_path, 2, 8, *options.split(), f"base={saved_base}")
    rank0, rank1 = (load_file(tmp_path / f"params-{r}.safetensors") for r in (0, 1))
    single = load_file(single_run / "params-0.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys() and len(rank0) == 12
    for name in rank0:
        assert rank0[name].shape == single[name].shape, name  # gathered: whole tensors, not shards
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5)
    losses = json.loads((tmp_path / "losses-0.json").read_text())
    single_losses = json.loads((single_run / "losses-0.json").read_text())
    assert len(losses) == len(single_losses) == 8
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-5)

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")  # complete, written once
    assert len(saved) == 12 and all(t.numel() > 0 for t in saved.values())
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base), tmp_path / "adapter").eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base),
                                          single_run / "adapter").eval()
    for name, param in loaded.named_parameters():
        if ".reft_interventions." in name:
            assert torch.equal(param, rank0[name]), name
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4,
                                   atol=1e-4)
