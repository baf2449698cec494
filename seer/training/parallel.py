"""Training on several processes (``trainer=ddp``, ``trainer=fsdp``), for every stage.

* **DDP** (Lightning's ``DDPStrategy``), when the frozen base fits on one GPU: :func:`exclude_frozen_from_ddp` tells
  DDP to leave every parameter that does not train, and every buffer, alone, so only the trained parameters (the
  gates, in distillation) are broadcast at the start and all-reduced after each backward.
* **FSDP2** (:class:`ShardedGateStrategy`, Lightning's ``ModelParallelStrategy`` as pure data parallelism), when it
  does not: a stage's ``configure_model`` calls :func:`shard_model`, which shards each decoder layer's own weights,
  the embeddings with the final norm, the LM head, and all gates together, each group with ``fully_shard`` over all
  processes (the groups keep their dtypes: a bfloat16 base, float32 gates). The model is built on the meta device
  and each group gets its weights on the GPU just before it is sharded (drawn, or read from safetensors files; a
  model that cannot be read so is loaded on the CPU in each process). Checkpoints
  gather the trained parameters only, into one file; the fine-tune stage's model export gathers the whole model
  (:func:`full_state_dict`).

Either way each process reads its own share of the training rows (:mod:`seer.data.resumable`), validation rows are
read by all, and only global rank 0 writes files and logs.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


def exclude_frozen_from_ddp(module: nn.Module) -> None:
    """Marks ``module``'s frozen parameters and its buffers as ignored by DDP (no broadcast, no all-reduce)."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)


def shard_model(model: nn.Module, mesh) -> None:
    """``fully_shard`` over ``mesh`` (1-D): all gates as one group first (so the groups below leave them out), each
    decoder layer, the decoder itself (embeddings, final norm: stages call it directly), the LM head (the fine-tune
    loss calls it directly, chunk by chunk), then the model. Gates and the LM head stay gathered from their forward to
    their backward, other base weights for each group's forward only. A head tied to the embeddings is no group of
    its own: the decoder's group holds the weight and stays gathered (:func:`tied_head`). A base built on the meta
    device gets its weights (drawn, or read from its safetensors files) one group at a time on this process's device,
    just before the group is sharded, so the full model never exists in one place."""
    from torch.distributed.fsdp import fully_shard

    from seer.model.attention import gates
    from seer.model.decode import decode_gates
    from seer.model.loading import materialize

    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"

    def shard(modules: list[nn.Module], **options) -> None:
        if hasattr(model, "seer_weights"):  # built on the meta device: weights given group by group
            for module in modules:
                materialize(model, device, module)
        fully_shard(modules, mesh=mesh, **options)

    gate_modules = list(gates(model).values()) + list(decode_gates(model).values())  # prefill and decode gates
    if gate_modules:
        fully_shard(gate_modules, mesh=mesh, reshard_after_forward=False)
    for layer in model.base_model.layers:
        shard([layer])
    if tied_head(model):  # the head's weight is the embeddings': the decoder's group holds it, kept gathered
        shard([model.base_model], reshard_after_forward=False)
    else:
        shard([model.base_model])
        shard([model.get_output_embeddings()], reshard_after_forward=False)
    shard([model])


def tied_head(model: nn.Module) -> bool:
    """Whether ``model``'s LM head uses its input embeddings' weight (read from the config: sharding unties the two
    parameter objects)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False))


class ShardedGateStrategy(ModelParallelStrategy):
    """FSDP2 over all processes (data parallel only); the stage's ``configure_model`` shards the model with
    :func:`shard_model`. Checkpoints hold the trained parameters gathered in full (one file written by rank 0), so
    they load like a single-process checkpoint."""

    shards_base = True  # run_training builds the base on the meta device; shard_model gives each group its weights

    def __init__(self, **kwargs: Any):
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer's state as Lightning saves it, after :func:`reshard` (the state is keyed by the sharded
        parameters)."""
        reshard(self.lightning_module)
        return super().optimizer_state(optimizer)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trained parameters in full on rank 0 (every rank takes part in gathering them), read from the sharded
        parameters (:func:`reshard`: gathered ones live in a buffer that cannot be saved); the frozen base is reloaded
        from its source on resume, as in a single-process run."""
        reshard(self.lightning_module)
        state = {}
        for name, param in self.lightning_module.named_parameters():
            if param.requires_grad:
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                state[name] = full.detach().cpu()
        return state if self.global_rank == 0 else {}


def reshard(module: nn.Module) -> None:
    """Shards again every FSDP2 group of ``module`` that is gathered. The gates' group stays gathered from its
    forward to its backward (``reshard_after_forward=False``), so a forward without backward (validation, the
    calibration at the end of training) leaves the modules holding the gathered parameters instead of the sharded
    ones the optimizer holds; a checkpoint then could not map the optimizer's state to parameter names."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def full_state_dict(model: nn.Module) -> dict:
    """``model``'s state dict in full on the CPU: on global rank 0 for a sharded model (every process takes part; the
    others get an empty dict), ``model.state_dict()`` otherwise."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def configure_sharding(module) -> None:
    """What a stage's ``configure_model`` does: shard ``module.model`` when the strategy made a device mesh
    (``trainer=fsdp``); nothing otherwise. Idempotent."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None or getattr(module, "_sharded", False):
        return
    shard_model(module.model, mesh["data_parallel"])
    module._sharded = True
