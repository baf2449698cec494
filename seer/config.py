"""The one route by which seer is configured: validated dataclass schemas, registered with Hydra.

Each component's schema lives beside the component it configures (as torchtitan and litgpt do):

* ``seer.gates.config.GateConfig`` - the gate architecture (group ``gate``)
* ``seer.sparsity.config.SparsityConfig`` - how block scores become a block mask (group ``sparsity``)
* ``seer.model.config.ModelConfig`` - the base model (group ``model``)
* ``seer.training.config`` - one schema per training stage (group ``stage``, chosen by ``stage.name``)
* ``seer.evaluation.config.EvalConfig`` - what ``seer.eval`` measures (group ``eval``)

Their dataclass defaults are the only defaults: :func:`register_configs` stores each schema in Hydra's
``ConfigStore`` as ``<group>/schema``, and every YAML option in ``conf/<group>/`` extends it, setting only what it
changes. Hydra then refuses unknown keys and wrong types while composing, and :func:`validate` builds the
dataclasses, whose ``__post_init__`` checks ranges, so a bad value fails at startup, before any model is loaded,
with a message that names the key and the value. The same dataclasses are the library's arguments
(``AttnGate(GateConfig(...))``, ``seer.load(ModelConfig(...), sparsity=SparsityConfig(...))``).

Third-party objects (the Lightning ``Trainer``, loggers, callbacks) and the data modules are built from ``_target_``
nodes with ``hydra.utils.instantiate``; their constructors check their own arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seer.checks import build
from seer.evaluation.config import EvalConfig
from seer.gates.config import GateConfig
from seer.model.config import ModelConfig
from seer.sparsity.config import SparsityConfig
from seer.training.config import STAGES, StageConfig, stage_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the Hydra config tree of a source checkout

# group -> schema, for the groups with one schema (``stage`` has one per stage: ``STAGES``)
SCHEMAS: dict[str, type] = {"gate": GateConfig, "sparsity": SparsityConfig, "model": ModelConfig, "eval": EvalConfig}


def register_configs() -> None:
    """Stores every schema in Hydra's ConfigStore (``gate/schema``, ``sparsity/schema``, ``model/schema`` and one
    ``stage/<name>_schema`` per stage), which the YAML options in ``conf/`` extend, and registers the resolver
    ``${seer.unique_id:}`` (6 random hex digits, the same everywhere in one config and in the jobs of one sweep) that
    run folders end with. Idempotent; entry points call it before ``@hydra.main`` composes."""
    import secrets

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("seer.unique_id", lambda: secrets.token_hex(3), use_cache=True, replace=True)
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=group, name="schema", node=schema)
    for name, schema in STAGES.items():
        store.store(group="stage", name=f"{name}_schema", node=schema)


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train"):
    """The config an entry point would see for these command-line ``overrides`` (a DictConfig, interpolations of
    ``hydra:`` resolved as in a real run, the ``hydra`` node removed): for experiments, notebooks and tests."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@dataclass
class RunConfig:
    """The validated groups of one training run."""

    model: ModelConfig
    gate: GateConfig
    sparsity: SparsityConfig
    stage: StageConfig


def validate(cfg: Any) -> RunConfig:
    """Validate the composed Hydra config (a DictConfig or a dict) and return its schemas."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    return RunConfig(model=build(ModelConfig, "model", plain.get("model")),
                     gate=build(GateConfig, "gate", plain.get("gate")),
                     sparsity=build(SparsityConfig, "sparsity", plain.get("sparsity")),
                     stage=stage_config(plain.get("stage")))
