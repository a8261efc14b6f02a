"""utils/check_copies.py: the shared blocks of the scripts equal their sources, and drift is caught and fixed."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "utils" / "check_copies.py"


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)


def test_repository_copies_match_their_sources():
    result = run()
    assert result.returncode == 0, result.stdout + result.stderr


def test_drift_is_reported_and_fixed(tmp_path):
    (tmp_path / "source.py").write_text("def save(unet):\n    return unet\n")
    drifted = "import os\n\n\n# Copied from source.save with unet->model\ndef save(model):\n    return None\n"
    (tmp_path / "copy.py").write_text(drifted)
    result = run("--root", str(tmp_path))
    assert result.returncode == 1
    assert "copy.py:5 save: differs from source.save" in result.stdout
    assert (tmp_path / "copy.py").read_text() == drifted  # checking alone changes nothing

    assert run("--root", str(tmp_path), "--fix").returncode == 0
    fixed = (tmp_path / "copy.py").read_text()
    assert fixed == "import os\n\n\n# Copied from source.save with unet->model\ndef save(model):\n    return model\n"
    assert run("--root", str(tmp_path)).returncode == 0


def test_missing_source_is_reported(tmp_path):
    (tmp_path / "copy.py").write_text("# Copied from source.gone\ndef gone():\n    pass\n")
    result = run("--root", str(tmp_path))
    assert result.returncode == 1
    assert "no file source.py" in result.stdout
