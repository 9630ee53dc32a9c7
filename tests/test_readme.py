"""The README quickstart runs as written (on the real SmolLM2-135M-Instruct, offline)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path):
    quickstart = _python_blocks((ROOT / "README.md").read_text())[0]
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart)
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the snippet runs from the repository root
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable params: 18,448" in result.stdout
    assert (tmp_path / "reft-adapter" / "adapter_model.safetensors").exists()
