"""Reading an offline W&B run in tests: the records its ``run-<id>.wandb`` file holds (what ``wandb sync`` uploads).

The file is W&B's transaction log: a 7-byte header (``:W&B``, a 2-byte magic, a version byte), then 32 KiB blocks of
records in LevelDB's log format (each piece: CRC-32 (4 bytes), length (2), kind (1: whole, 2: first, 3: middle,
4: last)), each record a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
PIECE_HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + PIECE_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < PIECE_HEADER:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + PIECE_HEADER])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        if pos + PIECE_HEADER + length > len(data):  # the writer is still appending this piece
            return
        pending += data[pos + PIECE_HEADER:pos + PIECE_HEADER + length]
        pos += PIECE_HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_run(run_dir: Path, finished: bool = True, timeout: float = 60.0) -> dict:
    """What an offline run recorded: id, name, group, tags, config (flat keys), history rows, artifacts
    ``{name: (type, [paths])}`` and the exit code (None if the run never finished). With ``finished``, waits for the
    exit record (W&B's service may still be writing the file when ``wandb.finish`` returns)."""
    from google.protobuf.message import DecodeError

    end = time.time() + timeout
    while True:
        try:
            run = _read(run_dir)
        except DecodeError:  # caught the service mid-write: a record's bytes are not all on disk yet
            if time.time() > end:
                raise
            run = None
        if run is not None and (not finished or run["exit_code"] is not None or time.time() > end):
            return run
        time.sleep(0.2)


def _read(run_dir: Path) -> dict:
    (log,) = Path(run_dir).glob("run-*.wandb")
    out = {"config": {}, "history": [], "artifacts": {}, "exit_code": None}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, name=record.run.display_name, group=record.run.run_group,
                       tags=list(record.run.tags))
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "artifact":
            out["artifacts"][record.artifact.name] = (record.artifact.type,
                                                      [m.path for m in record.artifact.manifest.contents])
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def offline_runs(folder: Path) -> list[Path]:
    """The offline run folders under ``folder`` (a run's output folder), oldest first."""
    return sorted(Path(folder).glob("**/wandb/offline-run-*"))
