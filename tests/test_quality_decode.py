"""experiments/quality_decode.py, a GPU study (run once on an H200): its arguments parse, and on a tiny random model
on the CPU its teacher-forced NLL is the model's and a budget covering every block measures what dense decode does."""

import pytest
import torch

from seer.checks import ConfigError
from seer.gates.decode_config import DecodeGateConfig
from seer.model.attention import prepare_model
from seer.model.decode import attach_decode_gates, decode_gates
from tests.tiny import tiny_model


@pytest.fixture
def study(experiment):
    return experiment("quality_decode")


def test_arguments_parse_and_bad_budgets_are_refused(study):
    args = study.parse_args(["--model-dir", "/m", "--novels", "n/*.txt", "--eval-novel", "e.txt"])
    assert args.budgets == [1024, 2048, 4096] and args.continuation == 1024 and args.greedy == 256
    with pytest.raises(ConfigError, match="decode_sparsity.token_budget=0"):
        study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--budgets", "0"])
    assert args.estimates == [{"estimate": "quest", "estimate_weight": 1.0}]  # the training-free baseline by default
    no_estimates = ["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--estimates"]
    assert study.parse_args(no_estimates).estimates == []
    args = study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--estimates", "quest:0.5",
                             "quest:1"])
    assert args.estimates == [{"estimate": "quest", "estimate_weight": 0.5},
                              {"estimate": "quest", "estimate_weight": 1.0}]
    assert [study.scores_name(e) for e in [{}, *args.estimates]] == ["gate", "gate+quest@0.5", "quest"]
    for bad, error in [("quest:0", ConfigError), ("snapkv:0.5", ConfigError), ("quest", SystemExit)]:
        with pytest.raises(error):
            study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--estimates", bad])
    assert study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--first-window", "2"]) \
        .first_window == 2
    with pytest.raises(SystemExit):
        study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--first-window", "-1"])


def test_measurements_on_a_tiny_model(study):
    model = tiny_model("llama")
    prepare_model(model, 16)
    attach_decode_gates(model, DecodeGateConfig(block_size=16, hidden_size=16))
    torch.manual_seed(0)
    for gate in decode_gates(model).values():
        torch.nn.init.normal_(gate.k_weight, std=2.0)
    ids = torch.randint(3, 300, (1, 52))
    prompt, continuation = ids[:, :44], ids[:, 44:]
    with torch.no_grad():
        logits = model(ids).logits[0, 43:-1]
    one_pass = float(torch.nn.functional.cross_entropy(logits, ids[0, 44:]))
    nll, top = study.continuation_nll(model, prompt, continuation)
    assert nll == pytest.approx(one_pass, rel=1e-5)
    assert torch.equal(top, logits.argmax(-1))
    estimates = [{"estimate": "quest", "estimate_weight": 0.5}, {"estimate": "quest", "estimate_weight": 1.0}]
    rows = study.measure_window(model, prompt, continuation, [1024, 16], greedy=4, pad_token_id=2,
                                kernel="reference", estimates=estimates)
    assert [(r["budget"], r["scores"]) for r in rows] == [("dense", ""), *((b, s) for b in (1024, 16) for s in (
        "gate", "gate+quest@0.5", "quest"))]
    for row in rows[1:4]:  # every block kept whatever scores them
        assert row["density"] == 1.0 and row["nll"] == pytest.approx(one_pass, rel=1e-5)
    for row in rows[4:]:
        assert 0 < row["density"] < 1
    dense, everything, small = rows[0], rows[1], rows[4]
    assert dense["nll"] == pytest.approx(one_pass, rel=1e-5)
    assert everything["density"] == 1.0 and everything["nll"] == pytest.approx(one_pass, rel=1e-5)
    assert everything["greedy_agree"] == 1.0 and everything["greedy_prefix"] == 4
    assert everything["top1_agree"] == 1.0 and 0 <= small["top1_agree"] <= 1
    assert 0 < small["density"] < 1 and small["nll"] != pytest.approx(one_pass, rel=1e-5)
    assert study.greedy_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5, 4])) == (0.75, 2)
    table = study.summary_table([{"window": 0, **r} for r in rows])
    assert "| 16 | gate | 1 |" in table and "| 16 | gate+quest@0.5 | 1 |" in table and "| 16 | quest | 1 |" in table


def test_quest_alone_rows_without_decode_gates(study):
    """--quest-blocks: models without decode gates, Quest alone at each block size, against one dense measurement;
    a budget covering every block is dense."""
    args = study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--quest-blocks", "16", "32"])
    assert args.quest_blocks == [16, 32]
    for bad in (["--quest-blocks", "8"], ["--quest-blocks", "16", "--decode-gates", "/g"],
                ["--quest-blocks", "16", "--estimates", "quest:1", "quest_mass:0.5"]):
        with pytest.raises(SystemExit):
            study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", *bad])
    with pytest.raises(ConfigError, match=r"token_budget=64: is below one block \(128 tokens\)"):
        study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--quest-blocks", "128",
                          "--budgets", "1024", "64"])
    ids = torch.randint(3, 300, (1, 100), generator=torch.Generator().manual_seed(0))
    prompt, continuation = ids[:, :92], ids[:, 92:]
    models = []
    for block in (16, 32):
        model = tiny_model("llama")  # the same seeded weights each time
        models.append(model)
        prepare_model(model, block)
        from seer.model.decode import attach_quest_decode

        attach_quest_decode(model, block)
    dense, dense_row = study.dense_window(models[0], prompt, continuation, 4, 2)
    rows = [dense_row] + [r for m in models for r in study.measure_window(
        m, prompt, continuation, [1024, 32], greedy=4, pad_token_id=2, kernel="reference", dense=dense)]
    assert [(r["budget"], r["scores"]) for r in rows] == [("dense", ""), (1024, "quest/16"), (32, "quest/16"),
                                                          (1024, "quest/32"), (32, "quest/32")]
    for row in (rows[1], rows[3]):
        assert row["density"] == 1.0 and row["nll"] == pytest.approx(dense_row["nll"], rel=1e-5)
        assert row["greedy_agree"] == 1.0 and row["top1_agree"] == 1.0
    for row in (rows[2], rows[4]):
        assert 0 < row["density"] < 1 and row["nll"] != pytest.approx(dense_row["nll"], rel=1e-5)
    both = study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--quest-blocks", "16",
                             "--estimates", "quest:1", "quest_mass:1"]).estimates
    pooled = study.measure_window(models[0], prompt, continuation, [32], greedy=4, pad_token_id=2,
                                  kernel="reference", estimates=both, dense=dense)
    assert [r["scores"] for r in pooled] == ["quest/16", "quest_mass/16"]
    assert pooled[0]["nll"] == pytest.approx(rows[2]["nll"], rel=1e-6) and 0 < pooled[1]["density"] < 1
    reranked = study.measure_window(models[0], prompt, continuation, [48], greedy=4, pad_token_id=2,
                                    kernel="reference", estimates=[{"estimate": "quest", "estimate_weight": 1.0},
                                                                   {"estimate": "oracle", "estimate_weight": 1.0}],
                                    dense=dense, rerank_blocks=(0, 8))
    assert [r["scores"] for r in reranked] == ["quest/16", "quest/16+rerank8", "oracle/16", "oracle/16+rerank8"]
    # six blocks and one of them to choose beside the first and the newest; every block a candidate: the rerank
    # chooses what the oracle chooses, not what Quest chooses
    assert reranked[1]["nll"] == pytest.approx(reranked[2]["nll"], rel=1e-6)
    assert reranked[1]["nll"] != pytest.approx(reranked[0]["nll"], rel=1e-6)
    with pytest.raises(ConfigError, match=r"rerank_blocks=1: candidates are fewer than the 1024-token budget's 64"):
        study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--quest-blocks", "16",
                          "--rerank-blocks", "0", "1"])


def test_pinned_prompt_blocks_and_recent_blocks_are_kept_beside_the_budget(study):
    """--prompt-blocks / --recent-blocks: a budget of the first and newest block plus two pins, or plus the three
    blocks before the newest, keeps more than the same budget alone."""
    from seer.model.decode import attach_quest_decode

    ids = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(1))
    prompt, continuation = ids[:, :112], ids[:, 112:]
    model = tiny_model("llama")
    prepare_model(model, 16)
    attach_quest_decode(model, 16)
    dense, _ = study.dense_window(model, prompt, continuation, 4, 2)
    plain, pinned = (study.measure_window(model, prompt, continuation, [32], greedy=4, pad_token_id=2,
                                          kernel="reference", dense=dense, prompt_blocks=p)[0] for p in (0, 2))
    assert plain["density"] == pytest.approx(2 / 8) and pinned["density"] == pytest.approx(4 / 8)
    # --recent-blocks: the three blocks before the newest join the first and the newest (5 of 8 blocks)
    recent = study.measure_window(model, prompt, continuation, [32], greedy=4, pad_token_id=2, kernel="reference",
                                  dense=dense, recent_blocks=3)[0]
    assert recent["density"] == pytest.approx(5 / 8) and recent["nll"] != pytest.approx(plain["nll"], rel=1e-6)
    with pytest.raises(ConfigError, match="decode_sparsity.recent_blocks=-1"):
        study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recent-blocks", "-1"])
    assert study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--prompt-blocks", "2"]) \
        .prompt_blocks == 2
    with pytest.raises(ConfigError, match="decode_sparsity.prompt_blocks=-1"):
        study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--prompt-blocks", "-1"])
