"""data.packing=documents in the distill and finetune stages: a packed row's ground truth, gate logits, losses and
gradients equal those of its documents run alone, attention never crosses a document, and the config is checked."""

import math

import lightning as L
import pytest
import torch

from seer.checks import ConfigError
from seer.config import compose
from seer.data import PackedTextDataModule, TextFilesCorpus
from seer.gates.config import GateConfig
from seer.model import attach_gates, freeze_base_model
from seer.model.attention import document_spans
from seer.sparsity.config import SparsityConfig
from seer.training.config import DistillConfig, FinetuneConfig
from seer.training.distill import GateDistillation
from seer.training.finetune import Finetune
from tests.tiny import tiny_model, tiny_tokenizer

LENGTHS = (40, 16, 55, 17)  # documents of one row: partial blocks, one exact block; 128 tokens
SPARSITY = SparsityConfig(method="topk", target_density=0.5)


def packed_row(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(input_ids [1, 128], position_ids [1, 128], the documents' ids)``."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 256, (1, n), generator=g) for n in LENGTHS]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return torch.cat(docs, dim=1), positions, docs


def gated_model():
    model = tiny_model("llama", num_hidden_layers=2)
    for layer in model.model.layers:  # sharper attention: a ground truth with structure
        layer.self_attn.q_proj.weight.data *= 4
    attach_gates(model, GateConfig(block_size=16, hidden_size=16))
    return model


def records(model, ids, positions=None) -> tuple[dict, torch.Tensor]:
    """Every layer's records (gate logits, ground truth) of one distill forward, and the last hidden state."""
    seen: dict[int, list] = {}
    documents = None if positions is None else document_spans(positions)
    with model.seer_context.running("distill", consumer=lambda r: seen.setdefault(r.layer_idx, []).append(r),
                                    documents=documents), torch.no_grad():
        hidden = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    return seen, hidden


def test_document_spans_follow_restarting_positions():
    assert document_spans(torch.tensor([[0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5]])) == (((0, 3), (3, 4), (4, 6)),
                                                                                     ((0, 6),))
    with pytest.raises(ValueError, match="row 0 has 3 at 2 after 1"):
        document_spans(torch.tensor([[0, 1, 3]]))


def test_distill_records_and_loss_of_a_packed_row_are_those_of_its_documents_alone():
    model = gated_model()
    freeze_base_model(model)
    ids, positions, docs = packed_row()
    packed, hidden = records(model, ids, positions)
    starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for d, doc in enumerate(docs):
        alone, alone_hidden = records(model, doc)
        torch.testing.assert_close(hidden[:, starts[d]:starts[d + 1]], alone_hidden, atol=1e-5, rtol=1e-5)
        for layer, recs in alone.items():
            torch.testing.assert_close(packed[layer][d].gt, recs[0].gt, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(packed[layer][d].logits, recs[0].logits, atol=1e-5, rtol=1e-5)
    # attention never crosses a document: new tokens in the first change nothing in the others
    other = ids.clone()
    other[:, :LENGTHS[0]] = (other[:, :LENGTHS[0]] + 7) % 256
    changed, changed_hidden = records(model, other, positions)
    torch.testing.assert_close(changed_hidden[:, LENGTHS[0]:], hidden[:, LENGTHS[0]:])
    assert not torch.allclose(changed_hidden[:, :LENGTHS[0]], hidden[:, :LENGTHS[0]])
    assert all(torch.equal(changed[i][d].gt, packed[i][d].gt) for i in packed for d in range(1, len(LENGTHS)))
    # the loss: each layer's mean over all documents' query-block rows
    stage = DistillConfig(skip_first_rows=0.25)
    module = GateDistillation(model, stage, SPARSITY, "reference")
    out = module._forward(ids, with_mass=True, want_images=False, position_ids=positions)
    alone = [module._forward(doc, with_mass=True, want_images=False) for doc in docs]
    rows = torch.tensor([nb - int(0.25 * nb) if nb > 1 else 1 for nb in ((n + 15) // 16 for n in LENGTHS)])
    for layer, kl in out["layer_kl"].items():
        expected = sum(a["layer_kl"][layer] * r for a, r in zip(alone, rows)) / rows.sum()
        torch.testing.assert_close(kl, expected)
    assert 0 < out["density"] <= 1 and 0 < out["recall"] <= 1 and set(out["layer_recall"]) == {0, 1}


def test_finetune_losses_and_gradients_of_a_packed_row_are_those_of_its_documents_alone_checkpointed_or_not():
    model = gated_model()
    module = Finetune(model, FinetuneConfig(), SPARSITY, "reference", kernel="reference")
    module.on_fit_start()
    ids, positions, docs = packed_row()
    weight = model.model.layers[0].self_attn.q_proj.weight

    def losses_and_grad(row, pos=None):
        weight.grad = None
        out = module._forward(row, SPARSITY, with_gate_loss=True, position_ids=pos)
        out["lm_loss"].backward()
        return out, weight.grad.clone()

    model.train()  # transformers checkpoints layers in train mode only
    packed, packed_grad = losses_and_grad(ids, positions)
    alone = [losses_and_grad(doc) for doc in docs]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed, checkpointed_grad = losses_and_grad(ids, positions)  # recomputed in the backward, same documents
    torch.testing.assert_close(checkpointed_grad, packed_grad)
    labels = torch.tensor([n - 1 for n in LENGTHS], dtype=torch.float32)  # each document's own next tokens
    lm = sum(out["lm_loss"].detach() * n for (out, _), n in zip(alone, labels)) / labels.sum()
    torch.testing.assert_close(packed["lm_loss"].detach(), lm)
    grad = sum(g * n for (_, g), n in zip(alone, labels)) / labels.sum()
    torch.testing.assert_close(packed_grad, grad, atol=1e-5, rtol=1e-4)
    assert packed["gate_loss"] > 0 and 0 < packed["density"] <= 1


def test_distill_and_finetune_steps_run_on_a_documents_datamodule(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(60)))
    data = PackedTextDataModule(TextFilesCorpus(str(tmp_path / "a.txt"), split_on="\n\n"), tiny_tokenizer(),
                                seq_len=64, train_sequences=2, val_sequences=1, val_fraction=0.2, packing="documents")
    model = gated_model()
    freeze_base_model(model)
    for module in (GateDistillation(model, DistillConfig(image_every_n_steps=1), SPARSITY, "reference"),
                   Finetune(gated_model(), FinetuneConfig(), SPARSITY, "reference", kernel="reference")):
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=1, accelerator="cpu")
        trainer.fit(module, datamodule=data)
        assert len(module.loss_history) == 2 and all(map(math.isfinite, module.loss_history))
        assert 0 < float(trainer.callback_metrics["val/density"]) <= 1


def test_concat_rows_train_as_before_without_position_ids():
    model = gated_model()
    freeze_base_model(model)
    ids, _, _ = packed_row()
    module = GateDistillation(model, DistillConfig(), SPARSITY, "reference")
    whole, _ = records(model, ids)
    assert all(len(recs) == 1 and recs[0].gt.shape[-1] == 8 for recs in whole.values())
    out = module._forward(ids, with_mass=False, want_images=False)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("overrides, message", [
    (["data.packing=rows"], r"data\.packing='rows': choose from \('concat', 'documents'\)"),
    (["data.packing=documents", "stage=distill_decode"], r"data\.packing='documents': stage=distill_decode"),
])
def test_bad_packing_is_refused_before_loading(overrides, message, monkeypatch):
    import seer.model.loading
    from seer.training.run import run_training

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded something before refusing the config")

    monkeypatch.setattr(seer.model.loading, "load_causal_lm", no_loading)
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", no_loading)
    with pytest.raises(ConfigError, match=message):
        run_training(compose(["model=tiny_llama", "data=stdlib", "gate.block_size=16", "gate.hidden_size=16",
                              "debug=fast", "data.seq_len=64", *overrides]))
