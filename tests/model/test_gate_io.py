"""Gate files: a checksum in gates.json, checked on every read; damaged files are refused naming their path."""

import json

import pytest

from seer.checks import ConfigError
from seer.gates.config import GateConfig
from seer.model import attach_gates
from seer.model.gate_io import load_gates, read_gate_meta, save_gates
from tests.tiny import tiny_model


@pytest.fixture
def gate_folder(tmp_path):
    model = tiny_model()
    attach_gates(model, GateConfig(block_size=16, hidden_size=16))
    save_gates(tmp_path / "gates", model, "tiny")
    return tmp_path / "gates"


def test_round_trip_with_checksum(gate_folder):
    meta = json.loads((gate_folder / "gates.json").read_text())
    assert len(meta["weights_sha256"]) == 64
    assert read_gate_meta(gate_folder)["base_model"] == "tiny"
    assert load_gates(tiny_model(), gate_folder)["gate"]["block_size"] == 16


def test_a_flipped_bit_is_refused(gate_folder):
    weights = gate_folder / "gates.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"gate file {weights}: its sha256 differs"):
        load_gates(tiny_model(), gate_folder)


def test_a_truncated_file_is_refused_naming_it(gate_folder):
    weights = gate_folder / "gates.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"gate file {weights}"):
        read_gate_meta(gate_folder)
    with pytest.raises(ConfigError, match=f"gate file {weights}: not a seer gate file"):
        (gate_folder / "gates.json").write_text("{}")  # no checksum to compare: the reader still names the file
        read_gate_meta(gate_folder)


def test_a_gate_file_without_its_gates_json_is_refused(gate_folder):
    weights = gate_folder / "gates.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # altered, and nothing left to notice it with
    weights.write_bytes(bytes(data))
    (gate_folder / "gates.json").unlink()
    with pytest.raises(ConfigError, match=f"gate file {weights}: no gates.json beside it"):
        load_gates(tiny_model(), gate_folder)


def test_a_gates_json_edited_to_other_shapes_is_refused(gate_folder):
    meta = json.loads((gate_folder / "gates.json").read_text())
    meta["model"]["num_layers"] = 3
    (gate_folder / "gates.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"gates.json: model=.*'num_layers': 3.* differs from what gates.safetensors"):
        read_gate_meta(gate_folder)


def test_a_blend_weight_per_layer_round_trips_and_a_wrong_length_is_refused(tmp_path):
    import dataclasses

    model = tiny_model()
    gate = GateConfig(block_size=16, hidden_size=16, blend="vertical_slash", blend_weight=[0.75, 0.25])
    attach_gates(model, gate)
    save_gates(tmp_path / "gates", model, "tiny")
    assert json.loads((tmp_path / "gates" / "gates.json").read_text())["gate"]["blend_weight"] == [0.75, 0.25]
    fresh = tiny_model()
    load_gates(fresh, tmp_path / "gates")
    assert fresh.seer_context.gate_config == gate
    assert fresh.seer_context.scorer_name == gate.scorer_name
    with pytest.raises(ConfigError, match="has 3 weights, but the model has 2 layers"):
        load_gates(tiny_model(), tmp_path / "gates", expected_gate=dataclasses.replace(gate, blend_weight=[0.5] * 3))
