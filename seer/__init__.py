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


def export(*args, **kwargs):
    """Write a gates folder as a Hugging Face Hub-ready folder (and push it); see :func:`seer.export_gates.export`."""
    from seer.export_gates import export as _export

    return _export(*args, **kwargs)


__all__ = ["export", "load", "__version__"]
