"""What every example does first: choose the number of CPU threads, pick training defaults for the device it finds,
and keep library warnings that a user cannot act on out of the output.

- Threads: on a CPU that other programs keep busy, torch's default (one thread per core) makes the threads wait for
  each other; a training step on a loaded 2-core machine was 12x slower with 2 threads than with 1. Unless
  `OMP_NUM_THREADS` is set, the examples use the cores that the load average leaves free (at least one).
- Device: TRL's configs default to `bf16=True`, which stops a CPU-only machine with "Your setup doesn't support
  bf16/gpu"; on a CPU the examples train in float32 (`use_cpu=True, bf16=False`), on a GPU they keep TRL's defaults.
"""

from __future__ import annotations

import logging
import os
import warnings


def cpu_threads() -> tuple[int, str]:
    """The number of threads to use and why: `OMP_NUM_THREADS` if set, else the cores the load average leaves free."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, min(cores, round(cores - load)))
    return free, f"{cores} cores, load average {load:.1f}; set OMP_NUM_THREADS to choose"


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def quiet_library_warnings() -> None:
    """Silence deprecation warnings raised inside transformers/peft/TRL for arguments the examples never pass (TRL's
    configs set `gradient_checkpointing`, peft reads `is_gradient_checkpointing`), and bitsandbytes' note about an
    optional CPU kernel package."""
    deprecated = r"`(is_)?gradient_checkpointing\w*` is deprecated"
    warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def setup(verbose: bool = True) -> dict:
    """Configure threads and warnings; return the `TrainingArguments` defaults for this device (`use_cpu=True,
    bf16=False` without an accelerator, nothing with one)."""
    import torch

    quiet_library_warnings()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if has_accelerator():
        if verbose:
            print(f"Device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'xpu'}")
        return {}
    threads, why = cpu_threads()
    torch.set_num_threads(threads)
    if verbose:
        print(f"Device: CPU, {threads} thread{'s' if threads > 1 else ''} ({why})")
    return {"use_cpu": True, "bf16": False}
