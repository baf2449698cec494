"""Tiny models and a tokenizer built in code, so tests need no downloads."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tiny_config(family: str = "llama", **overrides):
    kw = {**_COMMON, **overrides}
    if family == "llama":
        return LlamaConfig(**kw)
    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "qwen3":
        return Qwen3Config(head_dim=kw["hidden_size"] // kw["num_attention_heads"], **kw)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **kw)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM,
           "mistral": MistralForCausalLM}[family]
    model = cls(tiny_config(family, **overrides)).eval()
    if family == "qwen2":  # give the q/k biases non-zero values so a dropped bias would show
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    return model


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in a moment on a little Python, with <s>/</s> at ids 1/2."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.path.join('a', 'b'))\n"]
    tok.train_from_iterator(text * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def padded_batch(seqs, side: str):
    """``input_ids``, ``attention_mask``, ``position_ids`` of the 1-d token tensors ``seqs`` padded (with token 2) on
    ``side`` (``left`` or ``right``) to the longest, on their device, and each row's span of real tokens."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), 2, device=seqs[0].device)
    mask = torch.zeros_like(ids)
    spans = []
    for row, s in enumerate(seqs):
        span = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[row, span], mask[row, span] = s, 1
        spans.append(span)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), spans


def tiny_decode_model(budget: dict | None, block_size: int = 16):
    """A tiny Llama prepared for seer with decode gates (hidden size 16, sharpened random keys), sparse decode on at
    ``DecodeSparsityConfig(**budget)`` (off with None)."""
    from seer.gates.decode_config import DecodeGateConfig
    from seer.model.attention import prepare_model
    from seer.model.decode import attach_decode_gates, decode_gates
    from seer.sparsity.decode import DecodeSparsityConfig

    model = tiny_model("llama")
    prepare_model(model, block_size)
    ctx = attach_decode_gates(model, DecodeGateConfig(block_size=block_size, hidden_size=16))
    torch.manual_seed(1)
    for g in decode_gates(model).values():
        torch.nn.init.normal_(g.k_weight, std=2.0)
    if budget is not None:
        ctx.enable(DecodeSparsityConfig(**budget))
    return model


def padded_generation(model, new: int):
    """Greedy generation of ``new`` tokens for a left-padded batch of two prompts (45 and 26 tokens, seeded): its
    logits ``[new, 2, vocab]``, KV cache and attention mask."""
    g = torch.Generator().manual_seed(3)
    ids, mask, _, _ = padded_batch([torch.randint(3, 300, (n,), generator=g) for n in (45, 26)], "left")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=2,
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits), out.past_key_values, mask


def distill_records(model, plain, ids: torch.Tensor) -> list:
    """The distill-mode :class:`~seer.model.attention.LayerRecord` of every gated layer of ``model`` (gates attached)
    for ``ids``, after checking that its dense mode gives ``plain``'s (the same model without seer) logits."""
    ctx = model.seer_context
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)  # dense mode changes nothing
    records = []
    with ctx.running("distill", consumer=records.append), torch.no_grad():
        model.model(ids)
    return records
