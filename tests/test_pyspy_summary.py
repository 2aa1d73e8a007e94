"""tools/pyspy_summary.py on a profile of ``--threads --subprocesses``: a child's stacks come
as ``process parent;process child;thread ...`` and are named by the child (input processes,
the store writer process and its thread), not lumped with the engine's module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "pyspy_summary.py"
ENGINE = 'process 1:"python3 tools/bench_host_dna.py --reads 30000"'
MAIN = "_run_module_as_main (<frozen runpy>:198);<module> (gpuengine/{}.py:9)"


def test_children_are_named_by_their_process_and_thread(tmp_path):
    raw = tmp_path / "spy.txt"
    raw.write_text("\n".join([
        f'{ENGINE};process 2:"python3 -m gpuengine.writer_process";thread (2): MainThread;'
        f'{MAIN.format("writer_process")};serve (gpuengine/writer_process.py:5) 30',
        f'{ENGINE};process 2:"python3 -m gpuengine.writer_process";thread (3): gpuengine-writer;'
        "run (gpuengine/writer_process.py:7);commit (gpuengine/store/writer.py:3) 50",
        f'{ENGINE};process 4:"python3 -m gpuengine.inputs";thread (4): MainThread;'
        f'{MAIN.format("inputs")};encode_flat (gpuengine/dna_tokenizer.py:1) 100',
        f"{ENGINE};thread (1): gpuengine-planner;run (gpuengine/planner.py:2) 20",
    ]) + "\n")
    out = subprocess.run([sys.executable, str(TOOL), str(raw)], capture_output=True, text=True,
                         check=True).stdout
    roles = {line.split("s  ", 1)[1].strip(): float(line.split()[1])
             for line in out.splitlines() if line.startswith(" ") and not line.startswith("   ")
             and "s  " in line}
    assert roles == {"input process": 1.0, "writer process / gpuengine-writer": 0.5,
                     "writer process": 0.3, "gpuengine-planner": 0.2}, out
