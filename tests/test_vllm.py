"""Serving with vLLM: the tokens of `PeftModel.generate`, refusals, prefix caching.

Tiny random Llama and Qwen2 models (SmolLM2's tokenizer) and ReFT adapters are saved to a temporary folder; reference
tokens come from `PeftModel.from_pretrained(...).generate` (greedy, float32) in this process; vLLM runs in its own
process (`tests/vllm_engine.py`). Needs vLLM (`make test` runs this module in its vLLM environment, where a missing
vLLM is an error, not a skip).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("PEFT_REFT_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here; `make test` runs this module with vLLM")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config  # noqa: E402
from vllm_models import NEW_TOKENS, prompts_of, reference_tokens, save_adapter, save_base, smollm2_tokenizer  # noqa: E402

ENGINE_SCRIPT = Path(__file__).with_name("vllm_engine.py")
# one adapter per intervention type; every position form; several layers; all three components
LLAMA_ADAPTERS = {
    "loreft_f2l2": dict(intervention="loreft", layers=[0, 2], positions="f2+l2", share_weights=False),
    "noreft_l3_mlp": dict(intervention="noreft", layers=[1, 3], positions="l3", component="mlp_output"),
    "nodireft_all_attn": dict(intervention="nodireft", layers=[1], positions="all", component="attention_output"),
    "consreft_f3": dict(intervention="consreft", layers="all", positions="f3"),
    "lobireft_f2l2_tied": dict(intervention="lobireft", layers=[2], positions="f2+l2"),
    "direft_f5l5": dict(intervention="direft", layers=[0, 3], positions="f5+l5", act_fn="relu"),
}
QWEN2_ADAPTERS = {
    "loreft_f2l2": dict(intervention="loreft", layers=[0, 1], positions="f2+l2", share_weights=False),
    "nodireft_all": dict(intervention="nodireft", layers=[1], positions="all"),
}
PROMPT_LENGTHS = (1, 3, 6, 11, 40, 70)  # 1 and 3: shorter than the windows
LONG = 100  # prefix caching: three full blocks of 32 before the last-3 window


def start_engine(tmp_path: Path, model: Path, engine: dict, batches: list, env: dict | None = None):
    """Run `tests/vllm_engine.py` (vLLM's default mode unless `engine` says otherwise; its compiler's backend is
    dynamo's eager one, `VLLM_CPU_CI_ENV=1`, unless `env` says otherwise); the finished process."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "engine": engine, "batches": batches}))
    return subprocess.run([sys.executable, str(ENGINE_SCRIPT), str(spec), str(tmp_path / "result.json")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def run_engine(tmp_path: Path, model: Path, engine: dict, batches: list, env: dict | None = None) -> dict:
    done = start_engine(tmp_path, model, engine, batches, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((tmp_path / "result.json").read_text())


def request(prompt, adapter=None):
    return {"prompt_token_ids": prompt, "adapter": adapter, "max_tokens": NEW_TOKENS}


def served(folder: Path, adapters: dict) -> dict:
    return {"reft_adapters": {name: str(folder / name) for name in adapters}}


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def test_llama_tokens_match_peft_generate_with_chunking_preemption_and_prefix_caching(tmp_path, tokenizer):
    base = save_base(tmp_path / "base", "llama", tokenizer)
    for name, config in LLAMA_ADAPTERS.items():
        save_adapter(base, tmp_path / name, **config)
    vocab = len(tokenizer)
    prompts = prompts_of(PROMPT_LENGTHS, seed=0, vocab=vocab)
    long_prompt = prompts_of([LONG], seed=1, vocab=vocab)[0]
    sources = [None, *LLAMA_ADAPTERS]
    expected = {s: reference_tokens(base, None if s is None else tmp_path / s, prompts + [long_prompt])
                for s in sources}
    for name in LLAMA_ADAPTERS:  # each adapter changes what the model says (else this test could not fail)
        assert expected[name] != expected[None], name

    prefix_order = [None, "noreft_l3_mlp", "loreft_f2l2", "loreft_f2l2", None, "nodireft_all_attn"]
    mixed = [request(p, s) for i, p in enumerate(prompts) for s in sources[i % 2:] + sources[:i % 2]]
    batches = [[request(long_prompt, s)] for s in prefix_order] + [
        mixed,
        [request(prompts[2], "no_such_adapter")],
        [request(prompts[3], None), request(prompts[3], "consreft_f3")],
        [dict(request(prompts[4], "direft_f5l5"), n=2)],  # n > 1: each completion is a request of its own
    ]
    engine = dict(
        max_model_len=160, block_size=32, enable_prefix_caching=True,
        max_num_batched_tokens=16, max_num_seqs=8, num_gpu_blocks_override=12,  # prefill in chunks of 16 tokens
        additional_config=served(tmp_path, LLAMA_ADAPTERS),
    )
    result = run_engine(tmp_path, base, engine, batches)
    outputs = result["batches"]

    # prefix caching: a ReFT request never reuses KV computed under other edits; base KV is reused where it is valid
    cached = [batch[0]["cached"] for batch in outputs[:6]]
    assert cached == [0, 96, 0, 96, 96, 0], cached
    for batch, source in zip(outputs[:6], prefix_order):
        assert batch[0]["tokens"] == expected[source][-1], source

    # one continuous batch of every adapter and base requests, prompts prefilled in chunks of 16 tokens
    got = {(i, s): out["tokens"] for (i, s), out in zip(
        [(i, s) for i in range(len(prompts)) for s in sources[i % 2:] + sources[:i % 2]], outputs[6])}
    mismatches = [(i, s) for (i, s), tokens in got.items() if tokens != expected[s][i]]
    assert not mismatches, mismatches

    # an unknown adapter fails its request, with the served names; the engine keeps serving
    assert "'no_such_adapter' is not served" in outputs[7]["error"]
    assert "loreft_f2l2" in outputs[7]["error"]
    assert [o["tokens"] for o in outputs[8]] == [expected[None][3], expected["consreft_f3"][3]]
    assert outputs[9][0]["all"] == [expected["direft_f5l5"][4]] * 2


def test_qwen2_tokens_match_peft_generate_under_preemption_compiled_by_inductor(tmp_path, tokenizer):
    base = save_base(tmp_path / "base", "qwen2", tokenizer, layers=2)
    for name, config in QWEN2_ADAPTERS.items():
        save_adapter(base, tmp_path / name, **config)
    prompts = prompts_of((1, 3, 22, 26, 30), seed=2, vocab=len(tokenizer))  # the longer ones grow past a block
    sources = [None, *QWEN2_ADAPTERS]
    expected = {s: reference_tokens(base, None if s is None else tmp_path / s, prompts) for s in sources}
    for name in QWEN2_ADAPTERS:
        assert expected[name] != expected[None], name
    # a KV cache of 5 blocks of 32 tokens (one is vLLM's null block) for 8 running requests: some are preempted and
    # their prompts recomputed
    engine = dict(max_model_len=128, block_size=32, max_num_batched_tokens=8, max_num_seqs=8,
                  num_gpu_blocks_override=5, additional_config=served(tmp_path, QWEN2_ADAPTERS))
    # vllm-cpu's default mode as users get it: dynamo and inductor, which compiles the edit operators' calls in
    result = run_engine(tmp_path, base, engine, [[request(p, s) for p in prompts for s in sources]],
                        env={"VLLM_CPU_CI_ENV": "0"})
    got = [out["tokens"] for out in result["batches"][0]]
    assert got == [expected[s][i] for i in range(len(prompts)) for s in sources]
    assert result["preemptions"] > 0


def test_tensor_parallel_engine_matches_peft_generate(tmp_path, tokenizer):
    """tensor_parallel_size=2 (two CPU worker processes over gloo, one core each): every rank edits the hidden states
    it holds (all of them, after each layer's all-reduce), so the tokens are `PeftModel.generate`'s for every
    intervention type, with prompts prefilled in chunks, preempted requests and prefix caching as on one rank."""
    base = save_base(tmp_path / "base", "llama", tokenizer)
    adapters = LLAMA_ADAPTERS  # every intervention type, position form and component
    for name, config in adapters.items():
        save_adapter(base, tmp_path / name, **config)
    # the longer ones grow past a block; seed 16: no greedy step of the 21 references is a near-tie (top-2 logit gap
    # >= 7.8e-3; tensor parallelism sums in another order, and seed 3's 5.5e-4 flipped once)
    prompts = prompts_of((3, 22, 30), seed=16, vocab=len(tokenizer))
    long_prompt = prompts_of([LONG], seed=1, vocab=len(tokenizer))[0]
    sources = [None, *adapters]
    expected = {s: reference_tokens(base, None if s is None else tmp_path / s, prompts + [long_prompt])
                for s in sources}
    prefix_order = [None, "noreft_l3_mlp", "loreft_f2l2", "loreft_f2l2"]
    for name in adapters:  # each adapter changes the greedy tokens of some prompt
        assert expected[name] != expected[None], name
    # a KV cache of 5 blocks of 32 tokens (one is vLLM's null block): the mixed batch preempts requests
    engine = dict(max_model_len=128, tensor_parallel_size=2, block_size=32, enable_prefix_caching=True,
                  max_num_batched_tokens=16, max_num_seqs=8, num_gpu_blocks_override=5,
                  additional_config=served(tmp_path, adapters))
    result = run_engine(tmp_path, base, engine, [[request(long_prompt, s)] for s in prefix_order] + [
        [request(p, s) for p in prompts for s in sources]], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    outputs = result["batches"]
    assert [batch[0]["cached"] for batch in outputs[:4]] == [0, 96, 0, 96]
    assert [batch[0]["tokens"] for batch in outputs[:4]] == [expected[s][-1] for s in prefix_order]
    got = [out["tokens"] for out in outputs[4]]
    assert got == [expected[s][i] for i in range(len(prompts)) for s in sources]
    assert result["preemptions"] > 0


# ---- the start-up check: an engine whose edits do not arrive does not start ----

def _breaking(tmp_path: Path, code: str) -> dict:
    """Environment variables that run `code` at the start of every process of the engine (a `sitecustomize`)."""
    folder = tmp_path / "breaking"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


# (`peft_reft_autoload`, the start-up hook's module, imports nothing: importing the package here would load torch
# in every process before vLLM sets its threads up, and slow the engine down)
UNBOUND_STEP = """
import contextlib
from peft_reft_autoload import after_import

after_import("peft_reft.vllm.edits", lambda edits: setattr(edits, "running_step",
                                                           lambda *args: contextlib.nullcontext()))
"""
FAILED_HOOK = """
from peft_reft_autoload import after_import

def break_the_plugin(plugin):
    def failing(module):
        raise AttributeError("type object 'GPUModelRunner' has no attribute '_model_forward'")
    plugin._after_import("vllm.v1.worker.gpu_model_runner", failing)

after_import("peft_reft.vllm.plugin", break_the_plugin)
"""


def test_an_engine_whose_edits_do_not_arrive_refuses_to_start(tmp_path, small_base):
    """Two engines broken two ways (edits not bound to the step; a hook that could not be installed), started side by
    side: each refuses to start, saying why."""
    adapter = save_adapter(small_base, tmp_path / "a", layers=[0])
    runs = {}
    for broken, code in [("unbound step", UNBOUND_STEP), ("failed hook", FAILED_HOOK)]:
        folder = tmp_path / broken.replace(" ", "_")
        folder.mkdir()
        spec = folder / "spec.json"
        # eager (no compilation to wait for): the check runs the same way in every mode
        spec.write_text(json.dumps({"model": str(small_base), "engine": dict(
            max_model_len=128, enforce_eager=True, additional_config={"reft_adapters": {"a": str(adapter)}}),
            "batches": [[request([5, 6, 7], "a")]]}))
        runs[broken] = (folder, subprocess.Popen(
            [sys.executable, str(ENGINE_SCRIPT), str(spec), str(folder / "result.json")], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, **_breaking(folder, code)}))
    logs = {}
    for broken, (folder, process) in runs.items():
        logs[broken] = process.communicate(timeout=600)[0]
        assert process.returncode != 0 and not (folder / "result.json").exists(), broken
    log = logs["unbound step"]
    assert "ReFT: this engine's start-up check failed: block_output edits did not arrive (largest change of a " \
           "log-probability at the edited tokens: 0); attention_output edits did not arrive (largest change of a " \
           "log-probability at the edited tokens: 0), for check adapters that edit the last 4 of 16 prompt " \
           "tokens at every layer" in log, log[-4000:]
    assert "(vLLM 0.32.0, V1 model runner, compilation NONE, CUDA graphs NONE)" in log
    log = logs["failed hook"]
    assert "ReFT: the vLLM integration could not hook into vLLM 0.32.0" in log, log[-4000:]
    assert "vllm.v1.worker.gpu_model_runner: AttributeError: type object 'GPUModelRunner' has no attribute " \
           "'_model_forward'" in log


# ---- refused when the engine's config is built: nothing starts ----

@pytest.fixture(scope="module")
def small_base(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("vllm_refusals")
    return save_base(folder / "base", "llama", tokenizer)


def engine_config(model: Path, adapters: dict, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    from peft_reft.vllm.plugin import register

    register()  # what vLLM does when it starts (entry point `vllm.general_plugins`)
    declared = {"reft_adapters": {k: str(v) for k, v in adapters.items()}} if adapters else {}
    args = EngineArgs(model=str(model), dtype="float32", max_model_len=128, additional_config=declared, **kwargs)
    return args.create_engine_config()


def test_adapter_of_another_base_model_is_refused_at_startup(tmp_path, small_base, tokenizer):
    wider = save_base(tmp_path / "wider", "llama", tokenizer, hidden=96)
    deeper = save_base(tmp_path / "deeper", "llama", tokenizer, layers=6)
    with pytest.raises(ValueError, match=r"ReFT adapter 'wide'.*hidden size \[96\].*hidden size is 64"):
        engine_config(small_base, {"wide": save_adapter(wider, tmp_path / "wide", layers=[0])}, enforce_eager=True)
    with pytest.raises(ValueError, match=r"ReFT adapter 'deep' edits layers \[5\].*has 4 layers"):
        engine_config(small_base, {"deep": save_adapter(deeper, tmp_path / "deep", layers=[5])}, enforce_eager=True)


def test_what_the_integration_cannot_serve_is_refused_at_startup(tmp_path, small_base, tokenizer):
    with_lora = save_adapter(small_base, tmp_path / "with_lora", layers=[0],
                             lora_config=LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"ReFT adapter 'combo' .* a LoRA part"):
        engine_config(small_base, {"combo": with_lora}, enforce_eager=True)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(small_base), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"ReFT adapter 'lora'.*not a ReFT adapter.*enable_lora"):
        engine_config(small_base, {"lora": tmp_path / "lora"}, enforce_eager=True)
    with pytest.raises(ValueError, match=r"ReFT adapter 'missing': .* holds no saved adapter"):
        engine_config(small_base, {"missing": tmp_path / "nowhere"}, enforce_eager=True)
    gpt2 = tmp_path / "gpt2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2,
                                                n_positions=128)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    with pytest.raises(ValueError, match=r"served model is \['GPT2LMHeadModel'\]"):
        engine_config(gpt2, {"a": save_adapter(gpt2, tmp_path / "gpt2_adapter", layers=[0])}, enforce_eager=True)
    adapter = save_adapter(small_base, tmp_path / "ok", layers=[0])
    with pytest.raises(ValueError, match=r"cannot be served with speculative decoding"):
        engine_config(small_base, {"ok": adapter}, enforce_eager=True,
                      speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})


def test_compiled_mode_is_kept_and_the_edits_split_cuda_graphs(tmp_path, small_base, monkeypatch):
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    from peft_reft.vllm.plugin import _keep_edits_out_of_cuda_graphs

    adapter = save_adapter(small_base, tmp_path / "ok", layers=[0])
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    plain = engine_config(small_base, {})
    config = engine_config(small_base, {"ok": adapter})
    assert not config.model_config.enforce_eager
    assert config.compilation_config.mode == plain.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE
    assert config.compilation_config.splitting_ops == [*plain.compilation_config.splitting_ops,
                                                       "peft_reft::edit_layer", "peft_reft::edit_attention"]
    # the runner is vLLM's choice (V1 here: V2 needs Triton), left alone
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ and not config.use_v2_model_runner
    # on a GPU: the edit operators run between the pieces of a piecewise CUDA graph, never inside a full one
    for mode, kept in [(CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.PIECEWISE),
                       (CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE),
                       (CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.NONE),
                       (CUDAGraphMode.PIECEWISE, CUDAGraphMode.PIECEWISE)]:
        compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode,
                                        splitting_ops=["vllm::unified_attention"])
        _keep_edits_out_of_cuda_graphs(compilation)
        assert compilation.cudagraph_mode == kept, mode
        assert compilation.splitting_ops == ["vllm::unified_attention", "peft_reft::edit_layer",
                                             "peft_reft::edit_attention"]


def test_unsupported_vllm_releases_and_modes_are_refused(tmp_path, small_base, monkeypatch):
    import vllm

    adapter = save_adapter(small_base, tmp_path / "ok", layers=[0])
    with pytest.raises(ValueError, match=r"cannot be served with pipeline parallelism"):
        engine_config(small_base, {"ok": adapter}, pipeline_parallel_size=2, distributed_executor_backend="mp")
    for version in ("0.31.2", "0.35.0"):
        monkeypatch.setattr(vllm, "__version__", version)
        with pytest.raises(ValueError, match=rf"cannot be served with vLLM {version} \(peft-reft supports "
                                             r">=0.32,<0.35\)"):
            engine_config(small_base, {"ok": adapter})


def test_a_hook_that_cannot_be_installed_refuses_reft_engines_only(tmp_path, small_base, monkeypatch):
    from peft_reft.vllm import plugin

    adapter = save_adapter(small_base, tmp_path / "ok", layers=[0])
    monkeypatch.setattr(plugin, "HOOK_FAILURES", [])
    plugin._after_import("json", lambda module: module.no_such_function)
    assert plugin.HOOK_FAILURES == ["json: AttributeError: module 'json' has no attribute 'no_such_function'"]
    with pytest.raises(RuntimeError, match=r"could not hook into vLLM 0.32.0, V1 model runner.*json: AttributeError"):
        engine_config(small_base, {"ok": adapter})
    assert engine_config(small_base, {}).additional_config == {}  # an engine without ReFT starts as before


def test_served_adapter_matches_peft_state(tmp_path, small_base):
    """The interventions a worker builds from the folder are the saved PeftModel's (same module, same weights)."""
    from peft_reft.vllm.adapters import load_interventions, read_adapter

    folder = save_adapter(small_base, tmp_path / "a", layers=[1, 3], positions="f2+l2", share_weights=False)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_base), folder)
    layers = load_interventions(read_adapter("a", str(folder)), 64, "cpu")
    hidden = torch.randn(5, 64)
    for index in (1, 3):
        saved = peft_model.base_model.model.model.layers[index].reft_interventions["default"]
        for group in (0, 1):
            torch.testing.assert_close(layers[index][group].edited(hidden), saved[group].edited(hidden))
    assert sorted(layers) == [1, 3]


def test_additional_config_must_map_names_to_folders(small_base):
    from vllm.engine.arg_utils import EngineArgs

    from peft_reft.vllm.plugin import register

    register()
    args = EngineArgs(model=str(small_base), dtype="float32", max_model_len=128, enforce_eager=True,
                      additional_config={"reft_adapters": ["emoji"]})
    with pytest.raises(ValueError, match=r"must map adapter names to adapter folders.*got \['emoji'\]"):
        args.create_engine_config()


def test_max_reft_adapters_bounds_the_declared_adapters_and_alone_makes_room(tmp_path, small_base):
    from vllm.engine.arg_utils import EngineArgs

    from peft_reft.vllm.plugin import register

    register()
    adapter = save_adapter(small_base, tmp_path / "a", layers=[0])

    def build(additional, enforce_eager=True):
        return EngineArgs(model=str(small_base), dtype="float32", max_model_len=128, enforce_eager=enforce_eager,
                          additional_config=additional).create_engine_config()

    with pytest.raises(ValueError, match=r"2 ReFT adapters are declared, more than the engine holds "
                                         r"\(max_reft_adapters=1\): raise it"):
        build({"reft_adapters": {"a": str(adapter), "b": str(adapter)}, "max_reft_adapters": 1})
    with pytest.raises(ValueError, match=r"'max_reft_adapters'\] must be a positive integer; got 0"):
        build({"max_reft_adapters": 0})
    # no adapter declared, room for 4 loaded at run time: the engine is built as one that serves ReFT
    config = build({"max_reft_adapters": 4}, enforce_eager=False)
    assert config.additional_config["max_reft_adapters"] == 4
    assert "peft_reft::edit_layer" in config.compilation_config.splitting_ops


def test_the_environment_imports_datasets_transformers_and_vllm_in_any_order():
    """`make install-vllm` leaves no torch add-on that cannot load: `datasets` imported first (a TRL script's order)
    builds a data set, then transformers and vLLM import."""
    code = ("from datasets import Dataset; import transformers; import vllm; "
            "print(Dataset.from_list([{'a': 'x'}, {'a': 'y'}]).num_rows)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "2", done.stderr[-3000:]
    assert "does not load with this torch" not in done.stderr  # nothing left for the start-up hook to hide
