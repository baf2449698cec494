"""Model wrapping: load a Hugging Face causal LM (hub id, local folder, GGUF, or random weights), attach gates,
save and load gate checkpoints, and load a gated model for sparse-prefill inference."""

from seer.model.config import ModelConfig
from seer.model.attention import (LayerRecord, SeerContext, attach_gates, attention_layers, freeze_base_model,
                                  gate_parameters, gates)

__all__ = ["LayerRecord", "ModelConfig", "SeerContext", "attach_gates", "attention_layers", "freeze_base_model",
           "gate_parameters", "gates"]
