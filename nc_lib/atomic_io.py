"""Atomic file writes: every file the kit writes goes to a temporary file in the same folder and is renamed into place.

A reader (or a process that resumes after a kill) therefore sees either the old file or the new one, never a
half-written one. Temporary files are named ``<name>.tmp<pid>``; :func:`remove_stale_temporaries` deletes those
left behind by a writer that was killed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

TMP_MARK = ".tmp"


def temporary_path(path: Path) -> Path:
    """The temporary sibling ``<name>.tmp<pid>`` that :func:`atomic_write_with` writes before renaming."""
    return path.with_name(path.name + f"{TMP_MARK}{os.getpid()}")


def atomic_write_with(path: Path, write: Callable[[Path], None], *, fsync: bool = True) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    On any error the temporary file is removed and the old ``path`` (if any) is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: str | bytes, *, fsync: bool = True) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_write_with(path, lambda tmp: tmp.write_bytes(payload), fsync=fsync)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write one JSON object per line atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` atomically."""
    import torch

    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temporaries(folder: Path, *, recursive: bool = True) -> list[Path]:
    """Delete ``*.tmp<pid>`` files under ``folder`` whose writer process ``pid`` is no longer alive on this host.

    Returns the removed paths. A temporary of a live process (a writer at work) is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in (folder.rglob if recursive else folder.glob)(f"*{TMP_MARK}*"):
        pid_text = p.name.rsplit(TMP_MARK, 1)[-1]
        if not pid_text.isdigit() or not p.is_file():
            continue
        if pid_alive(int(pid_text)):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
