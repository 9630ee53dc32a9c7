"""Registration of the REFT tuner type with peft."""

import glob
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_reft
from peft_reft import ReftConfig, ReftModel
from peft_reft.registration import register

REGISTRATION_FILE = Path(peft_reft.__file__).with_name("registration.py")


def test_reft_is_a_real_enum_member():
    member = PeftType.REFT
    assert isinstance(member, PeftType) and member == "REFT"
    assert PeftType("REFT") is member and PeftType["REFT"] is member
    assert member in list(PeftType) and "REFT" in PeftType.__members__
    assert pickle.loads(pickle.dumps(member)) is member
    assert {member: 1}["REFT"] == 1
    assert str(member).partition(".")[-1] == "REFT"


def test_mappings_point_at_reft():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["REFT"] is ReftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["REFT"] is ReftModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["REFT"] == "reft_"


def test_register_is_idempotent():
    members = len(PeftType)
    register(ReftConfig, ReftModel)
    register(ReftConfig, ReftModel)
    assert len(PeftType) == members
    assert PEFT_TYPE_TO_CONFIG_MAPPING["REFT"] is ReftConfig


def test_a_foreign_reft_tuner_is_not_overridden(monkeypatch):
    class ForeignConfig:  # stands for a future peft's own ReftConfig
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.REFT, ForeignConfig)
    with pytest.raises(RuntimeError, match=r"peft already has a tuner registered as PeftType.REFT .*ForeignConfig"):
        register(ReftConfig, ReftModel)


ENUM_SCRIPT = r"""
import enum, importlib.util, pickle, copy, json, sys
spec = importlib.util.spec_from_file_location("registration", sys.argv[1])
registration = importlib.util.module_from_spec(spec); spec.loader.exec_module(registration)
class Kind(str, enum.Enum):
    A = "A"
    B = "B"
member = registration._add_enum_member(Kind, "REFT")
assert Kind.REFT is member and Kind("REFT") is member and Kind["REFT"] is member
assert isinstance(member, Kind) and member == "REFT" and hash(member) == hash("REFT")
assert list(Kind)[-1] is member and len(Kind) == 3 and "REFT" in Kind.__members__
assert pickle.loads(pickle.dumps(member)) is member and copy.deepcopy(member) is member
assert json.dumps(member) == '"REFT"' and {member: 1}["REFT"] == 1
print("ok", sys.version_info[:2])
"""


def _interpreter(python: str):
    """`python` (e.g. "python3.10"): this interpreter, one on PATH, or one that pyenv installed."""
    if python == f"python{sys.version_info[0]}.{sys.version_info[1]}":
        return sys.executable
    installed = sorted(glob.glob(str(Path.home() / f".pyenv/versions/{python[6:]}.*/bin/{python}")))
    if installed:
        return installed[-1]
    on_path = shutil.which(python)
    return on_path if on_path and "/shims/" not in on_path else None  # a pyenv shim runs only the selected version


SUPPORTED_PYTHONS = ["python3.10", "python3.11", "python3.12", "python3.13"]


@pytest.mark.parametrize("python", SUPPORTED_PYTHONS)
def test_enum_extension_works_on_supported_pythons(python):
    # the enum internals differ between 3.10-3.11, 3.12 and 3.13 (requires-python allows 3.10); the check needs only
    # the stdlib, so it runs on each interpreter side by side. The running interpreter is always checked; another one
    # is checked where it is installed, and must be where PEFT_REFT_REQUIRE_ALL_PYTHONS=1 (.ci/run: CI's machine has
    # them all, from pyenv), so that the check never silently stops happening in CI
    executable = _interpreter(python)
    if executable is None:
        message = (
            f"{python} is not installed here, and registration must be checked on it (requires-python includes it): "
            f"install it (e.g. `pyenv install {python[6:]}` or your distribution's package) so that it is on PATH or "
            "under ~/.pyenv/versions."
        )
        assert os.environ.get("PEFT_REFT_REQUIRE_ALL_PYTHONS") != "1", message
        pytest.skip(message)
    result = subprocess.run([executable, "-c", ENUM_SCRIPT, str(REGISTRATION_FILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok ({python[6]}, {python[8:]})")

