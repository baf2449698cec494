"""Generation entry point: ``python -m seer.generate gates=PATH prompt="..." [sparsity.target_density=0.1]``.

Loads the model and its gates, runs the prompt's prefill through gate -> block selection -> block-sparse attention,
decodes densely, and prints the text, the achieved density per layer and the prefill time (beside dense).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

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


def run_generation(cfg: DictConfig) -> dict:
    from seer.config import build
    from seer.model.config import ModelConfig
    from seer.sparsity.config import SparsityConfig
    from seer.model.inference import enable_sparse_prefill, load
    from seer.model.loading import load_tokenizer

    mcfg = build(ModelConfig, "model", OmegaConf.to_container(cfg.model, resolve=True))
    spars = build(SparsityConfig, "sparsity", OmegaConf.to_container(cfg.sparsity, resolve=True))
    prompt = Path(cfg.prompt_file).read_text() if cfg.prompt_file else cfg.prompt
    tokenizer = load_tokenizer(mcfg)
    if tokenizer is None:
        raise ValueError("seer.generate needs a model with a tokenizer")
    model = load(mcfg, gates=cfg.gates, sparsity=spars, device=cfg.device, kernel=cfg.kernel)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    sparse_s = _timed_prefill(model, ids)
    densities = model.seer_context.densities()
    result = {"prompt_tokens": ids.shape[1], "sparse_prefill_s": sparse_s, "densities": densities}
    if cfg.compare_dense:
        model.seer_context.set_mode("dense")
        result["dense_prefill_s"] = _timed_prefill(model, ids)
        enable_sparse_prefill(model, spars, cfg.kernel)
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
    run_generation(cfg)


if __name__ == "__main__":
    main()
