"""peft's own generic tuner tests (`PeftCommonTester` in `tests/testing_common.py` of peft's source distribution),
for the installed peft version; never copied here.

`make install` fetches them (`python tests/peft_upstream.py`): pip downloads peft's sdist, its sha256 is checked
against `SDIST_SHA256` below (the sdists the suite has run with), and the two harness files are unpacked as a small
package into `$PEFT_REFT_CACHE/peft-tests/` (default `~/.cache/peft-reft/peft-tests/`). `load()` imports the cached
copy (fetching it first if it is missing) and never raises: without a package index, it returns pip's own message,
which `tests/test_peft_common.py` reports as a failing test while the rest of the suite runs. The harness imports
`diffusers` for one isinstance check on Stable Diffusion pipelines; when diffusers is not installed, a stand-in class
is registered for it.
"""

from __future__ import annotations

import hashlib
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
from typing import Optional

HARNESS_FILES = ("testing_common.py", "testing_utils.py")
# sha256 of peft's sdist (peft-<version>.tar.gz on PyPI) per version in pyproject's range; a new peft release gets its
# line here when the suite has passed with it
SDIST_SHA256 = {
    "0.21.2": "b803ccfb3f3f316004d850284306687833a2235ea278fb56abc856203456142e",
}


class HarnessMissing(RuntimeError):
    """peft's harness could not be fetched or verified; the message says why and what to do."""


def _cache() -> Path:
    return Path(os.environ.get("PEFT_REFT_CACHE", Path.home() / ".cache" / "peft-reft")) / "peft-tests"


def _package_name(peft_version: str) -> str:
    return "peft_tests_" + "".join(c if c.isalnum() else "_" for c in peft_version)


def fetch(peft_version: str) -> Path:
    """The folder holding the cached harness package for `peft_version`, downloading and verifying it if needed."""
    package = _cache() / _package_name(peft_version)
    if all((package / name).exists() for name in HARNESS_FILES):
        return package
    expected = SDIST_SHA256.get(peft_version)
    if expected is None:
        raise HarnessMissing(
            f"No sha256 of peft {peft_version}'s sdist is recorded in tests/peft_upstream.py (SDIST_SHA256), so its "
            "test harness is not fetched. Install a peft version listed there, or add this one's sha256 after "
            "checking the sdist."
        )
    with tempfile.TemporaryDirectory() as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "--retries", "1",
             "--timeout", "15", f"peft=={peft_version}", "-d", tmp],
            capture_output=True, text=True,
        )
        if download.returncode != 0:
            raise HarnessMissing(
                f"pip could not download peft {peft_version}'s sdist, which holds peft's test harness (run "
                f"`make install` where the package index is reachable). pip said:\n{download.stderr.strip()}"
            )
        archive = next(Path(tmp).glob("peft-*.tar.gz"))
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != expected:
            raise HarnessMissing(
                f"peft {peft_version}'s sdist has sha256 {digest}, not the recorded {expected}: not used."
            )
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


def load() -> tuple[Optional[types.ModuleType], Optional[str]]:
    """(peft's `tests/testing_common.py` for the installed peft, None), or (None, why it is missing)."""
    try:
        package = fetch(version("peft"))
    except HarnessMissing as error:
        return None, str(error)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("diffusers")
        stand_in.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stand_in
    sys.path.insert(0, str(package.parent))
    return importlib.import_module(f"{package.name}.testing_common"), None


if __name__ == "__main__":  # `make install`: fetch the harness for the installed peft
    try:
        print(f"peft's test harness: {fetch(version('peft'))}")
    except HarnessMissing as error:
        print(f"peft's test harness is missing: {error}", file=sys.stderr)
        sys.exit(1)
