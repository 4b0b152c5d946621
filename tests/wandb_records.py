"""Reading what W&B received: the records of an offline run, as ``wandb sync`` would upload them.

wandb 0.31 ships no reader for its ``.wandb`` files, so this walks the file's block framing
and parses each record with wandb's own protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import wandb
from wandb.proto import wandb_internal_pb2 as pb


def offline_records(run_dir: Path, run_id: str = "*") -> list[pb.Record]:
    """The records of the newest offline run (of id `run_id`) under `run_dir`, in the order W&B wrote them."""
    # `run.finish()` only informs wandb-core that the run is done; the service flushes and closes
    # the file after that returns. Shutting the service down waits for it, as a process exit does.
    wandb.teardown()
    # the last in name order is the newest
    folders = [f for f in sorted(run_dir.glob("wandb/offline-run-*")) if run_id in ("*", run_id_of(f))]
    return read_records(next(folders[-1].glob("run-*.wandb")))


def offline_runs(run_dir: Path) -> dict[str, list[pb.Record]]:
    """Every offline run under `run_dir` by id: the records of its newest folder."""
    wandb.teardown()
    ids = {run_id_of(folder) for folder in run_dir.glob("wandb/offline-run-*")}
    return {run_id: offline_records(run_dir, run_id) for run_id in sorted(ids)}


def run_id_of(folder: Path) -> str:
    """The run id in an offline folder's name: offline-run-<yyyymmdd_hhmmss>-<id>, then -<n> when
    another folder of that run started in the same second."""
    return folder.name.split("-")[3]


def read_records(path: Path) -> list[pb.Record]:
    """The records of one `.wandb` file."""
    data = path.read_bytes()
    # file header: ident, magic, version; then 32 KiB blocks of chunks (crc32, length, type, data)
    assert struct.unpack("<4sH", data[:6]) == (b":W&B", 0xBEE1)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if block - pos % block < 7 or kind == 0:  # zero padding up to the next block
            pos += block - pos % block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def records_of(records: list[pb.Record], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def items_of(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
