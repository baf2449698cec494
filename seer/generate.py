"""Generation entry point: ``python -m seer.generate gates=PATH prompt="..." [sparsity.target_density=0.1]``.

Loads the model and its gates, runs the prompt's prefill through gate -> block selection -> block-sparse attention,
decodes densely, and prints the text, the achieved density per layer and the prefill time (beside dense). The prompt
and the gate file are checked before the model loads: a prompt (plus ``max_new_tokens``) longer than the model's
context is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from seer.cli import user_errors
from seer.checks import ConfigError
from seer.config import register_configs

register_configs()


def _timed_prefill(model, ids) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, use_cache=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _prompt(cfg: DictConfig) -> str:
    if not cfg.prompt_file:
        return cfg.prompt
    path = Path(cfg.prompt_file)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompt_file={cfg.prompt_file!r}: cannot be read as UTF-8 text ({exc})") from exc


def run_generation(cfg: DictConfig) -> dict:
    from seer.checks import build
    from seer.model.config import ModelConfig
    from seer.sparsity.config import SparsityConfig
    from seer.model.inference import load
    from seer.model.loading import load_config, load_tokenizer, model_id

    mcfg = build(ModelConfig, "model", OmegaConf.to_container(cfg.model, resolve=True))
    spars = build(SparsityConfig, "sparsity", OmegaConf.to_container(cfg.sparsity, resolve=True))
    prompt = _prompt(cfg)
    tokenizer = load_tokenizer(mcfg)
    if tokenizer is None:
        raise ConfigError(f"model: {model_id(mcfg)} has no tokenizer; seer.generate needs one")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    context = getattr(load_config(mcfg).get_text_config(), "max_position_embeddings", None)
    if context is not None and ids.shape[1] + cfg.max_new_tokens > context:
        raise ConfigError(f"the prompt is {ids.shape[1]} tokens and max_new_tokens={cfg.max_new_tokens}, but "
                          f"{model_id(mcfg)} has a context of {context} tokens; shorten the prompt")
    model = load(mcfg, gates=cfg.gates, sparsity=spars, device=cfg.device, kernel=cfg.kernel)
    ids = ids.to(model.device)
    sparse_s = _timed_prefill(model, ids)
    densities = model.seer_context.densities()
    result = {"prompt_tokens": ids.shape[1], "sparse_prefill_s": sparse_s, "densities": densities}
    if cfg.compare_dense:
        with model.seer_context.running("dense"):
            result["dense_prefill_s"] = _timed_prefill(model, ids)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    result["text"] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    mean_density = sum(densities.values()) / max(1, len(densities))
    print(f"prompt: {ids.shape[1]} tokens; sparse prefill {sparse_s * 1e3:.1f} ms"
          + (f" (dense {result['dense_prefill_s'] * 1e3:.1f} ms)" if "dense_prefill_s" in result else "")
          + f"; mean block density {mean_density:.3f} ({spars.method})")
    print("--- generated ---")
    print(result["text"])
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_generation(cfg)


if __name__ == "__main__":
    main()
