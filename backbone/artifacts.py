"""A content-addressed cache of built artifacts (tokenizer + base model, SFT model, reward model).

An artifact lives in ``<root>/<kind>-<hash of its key>``: every job of a sweep that asks
for the same key gets the same folder. A folder counts only once it holds the ``COMPLETE``
marker, and it reaches its final name only by an atomic rename of a finished temporary
folder, so a build killed midway is never mistaken for a finished one. A file lock per
artifact makes concurrent jobs build it once: the first builds, the others wait and reuse.
Within one distributed run, rank 0 builds and the other ranks wait for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, ListConfig, OmegaConf

from backbone import distributed

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


def plain(obj: Any) -> Any:
    """Resolved configs, dataclasses and mappings, nested in any way, as plain JSON-able values."""
    if isinstance(obj, DictConfig | ListConfig):
        return plain(OmegaConf.to_container(obj, resolve=True, enum_to_str=True))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def config_hash(obj: Any) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of a (resolved) config or dict."""
    canonical = json.dumps(plain(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def artifact_folder(root: str | Path, kind: str, key: Mapping[str, Any]) -> Path:
    """Where the artifact ``kind`` made from ``key`` lives (built or not)."""
    return Path(root) / f"{kind}-{config_hash(key)}"


def get_or_build(root: str | Path, kind: str, key: Mapping[str, Any], build: Callable[[Path], None]) -> Path:
    """The folder of the artifact ``kind`` made from ``key``; ``build(folder)`` fills it on a miss.

    ``build`` writes into a fresh temporary folder; ``key.json`` and the marker are added
    after it returns, then the folder is renamed into place. If ``build`` raises, the
    temporary folder is left behind for inspection and removed by the next build.
    """
    final = artifact_folder(root, kind, key)
    root, name = final.parent, final.name
    root.mkdir(parents=True, exist_ok=True)
    if (final / COMPLETE).exists():
        logger.info("artifact cache hit: %s", final)
        return final
    if not distributed.is_main():
        return _wait_for(final)
    with FileLock(str(root / f"{name}.lock")):
        if (final / COMPLETE).exists():
            logger.info("artifact %s was built by another process while waiting", final)
            return final
        # under the lock nobody else builds this key: leftovers are from crashed builds
        for stale in root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a folder without the marker (copied by hand, say) is not trusted
            shutil.rmtree(final)
        tmp = root / f".tmp-{name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        logger.info("building artifact %s", final)
        build(tmp)
        (tmp / "key.json").write_text(json.dumps(plain(key), indent=2, sort_keys=True, default=str))
        (tmp / COMPLETE).touch()
        os.replace(tmp, final)
    return final


def _wait_for(final: Path, poll_s: float = 2.0) -> Path:
    """Ranks other than 0 of a distributed run wait for rank 0 to build (transformers saves on
    rank 0 only, and a stage is trained once, not per rank). No timeout: if rank 0 dies, the
    launcher stops every rank."""
    logger.info("waiting for rank 0 to build %s", final)
    while not (final / COMPLETE).exists():
        time.sleep(poll_s)
    return final
