"""Checks on the paths a command will write, made before any work so a bad path costs nothing.

An output must not be one of the command's inputs (writing it would destroy the input), nor another output, and
its folder must exist and be writable. Paths are compared as files (same inode) where both exist, else resolved.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot or must not be written; the message names the option and the path."""


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())


def check_outputs(
    outputs: Iterable[tuple[str, str | Path | None]],
    inputs: Iterable[tuple[str, str | Path | None]],
    directories: bool = False,
) -> None:
    """Refuse (OutputPathError) any output that is an input, lies inside an input folder, names the same file as
    another output, is a directory (or, with `directories`, an existing file), or whose folder is missing or not
    writable. `outputs` and `inputs` are (option, path) pairs; None paths are skipped."""
    inputs = [(flag, Path(path)) for flag, path in inputs if path is not None]
    seen: list[tuple[str, Path]] = []
    for flag, path in outputs:
        if path is None:
            continue
        path = Path(path)
        for in_flag, source in inputs:
            if _same(path, source) or _inside(path, source):
                what = "is" if _same(path, source) else "is inside"
                raise OutputPathError(
                    f"{flag} {path} {what} the input {in_flag} {source}: writing it would destroy the input; "
                    "choose another output path"
                )
            if directories and source.exists() and _inside(source, path):
                raise OutputPathError(
                    f"{flag} {path} holds the input {in_flag} {source}: replacing the folder would delete it; "
                    "choose another output folder"
                )
        for other_flag, other in seen:
            if _same(path, other):
                raise OutputPathError(
                    f"{flag} and {other_flag} both name {path}: give each output its own path"
                )
        if directories and path.exists() and not path.is_dir():
            raise OutputPathError(f"{flag} {path} is a file, not a folder: choose a folder path")
        if not directories and path.is_dir():
            raise OutputPathError(f"{flag} {path} is a directory: give a file name, e.g. {path / 'out'}")
        folder = path.parent
        while directories and not folder.exists():  # a new export folder's parents are created with it
            folder = folder.parent
        if not folder.is_dir():
            raise OutputPathError(f"{flag} {path}: the folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputPathError(f"{flag} {path}: the folder {folder} is not writable")
        if path.exists() and not directories and not os.access(path, os.W_OK):
            raise OutputPathError(f"{flag} {path} exists and is not writable")
        seen.append((flag, path))


WAV_SUFFIXES = (".wav",)
MP4_SUFFIXES = (".mp4", ".m4v")


def check_suffix(flag: str, path: str | Path, suffixes: tuple[str, ...], kind: str) -> None:
    """Refuse an output name whose extension says another format than the `kind` written to it (players pick
    the decoder from the extension, so `a.mp3` holding a WAV would not play)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        named = f"{path.suffix!r} names another format" if path.suffix else "it has no extension"
        raise OutputPathError(
            f"{flag} {path}: {kind} is written there but {named}; name it {path.with_suffix(suffixes[0]).name}"
        )
