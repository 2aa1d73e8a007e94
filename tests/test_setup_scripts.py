"""tools/_venv.sh (sourced by quickstart.sh and test.sh): which torch it installs, from where.

The environment's ``python`` and ``pip`` are stubs: ``python`` imports a fake torch when one is
"installed", ``pip`` records its arguments and answers as the case says (a local wheel found or
not, an index reachable or not). The script itself runs for real in bash."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

PYTHON_STUB = """#!/bin/sh
# torch is importable iff $STUB/torch_version exists (its content is torch.__version__)
[ -f "$STUB/torch_version" ] || exit 1
exec {real} -S -c "import sys, types
sys.modules['torch'] = types.SimpleNamespace(__version__=open('$STUB/torch_version').read().strip())
exec(sys.argv[1])" "$2"
"""

PIP_STUB = """#!/bin/sh
echo "$*" >> "$STUB/pip.log"
case "$*" in
  "config list") cat "$STUB/pip_config" 2>/dev/null; exit 0 ;;
  *--no-index*) [ -f "$STUB/local_wheel" ] || exit 1 ;;
  *"--index-url {cpu}"*) [ -f "$STUB/cpu_index_down" ] && exit 1 ;;
esac
echo 2.13.0+cpu > "$STUB/torch_version"
"""


@pytest.fixture
def stub(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("python", PYTHON_STUB.format(real=shlex.quote(sys.executable))),
                       ("pip", PIP_STUB.format(cpu=CPU_INDEX))):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    return tmp_path


def run(stub: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TORCH_SPEC", "PIP_INDEX_URL", "VENV")}
    result = subprocess.run(["bash", "-c", "set -euo pipefail; . tools/_venv.sh"], cwd=ROOT,
                            env={**clean, "VENV": str(stub / "venv"), "STUB": str(stub), **env},
                            capture_output=True, text=True, timeout=60)
    log = stub / "pip.log"
    return result, log.read_text().splitlines() if log.exists() else []


def test_an_environment_with_torch_keeps_it(stub):
    (stub / "torch_version").write_text("2.7.1+cu128")
    result, calls = run(stub)
    assert result.returncode == 0, result.stderr
    assert calls == [] and "keeping the torch 2.7.1+cu128" in result.stdout


def test_a_torch_too_old_is_refused_not_replaced(stub):
    (stub / "torch_version").write_text("2.1.0")
    result, calls = run(stub)
    assert result.returncode == 1 and "needs torch >= 2.4" in result.stderr
    assert calls == []


def test_a_local_wheel_is_used_without_the_cpu_index(stub):
    (stub / "local_wheel").touch()
    result, calls = run(stub)
    assert result.returncode == 0, result.stderr
    assert calls == ["config list", "install -q --no-index --no-deps torch==2.13.0",
                     "install -q torch==2.13.0"]


def test_otherwise_the_cpu_build_comes_from_pytorchs_cpu_index(stub):
    result, calls = run(stub)
    assert result.returncode == 0, result.stderr
    assert calls[-1] == f"install -q torch==2.13.0 --index-url {CPU_INDEX}"
    assert "CPU-only build" in result.stdout


def test_an_unreachable_cpu_index_says_what_to_set(stub):
    (stub / "cpu_index_down").touch()
    result, _ = run(stub)
    assert result.returncode == 1
    assert "PIP_INDEX_URL" in result.stderr and "TORCH_SPEC" in result.stderr


@pytest.mark.parametrize("env, pip_config, expected", [
    ({"TORCH_SPEC": "torch --index-url https://download.pytorch.org/whl/cu128"}, "",
     "install -q torch --index-url https://download.pytorch.org/whl/cu128"),
    ({"TORCH_SPEC": "torch"}, "", "install -q torch"),
    ({"PIP_INDEX_URL": "https://mirror.example/simple"}, "", "install -q torch==2.13.0"),
    ({}, "global.index-url='https://mirror.example/simple'\n", "install -q torch==2.13.0"),
], ids=["torch-spec-args", "torch-spec", "pip-index-url", "pip-conf-index-url"])
def test_the_users_choice_wins(stub, env, pip_config, expected):
    (stub / "pip_config").write_text(pip_config)
    (stub / "local_wheel").touch()  # even with a local wheel: the user asked for something
    result, calls = run(stub, **env)
    assert result.returncode == 0, result.stderr
    assert calls[-1] == expected and not any("--no-index" in c for c in calls)
    assert f"--index-url {CPU_INDEX}" not in " ".join(calls)
