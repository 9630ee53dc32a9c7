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
first (see `peft_reft.lm_eval`). Nothing here reads files or runs code from them: it imports installed modules only.
This file uses the standard library only, since it runs in every interpreter of the environment.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings
from typing import Callable

_CALLBACKS: dict[str, list[Callable]] = {}
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


def _call(name: str, callback: Callable, module) -> None:
    try:
        callback(module)
    except Exception as exc:  # an import of peft or lm-eval must not fail because of peft-reft
        warnings.warn(f"peft-reft: the hook run after importing {name!r} failed: {exc!r}", stacklevel=3)


class _RunCallbacksLoader(importlib.abc.Loader):
    """The module's own loader, then the callbacks registered for it."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # the module keeps its real loader
        self._loader.exec_module(module)
        with _LOCK:
            callbacks = _CALLBACKS.pop(self._name, [])
        for callback in callbacks:
            _call(self._name, callback, module)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module, asks the finders after it and wraps the loader they return."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _CALLBACKS:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RunCallbacksLoader(spec.loader, fullname)
                return spec
        return None


def _register_tuner(_peft_module) -> None:
    import peft_reft  # noqa: F401  (importing it registers the REFT tuner type with peft)


def install() -> None:
    """The start-up hook (`peft_reft_autoload.pth`): import peft_reft as soon as peft is imported."""
    after_import("peft", _register_tuner)
