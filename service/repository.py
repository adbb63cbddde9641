"""The model repository on disk: which models and versions are there, and which to serve.

``model_path`` is one ONNX file, or a directory holding

- Triton's layout, ``<repo>/<name>/<version>/model.onnx`` (version directories are positive
  integers, as in Triton): the directory names give the name and version; and
- plain ``<repo>/*.onnx`` files, named and versioned by their own metadata (what
  ``python -m training export`` writes).

Where a layout directory and the file's metadata disagree, the directory wins (it is what the
operator arranged, and what the URLs name); the disagreement is reported. Two entries with one
name and version: the layout one wins over a plain file, and between plain files the first path
in sorted order; the others are reported as conflicts.

A :class:`VersionPolicy` picks the versions to serve, as Triton's ``version_policy`` does:
``latest:N`` (default ``latest:1``), ``all``, or ``specific:1,3``. Nothing here loads a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from service.onnx_meta import NotOnnx, read_metadata_props

LAYOUT_FILE = "model.onnx"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Found:
    """One model version on disk."""

    name: str
    version: str
    path: Path
    signature: tuple[int, int, int]  # (mtime_ns, size, inode): a changed file is a new load
    note: str = ""  # e.g. the metadata names another model; shown in /v1/models


@dataclass(frozen=True)
class Problem:
    """Something in the repository that cannot be served, with why."""

    path: Path
    reason: str
    name: str = ""
    version: str = ""


def version_key(version: str) -> tuple[int, int, str]:
    """Numeric versions in numeric order, after them any others in text order."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class VersionPolicy:
    """Which of a model's versions are served: ``latest:N``, ``all`` or ``specific:V,...``."""

    def __init__(self, text: str) -> None:
        self.text = text.strip()
        kind, _, arg = self.text.partition(":")
        self.latest: int | None = None
        self.specific: frozenset[str] | None = None
        if kind == "latest" and arg.strip().isdigit() and int(arg) >= 1:
            self.latest = int(arg)
        elif kind == "specific" and arg.strip():
            self.specific = frozenset(v.strip() for v in arg.split(",") if v.strip())
        elif self.text != "all":
            raise ValueError(f"version policy {text!r}: use 'latest:N' (N >= 1), 'all' or "
                             f"'specific:V1,V2'")

    def select(self, versions: list[str]) -> list[str]:
        """The versions to serve among ``versions``, newest first."""
        ordered = sorted(set(versions), key=version_key, reverse=True)
        if self.latest is not None:
            return ordered[: self.latest]
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered

    def __str__(self) -> str:
        return self.text


def _identity(path: Path) -> tuple[str, str] | str:
    """(name, version) from the file's metadata, or why it cannot be read."""
    try:
        props = read_metadata_props(path)
    except (OSError, NotOnnx) as exc:
        return f"not a readable ONNX file: {exc}"
    if "imgserve.labels" not in props:
        return "no imgserve metadata: export it with `python -m training export`"
    return props.get("imgserve.model_name", path.stem), props.get("imgserve.model_version", "1")


def _plain(path: Path) -> Found | Problem:
    ident = _identity(path)
    if isinstance(ident, str):
        return Problem(path, ident, path.stem, "")
    name, version = ident
    if not NAME.match(name) or not NAME.match(version):
        return Problem(path, f"metadata name {name!r} or version {version!r} is not usable in "
                             f"a URL (letters, digits, '_', '.', '-')", name, version)
    return Found(name, version, path, signature(path))


def _layout(model_dir: Path) -> tuple[list[Found], list[Problem]]:
    found: list[Found] = []
    problems: list[Problem] = []
    name = model_dir.name
    for vdir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        if not vdir.name.isdigit() or int(vdir.name) < 1:
            continue  # not a version directory (Triton ignores these too)
        version = str(int(vdir.name))
        path = vdir / LAYOUT_FILE
        if not path.is_file():
            problems.append(Problem(path, f"{LAYOUT_FILE} not found", name, version))
            continue
        ident = _identity(path)
        note = ""
        if isinstance(ident, str):  # kept: loading it reports the failure in full
            note = ident
        elif ident != (name, version):
            note = (f"its metadata says {ident[0]!r} version {ident[1]!r}; the directory "
                    f"({name!r} version {version!r}) wins")
        found.append(Found(name, version, path, signature(path), note))
    return found, problems


def scan(root: Path) -> tuple[list[Found], list[Problem]]:
    """Every model version under ``root`` (a file or a repository directory), and problems."""
    if root.is_file():
        item = _plain(root)
        return ([item], []) if isinstance(item, Found) else ([], [item])
    if not root.is_dir():
        return [], [Problem(root, "no such file or directory")]
    found: list[Found] = []
    problems: list[Problem] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue  # hidden: half-written copies, editors' files
        try:
            if entry.is_dir() and NAME.match(entry.name):
                f, p = _layout(entry)
                found += f
                problems += p
            elif entry.is_file() and entry.suffix == ".onnx":
                item = _plain(entry)
                (found if isinstance(item, Found) else problems).append(item)  # type: ignore[arg-type]
        except OSError as exc:  # removed while scanning: the next scan sees the new state
            problems.append(Problem(entry, f"unreadable: {exc}"))
    return _without_conflicts(found, problems)


def _without_conflicts(found: list[Found],
                       problems: list[Problem]) -> tuple[list[Found], list[Problem]]:
    # Layout entries first (they win), then plain files in path order.
    ordered = sorted(found, key=lambda f: (f.path.name != LAYOUT_FILE, str(f.path)))
    kept: dict[tuple[str, str], Found] = {}
    for item in ordered:
        key = (item.name, item.version)
        if key in kept:
            problems.append(Problem(item.path, f"{item.name!r} version {item.version!r} is "
                                    f"already served from {kept[key].path}", *key))
        else:
            kept[key] = item
    return list(kept.values()), problems
