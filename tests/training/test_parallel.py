"""Two processes on the CPU (gloo): DDP and FSDP2 give the gates of one process with the same global batch (the
ranks read different rows: with the same rows they could not), write one set of files, and resume exactly."""

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import TINY, cli_env, seer_train, train
from tests.training.wandb_offline import offline_runs

STEPS = ["trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2"]  # two epochs of 4 rows
TWO_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2"]


def _run(tmp_path, folder, *overrides):
    proc = subprocess.run(seer_train(*TINY, *STEPS, *TWO_PROCESSES, f"hydra.run.dir={tmp_path / folder}", *overrides),
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "loading it whole on the CPU" not in proc.stdout + proc.stderr  # sharded runs read the base by groups
    return tmp_path / folder


def _gates(folder):
    return load_file(str(folder / "gates" / "gates.safetensors"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, batches of 2 rows (the global batch of 2 processes x 1 row)."""
    out = tmp_path_factory.mktemp("one")
    train(out, *STEPS, "data.batch_size=2")
    return _gates(out)


def test_ddp_matches_one_process_writes_once_and_resumes_exactly(tmp_path, one_process):
    ddp = _run(tmp_path, "ddp", "trainer=ddp", "logger=wandb")
    gates = _gates(ddp)
    for name, want in one_process.items():
        torch.testing.assert_close(gates[name], want, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last.ckpt", "step000002.ckpt",
                                                                      "step000004.ckpt"]
    assert (ddp / "summary.json").is_file() and len(offline_runs(ddp)) == 1  # one W&B run, not one per process
    assert not list(ddp.glob("**/*.tmp"))
    checkpoint = torch.load(ddp / "checkpoints" / "step000002.ckpt", weights_only=False)
    assert checkpoint["RandomTokensDataModule"] == {"consumed_batches": 2, "world_size": 2}  # batches per process

    resumed = _run(tmp_path, "resumed", "trainer=ddp", f"ckpt_path={ddp / 'checkpoints' / 'step000002.ckpt'}")
    assert all(torch.equal(gates[k], v) for k, v in _gates(resumed).items())


def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path, one_process):
    # the last checkpoint is written at the end, after the calibration's forward without backward (which leaves the
    # gates gathered): it must still map the optimizer's state to the sharded parameters
    fsdp = _run(tmp_path, "fsdp", "trainer=fsdp", "trainer.limit_val_batches=0")
    gates = _gates(fsdp)
    for name, want in one_process.items():
        torch.testing.assert_close(gates[name], want, rtol=1e-5, atol=1e-6)
    checkpoint = torch.load(fsdp / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.model.layers.{i}.self_attn.seer_gate.k_weight" for i in (0, 1)}
    assert all(torch.equal(checkpoint["state_dict"][f"model.model.layers.{i}.self_attn.seer_gate.k_weight"],
                           gates[f"layers.{i}.k_weight"]) for i in (0, 1))

    resumed = _run(tmp_path, "resumed", "trainer=fsdp", "trainer.limit_val_batches=0",
                   f"ckpt_path={fsdp / 'checkpoints' / 'step000002.ckpt'}")
    assert all(torch.equal(gates[k], v) for k, v in _gates(resumed).items())


def test_a_sweep_of_jobs_that_start_their_own_processes_is_refused():
    import lightning as L
    from hydra.types import RunMode

    from seer.checks import ConfigError
    from seer.preflight import check_launch

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    check_launch(trainer, None)  # one run: Lightning's launcher starts the second process
    with pytest.raises(ConfigError, match="trainer.devices=2: a sweep .* hydra.launcher.tasks_per_node=2"):
        check_launch(trainer, type("Job", (), {"mode": RunMode.MULTIRUN})())


FINETUNE = ["stage=finetune", "model/rope_scaling=yarn", "model.rope_scaling.factor=2",
            "model.rope_scaling.original_max_position_embeddings=128", "data.seq_len=256",
            "sparsity=topk", "sparsity.target_density=0.5", "trainer.max_steps=2"]


def _store(folder, **shape) -> list[str]:
    """The tiny model (``shape`` changing its architecture) stored as a Hugging Face folder: safetensors in several
    files, a word-level tokenizer of its ids; returns the overrides that train from it."""
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from seer.config import compose

    architecture = {**compose(TINY).model.architecture, **shape}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**architecture))
    model.save_pretrained(folder, max_shard_size="200KB")
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(architecture["vocab_size"])}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    return [f"model.name_or_path={folder}", "model.random_init=false", f"data.vocab_size={architecture['vocab_size']}"]


@pytest.fixture(scope="module")
def stored_tiny(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("stored"))


def test_fsdp_reads_a_stored_model_group_by_group_and_matches_one_process(tmp_path, stored_tiny):
    one = tmp_path / "one"
    train(one, *STEPS, *stored_tiny, "data.batch_size=2")
    fsdp = _run(tmp_path, "fsdp", "trainer=fsdp", *stored_tiny)
    gates, reference = _gates(fsdp), _gates(one)
    for name, want in reference.items():
        torch.testing.assert_close(gates[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_on_two_gpus_reads_a_stored_model_and_matches_one_gpu(tmp_path):
    """On GPUs, in bfloat16, with the Triton ground truth: each group's tensors read from the files onto its GPU."""
    stored = _store(tmp_path / "stored", hidden_size=256, intermediate_size=512)  # head dim 64, as the kernels want
    gpu = ["trainer.accelerator=gpu", "model.dtype=bfloat16", "data.seq_len=1024", "gate.block_size=64"]
    one = tmp_path / "one"
    train(one, *STEPS, *stored, *gpu, "trainer.devices=1", "data.batch_size=2")
    fsdp = _run(tmp_path, "fsdp", "trainer=fsdp", *stored, *gpu, "trainer.devices=2")
    gates, reference = _gates(fsdp), _gates(one)
    for name, want in reference.items():  # bfloat16 base: batches of 2 rows and of 1 round differently
        torch.testing.assert_close(gates[name], want, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def finetuned_once(tmp_path_factory):
    """The reference: one process fine-tuned with batches of 2 rows; its exported model and gates, by tying."""
    made = {}

    def exported(tied: bool) -> dict:
        if tied not in made:
            out = tmp_path_factory.mktemp("finetune_one")
            train(out, *FINETUNE, f"+model.architecture.tie_word_embeddings={tied}", "data.batch_size=2")
            made[tied] = {part: load_file(str(out / "model" / part))
                          for part in ("model.safetensors", "gates/gates.safetensors")}
        return made[tied]
    return exported


@pytest.mark.parametrize("strategy,tied", [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_finetune_on_two_processes_matches_one_process(tmp_path, finetuned_once, strategy, tied):
    """The exported model and gates equal one process's; under FSDP they are gathered from the shards (the LM head
    its own group, or tied to the embeddings in the decoder's)."""
    proc = subprocess.run(seer_train(*TINY, *FINETUNE, *TWO_PROCESSES, f"trainer={strategy}",
                                     f"+model.architecture.tie_word_embeddings={tied}",
                                     f"hydra.run.dir={tmp_path / strategy}"),
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fine-tuned model:") == 1  # written by one process
    for part, reference in finetuned_once(tied).items():
        written = load_file(str(tmp_path / strategy / "model" / part))
        assert written.keys() == reference.keys()
        for name, want in reference.items():
            torch.testing.assert_close(written[name], want, rtol=1e-5, atol=1e-6)


def test_lora_under_fsdp_is_refused_before_loading(tmp_path):
    from seer.checks import ConfigError

    with pytest.raises(ConfigError, match="trainer=fsdp with stage.lora_rank=4"):
        train(tmp_path, *FINETUNE, "stage.lora_rank=4", "stage.trainable=[]", "trainer=fsdp", *TWO_PROCESSES)


DECODE = ["stage=distill_decode", "stage.decode_gate.block_size=16", "stage.decode_gate.hidden_size=16",
          "stage.decode_sparsity.token_budget=32", "logger=none"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distill_decode_on_two_processes_matches_one_process(tmp_path, strategy):
    """Decode gates train under both strategies like the prefill gates: the same gates as one process."""
    one = tmp_path / "one"
    train(one, *STEPS, *DECODE, "data.batch_size=2")
    two = _run(tmp_path, strategy, *DECODE, f"trainer={strategy}", "trainer.limit_val_batches=0")
    want, got = (load_file(str(f / "gates" / "decode_gates.safetensors")) for f in (one, two))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
