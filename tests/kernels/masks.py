"""Inputs for the kernel tests: fresh random shapes, random Q/K/V, and random block masks with the special rows
every kernel must get right."""

import torch


def random_qkv(b: int, hq: int, hkv: int, n: int, d: int, dtype: torch.dtype, gen: torch.Generator,
               transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard normal ``q [b, hq, n, d]``, ``k, v [b, hkv, n, d]`` on the CPU in ``dtype``; ``transpose``: stored
    ``[b, n, h, d]`` and seen as ``[b, h, n, d]`` (as Hugging Face attention layers hold them)."""
    def draw(h: int) -> torch.Tensor:
        if transpose:
            return torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, generator=gen).to(dtype)

    return draw(hq), draw(hkv), draw(hkv)


def special_mask(b: int, h: int, nb: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """A random bool ``[b, h, nb, nb]`` block mask (upper triangle left random: kernels must ignore it) with an empty
    first row (head 0), a diagonal-only row, a full row, a row without its diagonal, an empty row in the middle (last
    head) and the partial last block kept on its diagonal."""
    m = torch.rand(b, h, nb, nb, generator=gen) < density
    if nb >= 1:
        m[:, 0, 0, :] = False
    if nb >= 3:
        m[:, :, 1, :] = False
        m[:, :, 1, 1] = True
        m[:, :, 2, :] = True
    if nb >= 5:
        m[:, :, 4, 4] = False
        m[:, :, 4, 0] = True
        m[:, -1, 3, :] = False
    if nb >= 2:
        m[:, :, -1, -1] = True
    return m


def random_shape(seed: int, max_blocks: int):
    """A picker over a generator seeded with ``seed`` and a GQA shape drawn from it: ``(pick, hq, hkv, block, n)``
    with 1-2 KV heads, groups of 1, 2 or 4, blocks of 16 or 32 tokens and ``1 <= n < max_blocks * block`` (partial
    blocks included); ``pick(options)`` draws more settings from the same generator."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    hkv = pick([1, 2])
    hq = hkv * pick([1, 2, 4])
    block = pick([16, 32])
    return pick, hq, hkv, block, int(torch.randint(1, max_blocks * block, (1,), generator=gen))
