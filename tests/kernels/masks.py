"""Block masks for the kernel tests: random, with the special rows every kernel must get right."""

import torch


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
