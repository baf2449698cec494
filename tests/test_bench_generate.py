"""experiments/bench_generate.py on a tiny random model on the CPU: both loops timed for dense decode and for Quest
alone, the graph loop's tokens equal to generate()'s, the table's speedups against dense generate()."""

import pytest

from experiments import bench_generate as bench
from tests.model.test_sparse_decode import QUEST_ALONE, _load
from tests.tiny import tiny_model


def test_both_loops_are_measured_and_agree():
    import torch

    ids = torch.randint(3, 300, (1, 70), generator=torch.Generator().manual_seed(1))
    quest = _load(decode_sparsity={**QUEST_ALONE, "token_budget": 64, "first_block": False})
    rows = bench.measure(tiny_model("llama"), ids, 6, 1, 2, "dense") + bench.measure(quest, ids, 6, 1, 2, "quest")
    assert [(r["decode"], r["loop"]) for r in rows] == [("dense", "generate"), ("dense", "graph"),
                                                        ("quest", "generate"), ("quest", "graph")]
    assert rows[1]["same_tokens"] == rows[3]["same_tokens"] == 1.0
    assert rows[0]["density"] == 1.0 and rows[3]["density"] == pytest.approx(0.5)
    assert all(r["whole_s"] > 0 and r["prefill_s"] > 0 for r in rows)  # the per-token split is timing, not checked
    lines = bench.table(rows)
    assert len(lines) == 6 and lines[2].split(" | ")[6] in ("1.00x", "nanx")


def test_arguments():
    args = bench.parse_args(["--model-dir", "m", "--eval-novel", "e.txt", "--out", "o.md"])
    assert (args.prompt_len, args.new, args.budget) == (32000, 256, 2048)
    with pytest.raises(SystemExit):
        bench.parse_args(["--model-dir", "m", "--eval-novel", "e.txt", "--out", "o.md", "--new", "1"])
