"""The README's Python snippets run as written (on the real SmolLM2-135M-Instruct and all-MiniLM-L6-v2, offline)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def _run_block(marker, tmp_path):
    """Run the first Python block of the README that contains `marker`."""
    block = next(b for b in _python_blocks((ROOT / "README.md").read_text()) if marker in b)
    script = tmp_path / "snippet.py"
    script.write_text(block)
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the snippet runs from the repository root
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path):
    assert "trainable params: 18,448" in _run_block("load_smollm2", tmp_path)
    assert (tmp_path / "reft-adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_readme_classification_snippet_runs(tmp_path):
    out = _run_block('task_type="SEQ_CLS"', tmp_path)
    assert "trainable params: 19,226" in out
    accuracy = float(re.search(r"^accuracy ([0-9.]+)$", out, flags=re.M).group(1))
    assert accuracy >= 0.95, out[-2000:]
