"""Speed and memory of ReFT against the frozen-model floor and LoRA. One command, three outputs:

    python benchmarks/run.py                   # full run: SmolLM2-135M-Instruct + a tiny config model
    python benchmarks/run.py --quick           # tiny model only, fewer pairs (a smoke run)

writes `benchmarks/results/results.json`, `results.md` and `results.png`. Every speed figure is a ratio against a
baseline timed in the same process, the two sides alternated (A B A B ...), the median of >= 10 pairs after warm-up,
with the spread (interquartile range of the per-pair ratios). Works on CPU and, unchanged, on a CUDA GPU (bf16 there).
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from peft import LoraConfig, get_peft_model  # noqa: E402

import peft_reft  # noqa: E402
from peft_reft import ReftConfig  # noqa: E402

BATCH, SEQ, PROMPT = 4, 128, 64


# ------------------------------------------------------------------------------------------------------ timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def paired(baseline, candidate, device, pairs: int, warmup: int = 2) -> dict:
    """Alternate baseline/candidate; the median of the per-pair ratios candidate/baseline and its spread."""
    for _ in range(warmup):
        baseline()
        candidate()
    base_times, cand_times = [], []
    for _ in range(pairs):
        base_times.append(timed(baseline, device))
        cand_times.append(timed(candidate, device))
    ratios = sorted(c / b for b, c in zip(base_times, cand_times))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0], 0, ratios[-1]]
    return {
        "ratio": statistics.median(ratios), "ratio_q1": quartiles[0], "ratio_q3": quartiles[2],
        "baseline_s": statistics.median(base_times), "candidate_s": statistics.median(cand_times), "pairs": pairs,
    }


# ------------------------------------------------------------------------------------------------------ models
def load_model(name: str, device, dtype):
    if name == "smollm2":
        from smollm2 import load_smollm2

        model = load_smollm2()[0]
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, initializer_range=0.02,
        ))
    return model.to(device=device, dtype=dtype)


def training_batch(vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


class FloorProbe(nn.Module):
    """The floor: a zero trainable vector added to the output of one decoder layer, so that a step does the work
    every ReFT implementation must do (forward, and backward down to that layer) and nothing else."""

    def __init__(self, model, layer_index: int):
        super().__init__()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.vector = nn.Parameter(torch.zeros(model.config.hidden_size, device=model.device, dtype=torch.float32))
        layer = model.model.layers[layer_index]
        layer.register_forward_hook(lambda m, a, out: out + self.vector.to(out.dtype))

    def forward(self, **batch):
        return self.model(**batch)


def train_step(model, batch, optimizer, device, autocast_dtype):
    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


REFT_CONFIGS = {
    "a": lambda n: ReftConfig(layers=[n // 2], low_rank_dimension=4, positions="l1", init_weights=False),
    "b": lambda n: ReftConfig(layers="all", low_rank_dimension=8, positions="f7+l7", share_weights=True,
                              init_weights=False),
    "b, mlp_output": lambda n: ReftConfig(layers="all", low_rank_dimension=8, positions="f7+l7", share_weights=True,
                                          init_weights=False, component="mlp_output"),
    "b, attention_output": lambda n: ReftConfig(layers="all", low_rank_dimension=8, positions="f7+l7",
                                                share_weights=True, init_weights=False,
                                                component="attention_output"),
}


def build(kind: str, base, n_layers: int):
    model = copy.deepcopy(base)
    if kind == "lora":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if kind.startswith("floor"):
        earliest = n_layers // 2 if kind == "floor-a" else 0
        return FloorProbe(model, earliest)
    return get_peft_model(model, REFT_CONFIGS[kind](n_layers))


# ------------------------------------------------------------------------------------------------------ workloads
def bench_training(model_name, device, dtype, pairs) -> list[dict]:
    base = load_model(model_name, device, dtype)
    n_layers = base.config.num_hidden_layers
    batch = training_batch(base.config.vocab_size, device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    models = {k: build(k, base, n_layers) for k in ("floor-a", "floor-b", "a", "b", "lora")}
    steps = {k: train_step(m, batch, optimizer_for(m), device, autocast) for k, m in models.items()}
    rows = []
    for candidate, baseline, target in (("a", "floor-a", 1.05), ("b", "floor-b", 1.02), ("a", "lora", 0.60),
                                        ("b", "lora", 0.85)):
        result = paired(steps[baseline], steps[candidate], device, pairs)
        rows.append({"workload": "train step", "model": model_name, "candidate": f"ReFT ({candidate})",
                     "baseline": baseline, "target": target, **result})
        print(f"  train {model_name}: ReFT ({candidate}) / {baseline} = {result['ratio']:.3f}", flush=True)
    return rows


def bench_components(model_name, device, dtype, pairs) -> list[dict]:
    """Editing the attention / MLP output instead of the block output, with gradient checkpointing on both sides
    (the case where the edit inside the layer is recomputed during backward)."""
    base = load_model(model_name, device, dtype)
    n_layers = base.config.num_hidden_layers
    batch = training_batch(base.config.vocab_size, device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    steps = {}
    for kind in ("b", "b, mlp_output", "b, attention_output"):
        model = build(kind, base, n_layers)
        model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        steps[kind] = train_step(model, batch, optimizer_for(model), device, autocast)
    rows = []
    for candidate in ("b, mlp_output", "b, attention_output"):
        result = paired(steps["b"], steps[candidate], device, pairs)
        rows.append({"workload": "train step, checkpointing", "model": model_name, "candidate": f"ReFT ({candidate})",
                     "baseline": "ReFT (b)", "target": 1.02 if "mlp" in candidate else 1.05, **result})
        print(f"  components {model_name}: ReFT ({candidate}) / ReFT (b) = {result['ratio']:.3f}", flush=True)
    return rows


def loreft_pyreft_style(d, r):
    """LoReFT as pyreft builds it: torch's orthogonal parametrization (Householder, trivialization) on a d x r
    weight, re-evaluated at every `.weight` access (twice per forward)."""
    rotate = nn.Linear(r, d, bias=False)  # weight [d, r] = R^T
    rotate = torch.nn.utils.parametrizations.orthogonal(rotate)
    source = nn.Linear(d, r)

    def forward(h):
        rotated = h @ rotate.weight
        return h + (source(h) - rotated) @ rotate.weight.T

    return forward, list(rotate.parameters()) + list(source.parameters())


def bench_intervention(widths, pairs) -> list[dict]:
    """The intervention alone (16 examples x 14 positions, r = 8), forward + backward on one thread, against one
    decoder layer forward + backward on the same 16 examples x 128 tokens (the floor per intervened layer)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for d in widths:
            torch.manual_seed(0)
            ours = peft_reft.LoReFT(d, 8, init_weights=False)
            h = torch.randn(16, 14, d, requires_grad=True)

            def run_ours():
                ours.edited(h).sum().backward()

            config = LlamaConfig(hidden_size=d, intermediate_size=int(d * 8 / 3) // 64 * 64,
                                 num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 64),
                                 num_hidden_layers=1)
            layer = LlamaDecoderLayer(config, 0)
            x = torch.randn(16, 128, d, requires_grad=True)
            rope = LlamaRotaryEmbedding(config)(x, torch.arange(128)[None])

            def run_layer():
                layer(x, position_embeddings=rope, attention_mask=None).sum().backward()

            n = pairs if d < 4096 else max(3, pairs // 3)
            result = paired(run_layer, run_ours, torch.device("cpu"), n, warmup=1)
            row = {"workload": "intervention alone", "width": d, "intervention_ms": 1000 * result["candidate_s"],
                   "share_of_layer_step": result["ratio"], "layer_step_ms": 1000 * result["baseline_s"],
                   "target_ms": 20 if d == 4096 else None, "pairs": n}
            pyreft_forward, _ = loreft_pyreft_style(d, 8)
            row["pyreft_style_ms"] = 1000 * statistics.median(
                timed(lambda: pyreft_forward(h).sum().backward(), torch.device("cpu")) for _ in range(3)
            )
            rows.append(row)
            print(f"  intervention d={d}: {row['intervention_ms']:.2f} ms "
                  f"(pyreft-style {row['pyreft_style_ms']:.0f} ms)", flush=True)
    finally:
        torch.set_num_threads(threads)
    return rows


def bench_generation(model_name, device, dtype, pairs) -> list[dict]:
    base = load_model(model_name, device, dtype)
    # both sides frozen, as for inference (an adapter loaded with PeftModel.from_pretrained is frozen)
    reft = get_peft_model(copy.deepcopy(base), REFT_CONFIGS["b"](base.config.num_hidden_layers)).eval()
    reft.requires_grad_(False)
    # frozen like the PEFT model's base: with a trainable lm_head torch folds the last-token matmul into one mm, with
    # a frozen one it runs a slower bmm, which would be charged to ReFT otherwise
    base.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    prompts = {"input_ids": torch.randint(10, base.config.vocab_size, (8, PROMPT), generator=g).to(device)}
    prompts["attention_mask"] = torch.ones_like(prompts["input_ids"])

    def gen(model, new):
        def run():
            with torch.no_grad():
                model.generate(**prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return run

    prefill = paired(gen(base, 1), gen(reft, 1), device, pairs)
    full = paired(gen(base, 65), gen(reft, 65), device, pairs)
    decode_base = full["baseline_s"] - prefill["baseline_s"]
    decode_reft = full["candidate_s"] - prefill["candidate_s"]
    rows = [
        {"workload": "generation prefill", "model": model_name, "candidate": "ReFT (b)", "baseline": "bare model",
         "target": 1.02, **prefill},
        {"workload": "generation decode tokens/s", "model": model_name, "candidate": "ReFT (b)",
         "baseline": "bare model", "target": 0.99, "ratio": decode_base / decode_reft,
         "baseline_tokens_per_s": 8 * 64 / decode_base, "candidate_tokens_per_s": 8 * 64 / decode_reft,
         "full_generation_ratio": full["ratio"], "ratio_q1": None, "ratio_q3": None, "pairs": pairs},
    ]
    print(f"  generation {model_name}: prefill {prefill['ratio']:.3f}, decode tokens/s {rows[1]['ratio']:.3f}",
          flush=True)
    return rows


def bench_compiled(model_name, device, dtype, pairs) -> list[dict]:
    """torch.compile (inductor; `mode="reduce-overhead"` on CUDA) on both sides: the ReFT (b) train step against the
    compiled floor-b step, and a prefill forward pass (8 prompts of 64 tokens, no gradient) against the compiled bare
    model's."""
    base = load_model(model_name, device, dtype)
    n_layers = base.config.num_hidden_layers
    batch = training_batch(base.config.vocab_size, device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    mode = "reduce-overhead" if device.type == "cuda" else None
    steps = {}
    for kind in ("floor-b", "b"):
        model = build(kind, base, n_layers).train()
        steps[kind] = train_step(torch.compile(model, mode=mode), batch, optimizer_for(model), device, autocast)
    train = paired(steps["floor-b"], steps["b"], device, pairs)
    reft = get_peft_model(copy.deepcopy(base), REFT_CONFIGS["b"](n_layers)).eval().requires_grad_(False)
    bare = copy.deepcopy(base).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    prompts = {"input_ids": torch.randint(10, base.config.vocab_size, (8, PROMPT), generator=g).to(device)}
    prompts["attention_mask"] = torch.ones_like(prompts["input_ids"])

    def prefill(model):
        compiled = torch.compile(model, mode=mode)

        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                compiled(**prompts, use_cache=False)
        return run

    forward = paired(prefill(bare), prefill(reft), device, pairs)
    print(f"  compiled {model_name}: train step {train['ratio']:.3f}, prefill {forward['ratio']:.3f}", flush=True)
    return [
        {"workload": "compiled train step", "model": model_name, "candidate": "ReFT (b)", "baseline": "floor-b",
         "target": 1.03, **train},
        {"workload": "compiled prefill", "model": model_name, "candidate": "ReFT (b)", "baseline": "bare model",
         "target": 1.03, **forward},
    ]


PACKED_LENGTHS = (16, 48, 128, 32, 96, 24, 64, 112)  # one SFT batch of mixed lengths, each half prompt


def bench_packing(model_name, device, dtype, pairs) -> list[dict]:
    """A ReFT (b) train step on 8 examples of mixed lengths, as TRL's padding-free collator lays them out (one row,
    `position_ids` restarting per example, no attention mask) against the same examples right-padded."""
    base = load_model(model_name, device, dtype)
    g = torch.Generator().manual_seed(2)
    examples = [torch.randint(10, base.config.vocab_size, (n,), generator=g) for n in PACKED_LENGTHS]
    labels = [torch.where(torch.arange(n) < n // 2, -100, ids) for n, ids in zip(PACKED_LENGTHS, examples)]
    longest = max(PACKED_LENGTHS)
    padded = {
        "input_ids": torch.stack([nn.functional.pad(ids, (0, longest - len(ids))) for ids in examples]),
        "attention_mask": torch.stack([(torch.arange(longest) < len(ids)).long() for ids in examples]),
        "labels": torch.stack([nn.functional.pad(lab, (0, longest - len(lab)), value=-100) for lab in labels]),
    }
    packed = {"input_ids": torch.cat(examples)[None], "labels": torch.cat(labels)[None],
              "position_ids": torch.cat([torch.arange(n) for n in PACKED_LENGTHS])[None]}
    autocast = torch.bfloat16 if device.type == "cuda" else None
    steps = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        model = build("b", base, base.config.num_hidden_layers).train()
        batch = {k: v.to(device) for k, v in batch.items()}
        steps[name] = train_step(model, batch, optimizer_for(model), device, autocast)
    result = paired(steps["padded"], steps["packed"], device, pairs)
    print(f"  packing {model_name}: padding-free / padded = {result['ratio']:.3f}", flush=True)
    return [{"workload": "SFT step, mixed lengths", "model": model_name, "candidate": "ReFT (b) padding-free",
             "baseline": "ReFT (b) padded", "target": 1.0, **result}]


def peak_memory_child(model_name: str, kind: str, device_name: str) -> float:
    """Run in a fresh process: peak memory (MiB) of two training steps above the loaded model (CUDA: allocated
    memory; CPU: the process's peak resident set, reset before the steps)."""
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_model(model_name, device, dtype)
    model = build(kind, base, base.config.num_hidden_layers)
    batch = training_batch(base.config.vocab_size, device)
    del base
    step = train_step(model, batch, optimizer_for(model), device, torch.bfloat16 if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    before = _status_kib("VmHWM")
    step()
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_memory(model_name, device) -> list[dict]:
    peaks = {}
    for kind in ("floor-b", "a", "b", "lora"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", model_name, kind, str(device)],
                             capture_output=True, text=True, check=True)
        peaks[kind] = float(out.stdout.strip().splitlines()[-1])
    rows = []
    for candidate in ("a", "b"):
        for baseline, target in (("floor-b", 1.0 if candidate == "b" else None), ("lora", 1.0)):
            rows.append({"workload": "peak memory (train step)", "model": model_name,
                         "candidate": f"ReFT ({candidate})", "baseline": baseline, "target": target,
                         "ratio": peaks[candidate] / peaks[baseline], "candidate_mib": peaks[candidate],
                         "baseline_mib": peaks[baseline]})
    print(f"  memory {model_name}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()), flush=True)
    return rows


def profile_host_syncs(device) -> dict:
    """Device-to-host scalar reads (aten::_local_scalar_dense) and aten::nonzero calls in one forward + backward,
    ReFT (b) against the floor: the difference is what ReFT adds."""
    from torch.profiler import ProfilerActivity, profile

    base = load_model("tiny", device, torch.float32)
    batch = training_batch(base.config.vocab_size, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    counts = {}
    for kind in ("floor-b", "b"):
        model = build(kind, base, base.config.num_hidden_layers)
        model(**batch).loss.backward()
        with profile(activities=activities) as prof:
            model(**batch).loss.backward()
        events = {e.key: e.count for e in prof.key_averages()}
        counts[kind] = {op: events.get(f"aten::{op}", 0) for op in ("_local_scalar_dense", "nonzero", "item")}
    return {"workload": "profile", "device": str(device), "floor": counts["floor-b"], "reft": counts["b"]}


# ------------------------------------------------------------------------------------------------------ report
def fmt(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}"


def write_reports(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"Date {results['date']}, {results['machine']}, device {results['device']}, "
             f"torch {results['versions']['torch']}, transformers {results['versions']['transformers']}, "
             f"peft {results['versions']['peft']}.", "",
             "| workload | model | candidate / baseline | ratio (median) | IQR | target | met |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        if row["workload"] in ("intervention alone", "profile"):
            continue
        target = row.get("target")
        met = "" if target is None else ("yes" if row["ratio"] <= target or (
            "tokens/s" in row["workload"] and row["ratio"] >= target) else "no")
        if "tokens/s" in row["workload"]:
            met = "yes" if row["ratio"] >= target else "no"
            target_text = f">= {target}"
        else:
            target_text = "" if target is None else f"<= {target}"
        spread = f"{fmt(row.get('ratio_q1'))}-{fmt(row.get('ratio_q3'))}" if row.get("ratio_q1") else ""
        lines.append(f"| {row['workload']} | {row['model']} | {row['candidate']} / {row['baseline']} | "
                     f"{fmt(row['ratio'])} | {spread} | {target_text} | {met} |")
    lines += ["", "| intervention alone (16 x 14 positions, r 8, fwd+bwd, 1 thread) | ms | share of one decoder-layer "
              "step (16 x 128 tokens) | pyreft-style ms | target |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        if row["workload"] == "intervention alone":
            lines.append(f"| width {row['width']} | {fmt(row['intervention_ms'], 2)} | "
                         f"{fmt(100 * row['share_of_layer_step'], 2)}% | {fmt(row['pyreft_style_ms'], 0)} | "
                         f"{'<= 20 ms' if row['target_ms'] else ''} |")
    for row in results["rows"]:
        if row["workload"] == "profile":
            extra = row["reft"]["_local_scalar_dense"] - row["floor"]["_local_scalar_dense"]
            lines += ["", f"Profiler, one forward + backward on {row['device']}: ReFT (b) makes {extra} more scalar "
                      f"device-to-host reads (aten::_local_scalar_dense) than the floor "
                      f"({row['reft']['_local_scalar_dense']} vs {row['floor']['_local_scalar_dense']}) and "
                      f"{row['reft']['nonzero'] - row['floor']['nonzero']} more aten::nonzero."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "results.png")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results["rows"] if r["workload"] not in ("intervention alone", "profile")]
    labels = [f"{r['workload']}\n{r['model']}: {r['candidate']} / {r['baseline']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1))
    ax.barh(range(len(rows)), [r["ratio"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        if r.get("target"):
            ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="tab:red")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (red: target)")
    ax.set_title(f"peft-reft benchmarks, {results['device']}, {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PER_MODEL = {"training": bench_training, "components": bench_components, "generation": bench_generation,
             "packing": bench_packing, "compiled": bench_compiled}
SECTIONS = (*PER_MODEL, "memory", "intervention", "profile")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, 4 pairs")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--skip-compiled", action="store_true",
                        help="leave out the torch.compile rows (inductor compiles for minutes on CPU)")
    parser.add_argument("--only", default=None, help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "KIND", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(peak_memory_child(*args.memory_child))
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pairs = 4 if args.quick else args.pairs
    models = ["tiny"] if args.quick else ["tiny", "smollm2"]
    sections = set(SECTIONS) if args.only is None else set(args.only.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.skip_compiled:
        sections.discard("compiled")
    rows = []
    for model_name in models:
        for section, bench in PER_MODEL.items():
            if section in sections:
                rows += bench(model_name, device, dtype, pairs)
        if "memory" in sections:
            rows += bench_memory(model_name, device)
    if "intervention" in sections:
        rows += bench_intervention([576] if args.quick else [576, 2048, 4096], pairs)
    if "profile" in sections:
        rows.append(profile_host_syncs(device))
    import peft
    import transformers

    results = {
        "date": str(date.today()), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "peft_reft": peft_reft.__version__},
        "batch": f"{BATCH} x {SEQ} tokens (prompt {PROMPT})", "rows": rows,
    }
    write_reports(results, Path(args.out))
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
