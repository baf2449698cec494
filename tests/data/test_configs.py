"""conf/data/ packed-text configs: each composes with stand-ins for `paths` and `seed` and instantiates (the hub
corpora without network)."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seer.data import HFDatasetCorpus, PackedTextDataModule, StdlibCorpus, TextFilesCorpus
from tests.tiny import tiny_tokenizer

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"


def compose(name: str, cache_dir: Path, **overrides):
    root = OmegaConf.create({"paths": {"cache_dir": str(cache_dir)}, "seed": 0,
                             "data": OmegaConf.load(CONF_DATA / f"{name}.yaml")})
    root.merge_with(OmegaConf.from_dotlist([f"data.{key}={value}" for key, value in overrides.items()]))
    return root.data


def test_stdlib_config_is_the_small_default_and_trains(tmp_path):
    cfg = compose("stdlib", tmp_path, seq_len=128, train_sequences=4, val_sequences=1)
    assert OmegaConf.load(CONF_DATA / "stdlib.yaml").seq_len == 1024
    dm = instantiate(cfg, tokenizer=tiny_tokenizer())
    assert isinstance(dm, PackedTextDataModule) and isinstance(dm.corpus, StdlibCorpus)
    assert Path(dm.cache_dir) == tmp_path / "tokens"
    dm.setup()
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (1, 128)
    assert len(list((tmp_path / "tokens").iterdir())) == 1


def test_text_files_config_takes_a_glob(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    cfg = compose("text_files", tmp_path, seq_len=16, train_sequences=2, val_sequences=0, val_fraction=0.0)
    cfg.corpus.paths = str(tmp_path / "*.txt")
    dm = instantiate(cfg, tokenizer=tiny_tokenizer())
    assert isinstance(dm.corpus, TextFilesCorpus)
    dm.setup()
    assert dm.rows.train.shape == (2, 16)


@pytest.mark.parametrize("name, hub", [("pg19", "emozilla/pg19"), ("redpajama_sample", "json")])
def test_hub_configs_build_their_corpus_without_network(tmp_path, name, hub):
    cfg = compose(name, tmp_path)
    assert cfg.seq_len == 32768 and cfg.train_sequences == 16 * 500
    dm = instantiate(cfg, tokenizer=tiny_tokenizer())
    assert isinstance(dm.corpus, HFDatasetCorpus) and dm.corpus.path == hub and dm.corpus.streaming


def test_retrieval_augmentation_turns_on_with_one_override(tmp_path):
    """``data/augment=retrieval`` (conf/data/augment/) composes with the qwen05 recipe, its values are the class's
    defaults, and the data module gets it; without the override there is no augmentation."""
    from seer.config import compose as compose_run
    from seer.data import RetrievalAugmentation

    over = ["experiment=qwen05_gates", f"data.corpus.corpora.0.paths=[{tmp_path}/*.txt]",
            f"paths.output_dir={tmp_path}"]
    assert "augment" not in compose_run(over).data
    node = compose_run([*over, "data/augment=retrieval", "data.augment.share=0.3"]).data
    (tmp_path / "a.txt").write_text("some text")
    dm = instantiate(node, tokenizer=tiny_tokenizer())
    assert isinstance(dm.augment, RetrievalAugmentation) and dm.augment.share == 0.3
    assert instantiate(node.augment, share=0.5).settings() == RetrievalAugmentation().settings()
