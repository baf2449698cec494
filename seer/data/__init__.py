"""Training data: corpora of plain-text documents packed into fixed-length token rows.

- `seer.data.corpora`: `StdlibCorpus` (embedded default), `TextFilesCorpus`, `HFDatasetCorpus` and the
  `pg19_corpus` / `redpajama_sample_corpus` presets.
- `seer.data.packing`: tokenise, join with EOS, cut into rows (BOS first when the model expects it), held-out
  split by document.
- `seer.data.retrieval`: `RetrievalAugmentation`, long-range lookups (facts and recalls, chains, repeated spans)
  written into training documents.
- `seer.data.cache`: packed rows on disk under a key of everything they depend on, written atomically.
- `seer.data.datamodule`: `PackedTextDataModule`, the LightningDataModule the training entry point builds.
"""

from seer.data.corpora import (Corpus, HFDatasetCorpus, MixedCorpus, StdlibCorpus, TextFilesCorpus, pg19_corpus,
                               redpajama_sample_corpus)
from seer.data.datamodule import PackedTextDataModule
from seer.data.packing import PackedRows, pack_documents
from seer.data.retrieval import RetrievalAugmentation

__all__ = ["Corpus", "HFDatasetCorpus", "MixedCorpus", "PackedRows", "PackedTextDataModule", "RetrievalAugmentation",
           "StdlibCorpus",
           "TextFilesCorpus", "pack_documents", "pg19_corpus", "redpajama_sample_corpus"]
