"""A gate checkpoint as a Hugging Face Hub-ready folder: ``seer.export(gates_dir, out_dir)`` or
``python -m seer.export_gates GATES_DIR OUT_DIR [--repo-id user/name] [--push-to-hub] [--metrics metrics.json ...]``.

The folder holds the gate files as they are (``gates.safetensors``, ``gates.json`` with its sha256, and
``calibration.json`` when there is one), a ``config.json`` naming the base model with the gate and sparsity configs,
and a ``README.md`` model card: base model, training data and steps, measured density / recall / perplexity /
RULER where known (the run's ``summary.json`` beside the gates, and ``metrics.json`` files of ``seer.eval`` given
with ``metrics=``), license and how to load it. ``seer.load(base, gates=FOLDER or "user/name")`` reads it back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from seer.checks import ConfigError
from seer.files import atomic_write, atomic_write_text
from seer.model.gate_io import META, WEIGHTS, read_gate_meta
from seer.model.gate_sources import HUB_ID
from seer.sparsity.calibration import FILE as CALIBRATION, load_calibrations

CARD = "README.md"
CONFIG = "config.json"


def export(gates_dir: str | os.PathLike, out_dir: str | os.PathLike, push_to_hub: bool = False,
           repo_id: str | None = None, *, license: str = "other",
           metrics: Sequence[str | os.PathLike] = ()) -> Path:
    """Writes the Hub-ready folder of the gates in ``gates_dir`` into ``out_dir`` and returns it; with
    ``push_to_hub`` uploads it to ``repo_id`` (created if missing). ``metrics``: ``metrics.json`` files of
    ``seer.eval`` runs of these gates, tabulated in the card."""
    gates_dir, out_dir = Path(gates_dir), Path(out_dir)
    if push_to_hub and not repo_id:
        raise ConfigError("push_to_hub=True: needs repo_id='user/name', the Hub repository to upload to")
    if repo_id is not None and not HUB_ID.fullmatch(repo_id):
        raise ConfigError(f"repo_id={repo_id!r}: a Hub repository id has the form user/name")
    if gates_dir.is_file():
        gates_dir = gates_dir.parent
    if not (gates_dir / WEIGHTS).is_file():
        raise ConfigError(f"gates_dir={str(gates_dir)!r}: no {WEIGHTS} there (a gates folder written by seer.train)")
    if out_dir.resolve() == gates_dir.resolve():
        raise ConfigError(f"out_dir={str(out_dir)!r}: is the gates folder itself; export into a new folder")
    meta = read_gate_meta(gates_dir)  # whole and unaltered, or refused naming the file
    calibrations = load_calibrations(gates_dir)
    rows = [row for path in metrics for row in _metrics_rows(Path(path))]
    run = _run_facts(gates_dir)
    for name in (WEIGHTS, META) + ((CALIBRATION,) if calibrations else ()):
        atomic_write(out_dir / name, lambda tmp, src=gates_dir / name: shutil.copyfile(src, tmp))
    config = {"library_name": "seer", "format": meta["format"], "base_model": meta["base_model"],
              "model": meta["model"], "gate": meta["gate"], "sparsity": meta.get("sparsity"),
              "weights": WEIGHTS, "weights_sha256": json.loads((gates_dir / META).read_text()).get("weights_sha256"),
              "calibrations": [{"sparsity": c.sparsity.describe(), "scorer": c.selector, "seq_len": c.seq_len,
                                "density": c.density} for c in calibrations],
              "training": run, "results": rows, "source": meta.get("source")}
    atomic_write_text(out_dir / CONFIG, json.dumps(config, indent=2, default=str))
    atomic_write_text(out_dir / CARD, model_card(meta, run, calibrations, rows, license, repo_id or str(out_dir)))
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, commit_message="seer gates")
    return out_dir


def _metrics_rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
        keep = ("selector", "sparsity", "target_density", "density", "seq_len", "ppl", "ppl_dense", "recall",
                "oracle_recall", "ruler", "ruler_dense", "passkey", "passkey_dense")
        return [{k: row.get(k) for k in keep} for row in rows]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"metrics={str(path)!r}: not a metrics.json of seer.eval ({type(exc).__name__}: "
                          f"{exc})") from exc


def _run_facts(gates_dir: Path) -> dict:
    """What the training run beside the gates recorded (``summary.json``, Hydra's ``.hydra/``): steps, data and the
    last validation; empty for gates that came without their run (e.g. a converted release)."""
    import yaml

    for run in (gates_dir.parent, gates_dir.parent.parent):  # <run>/gates (distill), <run>/model/gates (finetune)
        if (run / "summary.json").is_file():
            break
    else:
        return {}
    summary = json.loads((run / "summary.json").read_text())
    facts = {k: summary.get(k) for k in ("steps", "loss_end", "sparsity_policy", "val_density", "val_recall",
                                         "val_oracle_recall", "val_loss")}
    hydra_dir = run / ".hydra"
    if (hydra_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((hydra_dir / "config.yaml").read_text()) or {}
        data = cfg.get("data") or {}
        corpus = data.get("corpus") or {}
        facts["data"] = {"corpus": corpus.get("_target_"), "seq_len": data.get("seq_len"),
                         "train_sequences": data.get("train_sequences"),
                         **{k: corpus[k] for k in ("paths", "data_files", "path", "name") if corpus.get(k)}}
        facts["stage"] = (cfg.get("stage") or {}).get("name")
    if (hydra_dir / "hydra.yaml").is_file():
        choices = ((yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) or {}).get("hydra") or {}) \
            .get("runtime", {}).get("choices", {})
        facts["options"] = {k: choices[k] for k in ("model", "gate", "data", "stage") if k in choices}
    return facts


def _load_lines(base: str, where: str) -> list[str]:
    """The card's loading example: the base model by its hub id, or a placeholder for one loaded otherwise (GGUF,
    a package, a local folder)."""
    if HUB_ID.fullmatch(base) and not Path(base).exists():
        return [f"model = seer.load({base!r}, gates={where!r})   # the gates' own budget below"]
    return [f"# MODEL: the base model {base} (a folder, or seer.model.ModelConfig fields for GGUF / package models)",
            f"model = seer.load(MODEL, gates={where!r})   # the gates' own budget below"]


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def model_card(meta: dict, run: dict, calibrations: list, rows: list[dict], license: str, where: str) -> str:
    """The ``README.md`` of an exported gates folder (Hub front matter, then what they are and how to load them)."""
    base, gate, sig = meta["base_model"], meta["gate"], meta["model"]
    front = ["---", "library_name: seer", f"license: {license}", "tags:", "- sparse-attention", "- seerattention"]
    if HUB_ID.fullmatch(base) and not Path(base).exists():
        front.append(f"base_model: {base}")
    front.append("---")
    q_side = "per token (log-mean-exp over each block)" if gate.get("q_tokens") else "+".join(gate["q_pool"])
    pools = f"Q {q_side}, K {'+'.join(gate['k_pool'])}"
    lines = [*front, "", f"# SeerAttention-style attention gates for {base}", "",
             "Block-sparse prefill gates (one AttnGate per attention layer) for the `seer` framework: they score every "
             "(query block, key block) pair from block-pooled Q and K, and a budget keeps the best blocks for a "
             "block-sparse attention kernel. Decode stays dense.", "",
             "## Use", "", "```python", "import seer", "",
             *_load_lines(base, where), "```", "",
             "## What they are", "",
             f"- base model: `{base}` ({sig['num_layers']} layers, {sig['num_heads']} query / {sig['num_kv_heads']} "
             f"key-value heads, head dim {sig['head_dim']})",
             f"- gate: blocks of {gate['block_size']} tokens; pools {pools}; width {gate['hidden_size']}; "
             f"Q projection {gate['q_linear']}; block RoPE {gate['block_rope']}; blend "
             f"{gate.get('blend') or 'none'}",
             f"- budget stored with them: {_describe(meta.get('sparsity'))}"]
    for c in calibrations:
        lines.append(f"- calibration: {c.sparsity.describe()} ({c.selector}) reached density {c.density:.3f} on "
                     f"{c.rows} rows of {c.seq_len} tokens")
    source = meta.get("source")
    if source:
        lines.append(f"- converted from a {source['format']} ({source['weights']}, sha256 {source['sha256'][:16]}...)")
    lines += ["", "## Training", ""]
    if run:
        data = run.get("data") or {}
        lines += [f"- stage: {run.get('stage') or 'distill'}; steps: {run.get('steps')}; options: "
                  f"{run.get('options') or 'n/a'}",
                  f"- data: {data.get('corpus') or 'n/a'}, {data.get('seq_len') or '?'}-token rows, "
                  f"{data.get('train_sequences') or '?'} training rows"
                  + "".join(f", {k}={data[k]}" for k in ("paths", "data_files", "path", "name") if k in data),
                  f"- last validation: density {_fmt(run.get('val_density'), '.3f')}, recall of attention mass "
                  f"{_fmt(run.get('val_recall'), '.3f')} (oracle at that density "
                  f"{_fmt(run.get('val_oracle_recall'), '.3f')}), under {run.get('sparsity_policy') or 'n/a'}"]
    else:
        lines.append("Not recorded with these gates (no training run beside them).")
    if rows:
        lines += ["", "## Measured (`python -m seer.eval`)", "",
                  "| tokens | scorer | budget | density | recall (oracle) | perplexity (dense) | RULER (dense) |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['seq_len']} | {r['selector']} | {r['sparsity']} {_fmt(r['target_density'], 'g')} | "
                         f"{_fmt(r['density'], '.3f')} | {_fmt(r['recall'], '.3f')} ({_fmt(r['oracle_recall'], '.3f')})"
                         f" | {_fmt(r['ppl'], '.3f')} ({_fmt(r['ppl_dense'], '.3f')}) | {_fmt(r['ruler'], '.1f')} "
                         f"({_fmt(r['ruler_dense'], '.1f')}) |")
    lines += ["", "## License", "", f"{license}", ""]
    return "\n".join(lines)


def _describe(sparsity: dict | None) -> str:
    if not sparsity:
        return "none stored (top-k when loaded)"
    from seer.checks import build
    from seer.sparsity.config import SparsityConfig

    return build(SparsityConfig, "sparsity", sparsity).describe()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seer.export_gates", description=__doc__.splitlines()[0])
    parser.add_argument("gates_dir", help="a gates folder written by seer.train (outputs/<run>/gates)")
    parser.add_argument("out_dir", help="the folder to write (Hub-ready)")
    parser.add_argument("--repo-id", help="user/name on the Hub (named in the card; where --push-to-hub uploads)")
    parser.add_argument("--push-to-hub", action="store_true", help="upload the folder to --repo-id")
    parser.add_argument("--license", default="other", help="the license named in the card (default: other)")
    parser.add_argument("--metrics", nargs="*", default=(), help="metrics.json files of seer.eval runs of the gates")
    args = parser.parse_args(argv)
    try:
        out = export(args.gates_dir, args.out_dir, args.push_to_hub, args.repo_id, license=args.license,
                     metrics=args.metrics)
    except ConfigError as exc:
        print(f"ConfigError: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {out}" + (f" and pushed to {args.repo_id}" if args.push_to_hub else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
