"""Every snippet and command of README.md and examples/README.md runs as written (smoke-sized), offline, on the real
SmolLM2-135M-Instruct and all-MiniLM-L6-v2."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md"]

# how each Python snippet is recognised, and what its output must show
SNIPPETS = {
    "model.print_trainable_parameters()                # trainable params: 9,224": "trainable params: 9,224",
    "peft_config=ReftConfig(layers=[8]": "train_loss",
    'task_type="SEQ_CLS"': "trainable params: 19,226",
    "lora_config=LoraConfig(": "trainable params: 2,460,688",
    "explanation = torch._dynamo.explain(model)": "graphs 1 graph breaks 0",
    "ReftHFLM(pretrained=model": "'acc,none':",
}
# snippets that need a running `vllm serve`: run by `test_serving_with_vllm`
SERVING_SNIPPETS = {'OpenAI(base_url="http://localhost:8000/v1"': "emoji ->"}
# extra flags that make a documented command smoke-sized (appended; the command itself is run as written)
SMOKE_FLAGS = {
    "examples/quickstart.py": ["--quick"],
    "examples/sft.py": ["--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no"],
    "examples/classification.py": ["--steps", "10"],
    "examples/dpo.py": ["--max_steps", "2", "--save_strategy", "no"],
    "examples/grpo.py": ["--max_steps", "2", "--save_strategy", "no", "--max_completion_length", "4"],
    "examples/compare_lora.py": ["--quick"],
}
# documented commands that another documented command runs: tested as part of that one
RUN_BY = {"python examples/quickstart.py": "make quickstart"}  # the Makefile recipe's last line (asserted)
# commands that are not run here, and why
NOT_RUN = {
    "make test": "this test suite itself",
    "pip install": "the install step of `make test` (Makefile `install`) runs these",
    "pip uninstall -y torchvision torchaudio torchcodec": "`make install-vllm` removes each of them that does not "
                                                          "import (tested: test_vllm.py, any import order)",
    "python examples/vllm_serving.py": "run by `test_serving_with_vllm` (in `make test`'s vLLM environment)",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve": "run by `test_serving_with_vllm` (in `make test`'s vLLM "
                                                        "environment)",
    "python examples/grpo.py --output_dir outputs/grpo-vllm ": "run by `test_grpo_with_vllm` (in `make test`'s vLLM "
                                                               "environment)",
    "python examples/grpo.py --output_dir outputs/grpo-vllm-server": "run by `test_grpo_with_vllm_server` (in `make "
                                                                     "test`'s vLLM environment)",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True trl vllm-serve": "run by `test_grpo_with_vllm_server` (in `make test`'s "
                                                            "vLLM environment)",
}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def bash_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = " ".join(shlex.split(command, comments=True))
            if command:
                commands.append(command)
    return commands


def documented_commands() -> list[str]:
    return sorted({c for doc in DOCS for c in bash_commands(doc.read_text())})


def smoke_argv(command: str) -> list[str]:
    """A documented command as run here: its words, plus its script's smoke flags unless it already ends with them."""
    argv = command.split()
    script = next((a for a in argv if a in SMOKE_FLAGS), None)
    flags = SMOKE_FLAGS.get(script, [])
    if script is not None and "--help" not in argv and argv[len(argv) - len(flags):] != flags:
        argv += flags
    return argv


SCRIPTS = Path(sys.executable).parent  # the console scripts of the interpreter that runs the tests


def env():
    # the scripts a command starts (accelerate -> python, ...) come from this interpreter's installation too
    path = os.pathsep.join([str(SCRIPTS), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def console_script(name: str) -> str:
    """`name` (torchrun, accelerate, ...) as installed next to this interpreter, not whatever is first on PATH."""
    script = SCRIPTS / name
    assert script.exists(), f"{name} is not installed next to {sys.executable}: run `make install` with this Python"
    return str(script)


def write_data(folder: Path) -> None:
    """The local data files the commands name: conversational prompt/completion rows."""
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "completion": [{"role": "assistant", "content": f"{2 * i}"}]} for i in range(16)]
    for name in ("data.jsonl", "my.jsonl"):
        (folder / name).write_text("\n".join(json.dumps(r) for r in rows))


def save_adapter_and_link(outputs: Path, scale: float | None = None) -> None:
    """`outputs/smollm2` (a link to the SmolLM2 checkpoint), `outputs/reft-adapter` (the README adapter, untrained;
    with `scale`, random weights times `scale`: an adapter that changes the answers)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from peft import get_peft_model
    from smollm2 import load_smollm2, smollm2_path

    from peft_reft import ReftConfig

    outputs.mkdir(exist_ok=True)
    (outputs / "smollm2").symlink_to(smollm2_path(), target_is_directory=True)
    config = ReftConfig(layers=[8], low_rank_dimension=4, positions="f1+l5", init_weights=scale is None)
    model = get_peft_model(load_smollm2()[0], config)
    if scale is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.mul_(scale)
    model.save_pretrained(outputs / "reft-adapter")


def _run(argv, cwd, timeout=900):
    """Run `argv`; return its stdout. Fails on a non-zero exit or on a warning raised by peft_reft itself."""
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env(), timeout=timeout)
    assert result.returncode == 0, " ".join(argv) + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
    # a warning raised by peft_reft's code ("peft_reft/model.py:1: UserWarning") or by its start-up hook, which is
    # attributed to the importing file ("...: UserWarning: peft-reft: the hook run after importing ... failed")
    assert "peft_reft/" not in result.stderr and "peft-reft:" not in result.stderr, result.stderr[-3000:]
    return result.stdout


def test_every_snippet_is_run_here():
    blocks = [b for doc in DOCS for b in python_blocks(doc.read_text())]
    unrun = [b[:200] for b in blocks if not any(marker in b for marker in {**SNIPPETS, **SERVING_SNIPPETS})]
    assert not unrun, f"README snippets without a test (add a marker to SNIPPETS): {unrun}"


def test_install_commands_are_what_make_installs():
    makefile = (ROOT / "Makefile").read_text()
    for command in documented_commands():
        if command.startswith("pip install"):
            packages = [w for w in command.split()[2:] if not w.startswith("-") and w != "."]
            assert all(p in makefile for p in packages), (command, "is not part of `make install`")


@pytest.mark.slow
@pytest.mark.parametrize("marker", list(SNIPPETS))
def test_readme_snippet_runs(marker, tmp_path):
    block = next(b for doc in DOCS for b in python_blocks(doc.read_text()) if marker in b)
    (tmp_path / "snippet.py").write_text(block)
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the snippets run from the repository root
    out = _run([sys.executable, "snippet.py"], tmp_path)
    assert SNIPPETS[marker] in out, out[-2000:]
    if 'task_type="SEQ_CLS"' in marker:
        accuracy = float(re.search(r"^accuracy ([0-9.]+)$", out, flags=re.M).group(1))
        assert accuracy >= 0.95, out[-2000:]
    if marker.startswith("model.print_trainable"):
        assert (tmp_path / "outputs" / "reft-adapter" / "adapter_model.safetensors").exists()
    if "SFTTrainer" in block:
        assert (tmp_path / "outputs" / "sft" / "adapter_model.safetensors").exists()


def check_quickstart(out: str, folder: Path) -> None:
    """What a quickstart smoke run prints and writes (`folder`: its output directory)."""
    assert "Emoji-only answers to 2 unseen prompts" in out and "trainable params: 18,448" in out
    assert "Tokens the interventions edit ([edited]), 6 of" in out  # f1+l5 with shared weights: one window kind
    assert "Device: CPU" in out and "Adapter on disk:" in out
    assert {"adapter_model.safetensors", "loss.png"} <= {p.name for p in folder.iterdir()}


# the torchrun / accelerate commands run two processes each: on one pytest-xdist worker, one at a time
MULTIPROCESS = ("torchrun", "accelerate launch")


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    pytest.param(c, marks=pytest.mark.xdist_group("multiprocess")) if c.startswith(MULTIPROCESS) else c
    for c in documented_commands()
], ids=lambda c: c[:70])
def test_readme_command_runs(command, tmp_path):
    reason = next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)
    if reason is not None:
        pytest.skip(f"not run here: {reason}")
    argv = smoke_argv(command)
    runner = next((RUN_BY[prefix] for prefix in RUN_BY if " ".join(argv[:2]) == prefix), None)
    if runner is not None:
        assert runner in documented_commands()
        recipe = re.search(rf"^{runner.split()[1]}:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
        assert recipe.group(1).splitlines()[-1] == f"\t$(PYTHON) {argv[1]} $(QUICKSTART_ARGS)", recipe.group(1)
        pytest.skip(f"run by {runner!r} (its last step), tested there")
    twin = next((c for c in documented_commands() if c < command and smoke_argv(c) == argv), None)
    if twin is not None:
        pytest.skip(f"with its smoke flags it is the same command as {twin!r}, run on its own")
    script = next((a for a in argv if a in SMOKE_FLAGS), None)
    write_data(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    if argv[0] == "make":
        argv = ["make", "-C", str(ROOT), *argv[1:], f"PYTHON={sys.executable}",
                f"QUICKSTART_ARGS=--quick --output-dir {tmp_path / 'quickstart'}"]
        check_quickstart(_run(argv, tmp_path), tmp_path / "quickstart")
        return
    if "peft_reft.lm_eval" in argv:  # what the README's earlier steps leave: the SmolLM2 link and a saved adapter
        save_adapter_and_link(tmp_path / "outputs")
    argv[0] = sys.executable if argv[0] == "python" else console_script(argv[0])
    out = _run(argv, tmp_path)
    if "--help" in argv:
        assert "--reft_layers" in out
    elif script in ("examples/sft.py", "examples/dpo.py", "examples/grpo.py"):
        output_dir = Path(tmp_path, argv[argv.index("--output_dir") + 1])
        config = json.loads((output_dir / "adapter_config.json").read_text())
        assert config["peft_type"] == "REFT" and (output_dir / "adapter_model.safetensors").exists()
        if script == "examples/sft.py":  # logs every step: the loss plot, written by the main process alone
            assert (output_dir / "loss.png").exists()
        if "--use_peft" in argv:  # TRL's LoRA flags give the ReFT adapter a LoRA part
            lora = config["lora_config"]
            assert lora["r"] == int(argv[argv.index("--lora_r") + 1]) and len(lora["target_modules"]) == 7, lora
            assert any(".lora_A." in k for k in load_file(output_dir / "adapter_model.safetensors"))
        else:
            assert config["lora_config"] is None
    elif script == "examples/compare_lora.py":
        results = json.loads(next(tmp_path.glob("outputs/compare_lora/compare_lora.json")).read_text())
        assert list(results) == ["emoji", "sentiment", "arithmetic"]
        assert [len(rows) for rows in results.values()] == [5, 2, 2]  # --quick: all methods on the first task only
        assert all(row["held_out"] == 4 and row["ci95"][0] <= row["score"] <= row["ci95"][1]
                   for rows in results.values() for row in rows)
        trainable = [row["trainable"] for row in results["emoji"]]
        # LoRA r8 all-linear, the ReFT recipes, and ReFT + LoRA (the quickstart recipe's + LoRA r8 all-linear's)
        assert trainable == [2_442_240, 18_448, 276_720, 276_720, 18_448 + 2_442_240], trainable
        assert "| sentiment (4 items) | LoReFT, quickstart recipe |" in out
        assert "| emoji (4 items) | LoReFT + LoRA r8, quickstart recipe |" in out
        assert "| arithmetic (4 items) | LoRA r8, all linear |" in out
        assert (tmp_path / "outputs" / "compare_lora" / "compare_lora.png").exists()
    elif "peft_reft.lm_eval" in argv:
        [results] = list((tmp_path / "outputs" / "lm_eval").rglob("results_*.json"))
        accuracy = json.loads(results.read_text())["results"]["reft_sentiment"]["acc,none"]
        assert 0 <= accuracy <= 1 and "|reft_sentiment|" in out.replace(" ", ""), out[-2000:]
        [samples] = list((tmp_path / "outputs" / "lm_eval").rglob("samples_reft_sentiment_*.jsonl"))
        assert len(samples.read_text().splitlines()) == 128
    elif "--link" in argv:
        assert (tmp_path / "outputs" / "smollm2" / "config.json").exists() and out.strip().endswith("instruct")
    elif script == "examples/classification.py":
        assert re.search(r"Test accuracy, ReFT \+ linear head: +[0-9.]+", out), out[-2000:]


def reference_answers(outputs: Path, prompt: str, max_tokens: int = 32) -> dict:
    """Greedy answers of `PeftModel.generate` (float32) for the README adapter and the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(outputs / "smollm2")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(outputs / "smollm2", dtype=torch.float32).eval()
    answers = {None: base.generate(**ids, max_new_tokens=max_tokens, do_sample=False)}
    model = PeftModel.from_pretrained(base, outputs / "reft-adapter").eval()
    answers["emoji"] = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    return {k: tokenizer.decode(v[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) for k, v in answers.items()}


def serving_commands(heads=(["python", "examples/vllm_serving.py"], ["vllm", "serve"])) -> list[tuple[dict, list[str]]]:
    """The README's commands that start with one of `heads` (the serving commands by default), as (environment
    variables set on the line, argv) (split once, so that the quoted JSON stays one argument)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            variables = {}
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                name, _, value = argv.pop(0).partition("=")
                variables[name] = value
            if argv[:2] in heads:
                commands.append((variables, argv))
    return commands


@pytest.mark.slow
def test_serving_with_vllm(tmp_path):
    """The README's serving section: the offline script and `vllm serve` answered by the `openai` client give each
    adapter's answers, those of `PeftModel.generate`; a request naming an unknown adapter fails alone."""
    if os.environ.get("PEFT_REFT_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason="vLLM is not installed here; `make test` runs this with vLLM")
    import openai
    from vllm_models import wait_until_healthy

    (_, offline), (serve_env, serve) = serving_commands()
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    save_adapter_and_link(tmp_path / "outputs", scale=4.0)
    expected = reference_answers(tmp_path / "outputs", "Who are you?")
    assert expected["emoji"] != expected[None]  # the adapter changes the answer, else this test could not fail
    # vLLM's default (compiled) mode as the README runs it, dynamo's eager backend instead of inductor (minutes less)
    run_env = {**env(), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"}

    assert serve_env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    server_log = tmp_path / "server.log"
    server = subprocess.Popen([console_script("vllm"), *serve[1:]], cwd=tmp_path, env={**run_env, **serve_env},
                              text=True, stdout=server_log.open("w"), stderr=subprocess.STDOUT)
    try:
        # the offline script runs while the server starts
        out = subprocess.run([sys.executable, *offline[1:]], cwd=tmp_path, capture_output=True, text=True,
                             env=run_env, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        for adapter, answer in expected.items():
            assert f"[{adapter or 'base'}] Who are you? -> {answer!r}" in out.stdout, (out.stdout, expected)

        wait_until_healthy(server, server_log, "http://localhost:8000")
        block = next(b for doc in DOCS for b in python_blocks(doc.read_text()) if "OpenAI(base_url=" in b)
        (tmp_path / "client.py").write_text(block)
        out = _run([sys.executable, "client.py"], tmp_path)
        assert "['smollm2', 'emoji']\n" in out, out
        for model, answer in [("emoji", expected["emoji"]), ("emoji-copy", expected["emoji"]),
                              ("smollm2", expected[None])]:
            assert f"{model} -> {answer}\n" in out, (out, expected)
        client = openai.OpenAI(base_url="http://localhost:8000/v1", api_key="none")
        with pytest.raises(openai.BadRequestError, match=r"ReFT adapter 'nope' is not served; served adapters: "):
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, extra_body={"vllm_xargs": {"reft_adapter": "nope"}})
        with pytest.raises(openai.NotFoundError, match=r"Valid models: smollm2, emoji\."):  # emoji-copy: unloaded
            client.chat.completions.create(model="emoji-copy", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
        out = _run([sys.executable, "client.py"], tmp_path)  # the server serves on
        assert f"emoji -> {expected['emoji']}\n" in out
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_grpo_with_vllm(tmp_path):
    """The README's GRPO command with `--use_vllm --vllm_mode colocate` (smoke-sized): TRL builds its engine in the
    training process, the engine serves the policy as a ReFT adapter, and the run saves a ReFT adapter."""
    if os.environ.get("PEFT_REFT_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason="vLLM is not installed here; `make test` runs this with vLLM")
    command = next(c for c in documented_commands() if "--vllm_mode colocate" in c)
    argv = smoke_argv(command)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    argv[0] = sys.executable
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**env(), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "ReFT adapters served: policy" in log, log[-4000:]  # TRL's engine serves the policy through the plugin
    output_dir = tmp_path / argv[argv.index("--output_dir") + 1]
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "REFT" and (output_dir / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_grpo_with_vllm_server(tmp_path):
    """The README's GRPO commands with TRL's server (smoke-sized): `trl vllm-serve` as written, then the training script
    with `--vllm_mode server`: the trainer loads its policy into the server, trains, and saves a ReFT adapter."""
    if os.environ.get("PEFT_REFT_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason="vLLM is not installed here; `make test` runs this with vLLM")
    import requests
    from vllm_models import wait_until_healthy

    sys.path.insert(0, str(ROOT / "examples"))
    from smollm2 import smollm2_path

    ((serve_env, serve),) = serving_commands(heads=(["trl", "vllm-serve"],))
    assert serve_env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    argv = smoke_argv(next(c for c in documented_commands() if "--vllm_mode server" in c))
    argv[0] = sys.executable
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "smollm2").symlink_to(smollm2_path(), target_is_directory=True)
    # vLLM's default (compiled) mode, dynamo's eager backend instead of inductor (minutes less)
    run_env = {**env(), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"}
    server_log = tmp_path / "server.log"
    server = subprocess.Popen([console_script("trl"), *serve[1:]], cwd=tmp_path, env={**run_env, **serve_env},
                              text=True, stdout=server_log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(server, server_log, "http://localhost:8000")
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=run_env)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        models = [m["id"] for m in requests.get("http://localhost:8000/v1/models", timeout=30).json()["data"]]
        assert models == ["outputs/smollm2", "policy"]  # the trainer's policy, loaded at run time
    finally:
        server.terminate()
        server.wait(timeout=60)
    output_dir = tmp_path / argv[argv.index("--output_dir") + 1]
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "REFT" and (output_dir / "adapter_model.safetensors").exists()
