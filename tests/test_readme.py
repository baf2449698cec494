"""The README's commands run as printed: every ``python -m seer.train|eval|generate`` line of its shell blocks parses
(shell quoting, then Hydra's override grammar) and composes into a config that passes the schemas, once its
``<placeholders>`` (a run folder's name) are filled in."""

import re
import shlex
from pathlib import Path

import pytest

from seer.config import compose, validate

README = Path(__file__).resolve().parents[1] / "README.md"
ENTRY_POINTS = {"seer.train": "train", "seer.eval": "eval", "seer.generate": "generate"}


def readme_commands() -> list[str]:
    """The entry-point command lines of the README's bash blocks (continuation lines joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", "-m"] and words[2] in ENTRY_POINTS:
                commands.append(line)
    return commands


def _single_job(args: list[str]) -> list[str]:
    """A sweep's overrides with each swept key at its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for override in OverridesParser.create().parse_overrides(args):
        if override.is_sweep_override():
            out.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
        else:
            out.append(override.input_line)
    return out


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_composes(line, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher") if "hydra/launcher" in line else None
    words = shlex.split(re.sub(r"<(\w+)>", r"2026-01-01_00-00-00_\1", line), comments=True)
    args = [w for w in words[3:] if w not in ("-m", "...")]
    cfg = compose(_single_job(args), ENTRY_POINTS[words[2]])
    assert cfg.task_name and cfg.model is not None  # composed with its model and task
    if ENTRY_POINTS[words[2]] == "train":
        from seer.training.config import STAGES

        assert validate(cfg).stage.name in STAGES  # every value checked, as seer.train does before loading


def test_the_readme_has_commands_of_every_entry_point():
    assert {shlex.split(line, comments=True)[2] for line in readme_commands()} == set(ENTRY_POINTS)
