"""The package as a user installs it: a wheel in a fresh virtualenv, away from the source tree.

`controlplane demo` must work from an installed wheel (its deployment ships as package
data), and the installed package must not reach back into a source checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(900)]


def run(cmd: list[str], cwd: Path, timeout_s: float, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False, env=env
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


def test_demo_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    # Built from the files git tracks, in a copy: no build/ left over from an earlier build
    # and nothing untracked can make the wheel look complete.
    source = tmp_path / "source"
    source.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)], tmp_path, 300
    )
    (wheel,) = dist.glob("controlplane-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], tmp_path, 600)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # No PYTHONPATH, no source tree: the wheel alone.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = run([str(python), "-c", "import controlplane; print(controlplane.__file__)"], elsewhere, 60, env)
    assert str(env_dir) in where and str(ROOT) not in where
    out = run([str(env_dir / "bin" / "controlplane"), "demo", "--random-ports"], elsewhere, 300, env)
    assert "demo finished" in out
