"""seer: learned block-sparse attention (SeerAttention-style gates) for Hugging Face causal LMs.

Inference needs only torch, triton and transformers: ``seer.load(...)`` returns a model whose prefill runs
gate -> block selection -> block-sparse attention. Training (``python -m seer.train``) adds Hydra, Lightning
and W&B, imported only there.
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a Hugging Face causal LM with trained gates for sparse prefill; see :func:`seer.model.inference.load`."""
    from seer.model.inference import load as _load

    return _load(*args, **kwargs)


__all__ = ["load", "__version__"]
