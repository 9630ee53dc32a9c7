"""peft's own generic tuner tests (`PeftCommonTester` in `tests/testing_common.py` of peft's source distribution),
for the installed peft version, fetched from the package index at test time and cached; never copied here.

`testing_common()` returns the module. The first call downloads peft's sdist with pip (a few seconds) into
`$PEFT_REFT_CACHE/peft-tests/` (default `~/.cache/peft-reft/peft-tests/`) and unpacks its two harness files as a small
package; later calls import the cached copy. The harness imports `diffusers` for one isinstance check on Stable
Diffusion pipelines; when diffusers is not installed, a stand-in class is registered for it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from importlib.metadata import version
from pathlib import Path

HARNESS_FILES = ("testing_common.py", "testing_utils.py")


def _cache() -> Path:
    return Path(os.environ.get("PEFT_REFT_CACHE", Path.home() / ".cache" / "peft-reft")) / "peft-tests"


def _package_name(peft_version: str) -> str:
    return "peft_tests_" + "".join(c if c.isalnum() else "_" for c in peft_version)


def fetch(peft_version: str) -> Path:
    """The folder holding the cached harness package for `peft_version`, downloading it if needed."""
    package = _cache() / _package_name(peft_version)
    if all((package / name).exists() for name in HARNESS_FILES):
        return package
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"peft=={peft_version}", "-d", tmp],
            check=True, capture_output=True, text=True,
        )
        archive = next(Path(tmp).glob("peft-*.tar.gz"))
        staging = Path(tmp) / "package"
        staging.mkdir()
        with tarfile.open(archive) as sdist:
            for name in HARNESS_FILES:
                member = sdist.getmember(f"peft-{peft_version}/tests/{name}")
                (staging / name).write_bytes(sdist.extractfile(member).read())
        (staging / "__init__.py").write_text(f'"""peft {peft_version}: tests/{{{", ".join(HARNESS_FILES)}}}."""\n')
        package.parent.mkdir(parents=True, exist_ok=True)
        if not package.exists():  # another process may have fetched it meanwhile
            shutil.move(staging, package)  # /tmp and the cache may be on different file systems
    return package


def testing_common() -> types.ModuleType:
    """peft's `tests/testing_common.py` for the installed peft."""
    package = fetch(version("peft"))
    try:
        import diffusers  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("diffusers")
        stand_in.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stand_in
    sys.path.insert(0, str(package.parent))
    return importlib.import_module(f"{package.name}.testing_common")
