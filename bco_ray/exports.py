"""Exported model directories (`train.export`): written so that a reader never takes a half
written model for a whole one, and so that bco-ray never deletes what it did not write.

    <export>/bco-ray-export.incomplete   present while an export is being written
    <export>/bco-ray-export.json         written last: format, version (unique per export),
                                         the files it wrote, when
    <export>/*.safetensors, config.json, tokenizer files, run_card.json, README.md, eval.json

A directory is a complete export when it holds the marker and not the `.incomplete` file.
Rewriting an export deletes only the files its marker lists (and the run card, README and
eval verdict that the train and eval stages add beside them); any other file stays. A
non-empty directory without a marker is someone else's: refused before training starts.
The version feeds the serving cache's key, so a re-export at the same URI is downloaded
again instead of being served from a stale copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from bco_ray import storage
from bco_ray.config import StorageConfig
from bco_ray.errors import UserError

MARKER = "bco-ray-export.json"
INCOMPLETE = "bco-ray-export.incomplete"
FORMAT = "bco-ray-export-v1"
ADDED_BESIDE = ("run_card.json", "README.md", "eval.json")  # written after the weights by later stages


def _names(fs: pafs.FileSystem, path: str) -> set[str]:
    if not storage.exists(fs, path):
        return set()
    return {i.path[len(path):].lstrip("/") for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File}


def read_marker(fs: pafs.FileSystem, path: str) -> dict | None:
    p = storage.join(path, MARKER)
    return json.loads(storage.read_bytes(fs, p)) if storage.exists(fs, p) else None


def check_target(uri: str, cfg: StorageConfig) -> None:
    """Before training: the export target is empty, absent or an earlier bco-ray export."""
    fs, path = storage.filesystem(uri, cfg)
    names = _names(fs, path)
    if names and MARKER not in names and INCOMPLETE not in names:
        shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
        raise UserError(f"train.export {uri} already holds files that bco-ray did not write ({shown})",
                        "point train.export at a new or empty directory (or one an earlier bco-ray export wrote)")


def write(local_dir: str, uri: str, cfg: StorageConfig, info: dict) -> dict:
    """Replace the export at `uri` with the files of `local_dir`, moved there (`local_dir` is
    gone afterwards); returns the new marker."""
    fs, path = storage.filesystem(uri, cfg)
    check_target(uri, cfg)
    fs.create_dir(path, recursive=True)
    storage.write_bytes(fs, storage.join(path, INCOMPLETE), json.dumps({"started": time.time()}).encode())
    old = read_marker(fs, path)
    if old is not None:
        fs.delete_file(storage.join(path, MARKER))  # from here on the directory reads as incomplete
        for name in set(old.get("files", [])) | set(ADDED_BESIDE):
            if storage.exists(fs, storage.join(path, name)):
                fs.delete_file(storage.join(path, name))
    files = sorted(str(p.relative_to(local_dir)) for p in Path(local_dir).rglob("*") if p.is_file())
    storage.move_files(local_dir, files, fs, path)
    marker = {"format": FORMAT, "version": uuid.uuid4().hex, "written_at": time.time(), "files": files, **info}
    storage.write_bytes(fs, storage.join(path, MARKER), json.dumps(marker, indent=1).encode())
    fs.delete_file(storage.join(path, INCOMPLETE))
    return marker


def require_complete(fs: pafs.FileSystem, path: str, uri: str) -> dict | None:
    """The marker of a complete export; None for a directory bco-ray did not export (a base
    model); an export still being written (or whose writer died) is an error."""
    if storage.exists(fs, storage.join(path, INCOMPLETE)):
        raise UserError(f"the model at {uri} is an export still being written, or one whose training died "
                        "while writing it", "wait for the training to finish, or export again")
    return read_marker(fs, path)


def cache_key(fs: pafs.FileSystem, path: str, uri: str) -> str:
    """What a local copy of the model at `uri` is keyed by: its export version, or for a
    directory bco-ray did not export, its files' names, sizes and modification times."""
    import hashlib

    marker = require_complete(fs, path, uri)
    if marker is not None:
        ident = marker["version"]
    else:
        infos = sorted((i.path, i.size, str(i.mtime)) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                       if i.type == pafs.FileType.File)
        ident = json.dumps(infos)
    return hashlib.sha256(f"{uri}\n{ident}".encode()).hexdigest()[:16]


@contextlib.contextmanager
def lock(path: str):
    """An exclusive lock on a local file (replicas of one node download one copy)."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
