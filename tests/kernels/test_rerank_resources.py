"""experiments/rerank_resources.py: the rerank kernel compiled for sm_90 on the CPU (in a process without
TRITON_INTERPRET, which the test session sets) keeps its key tiles software-pipelined, spills nothing, leaves room
for four programs an SM at the Qwen recipe's 16 rows and has no plain load in its loop over the list (a row's
candidate test is read off the list entry); 32-key tiles compile too."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (tests may change the working directory)


def _table(*args: str) -> dict[tuple[str, str, str], list[int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "experiments.rerank_resources", *args], capture_output=True,
                         text=True, env=env, timeout=600, check=True, cwd=ROOT).stdout
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ") and "rows" not in line]
    return {(r[0], r[1], r[2]): [int(x) for x in r[3:]] for r in rows}


def test_the_default_is_pipelined_without_spills_at_qwens_shape():
    table = _table("--rows", "8", "16", "--launch", "default", "n32")
    assert set(table) == {(r, s, "1") for r in ("8", "16") for s in ("default", "n32")}
    for (rows, spec, _), (registers, spills, copies, shared, loop_loads, loop_conversions, sass, mufu) in table.items():
        assert spills == 0 and copies > 0 and shared > 0, (rows, spec)
        assert loop_loads == 0 and loop_conversions <= 1, (rows, spec, loop_loads, loop_conversions)
        assert sass > 0 and mufu > 0, (rows, spec)  # the SASS loop was found
        assert registers <= (128 if rows == "16" else 64), (rows, spec, registers)  # 4 programs of 4 warps an SM
    assert table[("16", "n32", "1")][0] < table[("16", "default", "1")][0]  # half the logit tile: fewer registers


def test_several_query_blocks_a_program_compile_pipelined_without_spills():
    """A key head per query head (issue 21's benchmark shape) at 16 rows: 2 and 8 query blocks a program (32 and 128
    rows)."""
    table = _table("--hq", "32", "--hkv", "32", "--d", "128", "--rows", "16", "--launch", "default",
                   "--blocks-per-program", "2", "8")
    assert set(table) == {("16", "default", "2"), ("16", "default", "8")}
    for key, (registers, spills, copies, _, loop_loads, _, sass, mufu) in table.items():
        assert spills == 0 and copies > 0 and loop_loads == 0 and sass > 0 and mufu > 0, key
        assert registers <= 128, key  # at least 4 programs of 4 warps an SM


def test_interpret_mode_is_refused_with_a_clear_message():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "experiments.rerank_resources"], capture_output=True, text=True,
                         env=env, timeout=600, cwd=ROOT)
    assert out.returncode != 0 and "TRITON_INTERPRET=1 is set" in out.stderr
