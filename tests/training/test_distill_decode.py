"""``stage=distill_decode`` on a tiny model: the loss goes down, decode-gate files load back (and only onto the model
shape they were made for), resume gives the uninterrupted run's gates bit for bit, the prefill output is unchanged."""

import pytest
import torch
from safetensors.torch import load_file

from seer.checks import ConfigError
from seer.gates.decode_config import DecodeGateConfig
from seer.model.decode import attach_decode_gates, decode_gates
from seer.model.decode_gate_io import load_decode_gates
from tests.tiny import tiny_model
from tests.training.conftest import train

DECODE = ["stage=distill_decode", "stage.decode_gate.block_size=16", "stage.decode_gate.hidden_size=16",
          "stage.decode_sparsity.token_budget=32", "stage.lr=1e-2", "stage.warmup_steps=0", "logger=none",
          "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    summary = train(out, *DECODE)
    assert summary["steps"] == 6
    return out, summary


def _weights(folder):
    return load_file(str(folder / "gates" / "decode_gates.safetensors"))


def test_distill_decode_lowers_the_loss_and_writes_decode_gates(uninterrupted):
    out, summary = uninterrupted
    assert summary["loss_end"] < 0.9 * summary["loss_start"]
    assert 0 < summary["val_recall"] <= 1
    state = torch.load(out / "checkpoints" / "step000006.ckpt", weights_only=False)
    assert state["state_dict"] and all(".seer_decode_gate." in k for k in state["state_dict"])  # decode gates only
    weights = _weights(out)
    assert sorted(weights) == sorted(f"layers.{i}.{w}" for i in range(2) for w in ("q_weight", "k_weight"))
    assert torch.equal(weights["layers.1.k_weight"],
                       state["state_dict"]["model.model.layers.1.self_attn.seer_decode_gate.k_weight"])


def test_decode_gate_file_loads_only_onto_its_model_shape(uninterrupted):
    out, _ = uninterrupted
    model = tiny_model("llama", max_position_embeddings=4096)  # conf/model/tiny_llama.yaml
    meta = load_decode_gates(model, out / "gates")
    assert meta["decode_gate"]["block_size"] == 16 and meta["decode_sparsity"]["token_budget"] == 32
    assert torch.equal(decode_gates(model)[0].q_weight.detach(), _weights(out)["layers.0.q_weight"])
    with pytest.raises(ConfigError, match="with num_kv_heads=2, but this model has num_kv_heads=4"):
        load_decode_gates(tiny_model("llama", num_key_value_heads=4, max_position_embeddings=4096), out / "gates")
    with pytest.raises(ConfigError, match="with max_position_embeddings=4096, but this model has max_position_emb"):
        load_decode_gates(tiny_model("llama"), out / "gates")
    other = tiny_model("llama", max_position_embeddings=4096)
    attach_decode_gates(other, DecodeGateConfig(block_size=16, hidden_size=8))
    with pytest.raises(ConfigError, match="hidden_size=16.*but the model's decode gates have.*hidden_size=8"):
        load_decode_gates(other, out / "gates")


def test_resume_gives_the_same_decode_gates(uninterrupted, tmp_path):
    out, _ = uninterrupted
    summary = train(tmp_path, *DECODE, f"ckpt_path={out / 'checkpoints' / 'step000003.ckpt'}")
    assert summary["steps"] == 6
    want, got = _weights(out), _weights(tmp_path)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_distilling_leaves_the_model_output_unchanged():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 300, (2, 40))
    with torch.no_grad():
        dense = model(ids).logits
    ctx = attach_decode_gates(model, DecodeGateConfig(block_size=16, hidden_size=8))
    records = []
    with ctx.distilling(model, records.append), torch.no_grad():
        distilled = model(ids).logits
    torch.testing.assert_close(distilled, dense, rtol=1e-5, atol=1e-5)
    assert [r.layer_idx for r in records] == [0, 1]
    assert records[0].logits.requires_grad and records[0].logits.shape == records[0].gt.shape == (2, 2, 40, 3)
    torch.testing.assert_close(records[0].gt.sum(-1), torch.ones(2, 2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense)  # the model's own attention is back after the block


def test_distill_decode_refuses_bad_settings(uninterrupted, tmp_path):
    out, _ = uninterrupted
    with pytest.raises(ConfigError, match=r"stage.decode_gate.hidden_size=16 in the checkpoint, 8 now"):
        train(tmp_path, *DECODE, f"ckpt_path={out / 'checkpoints' / 'step000003.ckpt'}",
              "stage.decode_gate.hidden_size=8")
    with pytest.raises(ConfigError, match=r"decode_sparsity.token_budget=8: is below one block \(16 tokens\)"):
        train(tmp_path, *DECODE, "stage.decode_sparsity.token_budget=8")
    with pytest.raises(ConfigError, match=r"data.seq_len=64: rows must hold at least 2 blocks of "
                                          r"stage.decode_gate.block_size=64 tokens"):
        train(tmp_path, *DECODE, "stage.decode_gate.block_size=64", "stage.decode_sparsity.token_budget=64")
    with pytest.raises(ConfigError, match=r"stage.gt='fused': choose from \('auto', 'triton', 'reference'\)"):
        train(tmp_path, *DECODE, "stage.gt=fused")
    with pytest.raises(ConfigError, match=r"stage.decode_sparsity.estimate='quest': is mixed in at inference only"):
        train(tmp_path, *DECODE, "stage.decode_sparsity.estimate=quest")
    with pytest.raises(ConfigError, match=r"stage.decode_sparsity.prompt_blocks=2: pins prompt blocks at inference"):
        train(tmp_path, *DECODE, "stage.decode_sparsity.prompt_blocks=2")


def test_triton_ground_truth_matches_the_reference():
    """Under Triton's interpreter on the CPU: the FlashAttention output and the one-pass map equal SDPA and the
    chunked reference."""
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (1, 37))
    ctx = attach_decode_gates(model, DecodeGateConfig(block_size=16, hidden_size=8))
    runs = {}
    for source in ("reference", "triton"):
        records = []
        with ctx.distilling(model, records.append, source), torch.no_grad():
            runs[source] = (model(ids).logits, records)
    torch.testing.assert_close(runs["triton"][0], runs["reference"][0], rtol=1e-4, atol=1e-4)
    for ref, tri in zip(runs["reference"][1], runs["triton"][1], strict=True):
        torch.testing.assert_close(tri.gt, ref.gt, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(tri.logits, ref.logits)


def test_calibrated_decode_budget_is_stored_for_seer_load(tmp_path):
    """A ``target_density`` budget is calibrated at the end of training on the validation rows and stored beside the
    decode gates; seer.load finds its threshold there."""
    from omegaconf import OmegaConf

    from seer.config import compose
    from seer.model.inference import load
    from seer.sparsity.decode import load_decode_calibrations

    budget = {"method": "threshold", "target_density": 0.7, "first_block": False}  # 4-block rows: above 0.52
    train(tmp_path, *DECODE, *(f"stage.decode_sparsity.{key}={value}" for key, value in budget.items()),
          "trainer.max_steps=2")
    [calibration] = load_decode_calibrations(tmp_path / "gates")
    assert calibration.sparsity.target_density == 0.7 and calibration.seq_len == 64
    assert 0 < calibration.threshold < 1 and calibration.density == pytest.approx(0.7, abs=0.03)
    tiny_llama = OmegaConf.to_container(compose(["model=tiny_llama"], "generate").model)
    model = load(tiny_llama, decode_gates=tmp_path / "gates", decode_sparsity=budget, device="cpu")
    assert model.seer_decode.threshold == calibration.threshold
