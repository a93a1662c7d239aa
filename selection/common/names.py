"""User-supplied names are data: validated once where they enter, never trusted as paths or SQL.

Every name a user supplies (a task, subtask, pool source, selection method or model, from a
record, run config or ``$INSTRUCT_SELECT_MODELS``) goes through :func:`check_name`. Paths
built from such names go through :func:`path_under`, which refuses any that would leave the
storage root, and SQL identifiers or settings that cannot be passed as parameters go through
:func:`check_identifier` / :func:`check_memory_limit`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# Task, method and model names become partition keys and folder/file names: a conservative
# portable set ('|' separates multi-partition keys, so it is excluded too).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
# Subtasks and source names are only stored and displayed: free text, but one printable line
# without path separators, so they stay harmless should one ever be used in a path.
LABEL_MAX = 200
_LABEL_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f/\\\u2028\u2029\ud800-\udfff]")
NAME_KINDS = {
    "task": "name",
    "method": "name",
    "model": "name",
    "subtask": "label",
    "source": "label",
}
RESERVED = {"task": frozenset({"all"})}  # `all` names the multi-target selection
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# DuckDB's SET cannot take a parameter, so the value must be one this pattern allows.
MEMORY_LIMIT = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)


def check_name(value: Any, kind: str, where: str) -> str:
    """``value`` stripped, if it is a valid ``kind`` name (see NAME_KINDS); else ValueError naming ``where``."""
    if kind not in NAME_KINDS:
        raise ValueError(f"unknown name kind {kind!r}; expected one of {sorted(NAME_KINDS)}")
    shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80]) + "..."
    if not isinstance(value, str):
        raise ValueError(f"{where}: {kind} {shown} must be a string, got {type(value).__name__}")
    name = value.strip()
    if NAME_KINDS[kind] == "name":
        reserved = RESERVED.get(kind, frozenset())
        if not NAME.fullmatch(name) or name in reserved:
            also = f" and not one of {sorted(reserved)}" if reserved else ""
            raise ValueError(
                f"{where}: {kind} {shown} must be 1-64 characters of letters, digits, '_', '.', '-' "
                f"(starting with a letter or digit){also}"
            )
        return name
    if not name or len(name) > LABEL_MAX or _LABEL_FORBIDDEN.search(name) or not name.strip("."):
        raise ValueError(
            f"{where}: {kind} {shown} must be 1-{LABEL_MAX} printable characters on one line, "
            "without '/' or '\\' and not only dots"
        )
    return name


def path_under(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root/parts...``, refusing any part that could leave ``root`` (even through a symlink).

    Parts may hold '/' (nested folders) but no '..' component, no backslash, no NUL, and
    none may be empty or absolute; the resolved result must still lie under the resolved root.
    """
    base = Path(root).resolve()
    for part in parts:
        if (
            not isinstance(part, str)
            or not part
            or "\x00" in part
            or "\\" in part
            or os.path.isabs(part)
            or ".." in Path(part).parts
        ):
            raise ValueError(
                f"path part {part!r} under {base} must be a non-empty relative name without '..', '\\' or NUL"
            )
    path = base.joinpath(*parts)
    resolved = path.resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise ValueError(f"path {path} resolves to {resolved}, outside the storage root {base}")
    return path


def check_identifier(name: Any, where: str) -> str:
    """A SQL identifier safe to interpolate (letters, digits, '_'), else ValueError naming ``where``."""
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not a plain SQL identifier (letters, digits, '_', at most 63)")
    return name


def check_memory_limit(value: Any, where: str = "memory_limit") -> str:
    """A DuckDB memory limit such as ``1GB`` or ``512 MiB``, safe to put in a SET statement."""
    if not isinstance(value, str) or not MEMORY_LIMIT.fullmatch(value.strip()):
        raise ValueError(
            f"{where}: {value!r} is not a memory size like '1GB' or '512MiB' "
            "(a number then B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
        )
    return value.strip()
