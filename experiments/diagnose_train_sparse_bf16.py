"""Why did ``test_triton_sparse_training_matches_the_reference_on_gpu`` fail in bf16? (GPU only; docs/gpu_tests.md)

The test's tiny Llama (2 layers, hidden 256, 4 / 2 heads, 1000 tokens, top-k 0.3 in ``train_sparse`` mode) is run with
the PyTorch reference and with the Triton kernel, and the loss and gradients compared (worst relative norm over the
parameters, the embedding's, and how many block-mask entries differ per layer):

1. as the test did (each run selects its own blocks), and the reference twice (is it deterministic?);
2. the Triton run replaying the reference's masks (``SeerContext.train_masks``): the kernel's numerics alone;
3. both in float32, with and without replayed masks; and bf16 against float32 (the scale of bf16 noise);
4. the kernel alone (:func:`seer.kernels.block_sparse_attn`, forward and backward) and the PyTorch reference, both in
   bf16, against a float64 reference on random inputs at 1000, 1024 and 4096 tokens.

    PYTHONPATH=. python experiments/diagnose_train_sparse_bf16.py
"""

from __future__ import annotations

import sys

import torch


def grads(kernel: str, masks=None, autocast: bool = True):
    from seer.gates.config import GateConfig
    from seer.model.attention import attach_gates
    from seer.sparsity import SparsityConfig
    from seer.training.finetune import causal_lm_loss
    from tests.tiny import tiny_model

    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2).cuda()
    ctx = attach_gates(model, GateConfig(block_size=64, hidden_size=64))
    ctx.update(mode="train_sparse", sparsity=SparsityConfig(method="topk", target_density=0.3), kernel=kernel)
    ctx.train_masks.update(masks or {})
    ids = torch.randint(0, 320, (1, 1000), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        loss = causal_lm_loss(hidden, model.lm_head, ids, 512)
    loss.backward()
    return (float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if ".seer_gate." not in n},
            dict(ctx.train_masks))


def compare(tag: str, a, b) -> None:
    (la, ga, ma), (lb, gb, mb) = a, b
    rel = {n: float((gb[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in ga.items()}
    worst = max(rel, key=rel.get)
    flips = {layer: int((ma[layer] != mb[layer]).sum()) for layer in ma if ma[layer] is not None}
    print(f"{tag}: loss {la:.5f} vs {lb:.5f}; worst relative gradient {rel[worst]:.4f} ({worst}); embedding "
          f"{rel['model.embed_tokens.weight']:.4f}; mask entries that differ per layer {flips}", flush=True)


def kernel_alone() -> None:
    from seer.kernels import block_sparse_attn as triton_attn
    from seer.kernels.reference import block_sparse_attn as reference_attn

    torch.manual_seed(1)
    for n in (1000, 1024, 4096):
        q, k, v = (torch.randn(1, h, n, 64, device="cuda") for h in (4, 2, 2))
        nb = -(-n // 64)
        causal = torch.ones(nb, nb, dtype=torch.bool, device="cuda").tril()
        mask = ((torch.rand(1, 4, nb, nb, device="cuda") < 0.3) | torch.eye(nb, dtype=torch.bool, device="cuda")) \
            & causal
        grad_out = torch.randn(1, 4, n, 64, device="cuda")
        got = {}
        for name, fn, dtype in (("float64 reference", reference_attn, torch.float64),
                                ("bf16 Triton", triton_attn, torch.bfloat16),
                                ("bf16 reference", reference_attn, torch.bfloat16)):
            x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            out, _ = fn(*x, mask, block_size=64, sm_scale=0.125)
            out.backward(grad_out.to(dtype))
            got[name] = [out.double()] + [t.grad.double() for t in x]
        for name in ("bf16 Triton", "bf16 reference"):
            errs = [float((a - b).norm() / b.norm()) for a, b in zip(got[name], got["float64 reference"])]
            print(f"kernel alone, N {n}, {name} against float64: relative error out / dq / dk / dv "
                  + " / ".join(f"{e:.4f}" for e in errs), flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("diagnose_train_sparse_bf16.py needs a CUDA GPU (none found)")
    ref, tri = grads("reference"), grads("triton")
    compare("bf16, each run its own masks (the old test)", ref, tri)
    compare("bf16, the reference twice", ref, grads("reference"))
    compare("bf16, Triton with the reference's masks (the test now)", ref, grads("triton", ref[2]))
    ref32 = grads("reference", autocast=False)
    compare("float32, each run its own masks", ref32, grads("triton", autocast=False))
    compare("float32, Triton with the reference's masks", ref32, grads("triton", ref32[2], autocast=False))
    compare("bf16 reference against float32 reference (bf16 noise)", ref32, ref)
    kernel_alone()


if __name__ == "__main__":
    main()
