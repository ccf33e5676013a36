"""Every ```python block in README.md runs as written, from any folder: a scratch folder,
and the checkout's root (where the source package shadows the installed one)."""
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("where", ["scratch", "checkout"])
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, where, tmp_path):
    cwd = tmp_path if where == "scratch" else README.parent
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{result.stderr}"
