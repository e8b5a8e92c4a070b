"""Atomic files: write to a temporary name, fsync, rename. A crash leaves the old file or the new one, never half of
either. Everything the package writes for later reading (checkpoints, caches, configs, results) goes through here."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), fsync it, and rename it onto `path`: readers see the old file or the new, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose a writable output directory") from None
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e} (the previous file, if any, is intact)") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def link_file(source: Path, target: Path) -> bool:
    """Hard-link `source` (a complete, fsynced file) as `target` and make the link durable; False where the file
    system cannot (another device, no hard links), for the caller to write the file instead."""
    try:
        os.link(source, target)
    except OSError:
        return False
    _fsync_dir(Path(target).parent)
    return True


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
