"""Files we write are whole or absent and get the mode the user's umask gives a new file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from soundreactor import files
from soundreactor.checkpoint import load_checkpoint, save_checkpoint
from soundreactor.config import preset


@pytest.fixture
def umask():
    """Set the process umask for one test and put the previous one back."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_checkpoints_get_the_umask_mode(tmp_path: Path, umask, mask: int) -> None:
    """safetensors creates its files 0600: a checkpoint would be unreadable to a server running as another user."""
    umask(mask)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, preset("tiny"), {"w": torch.ones(3)})
    assert mode(path) == 0o666 & ~mask
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it
    files.write_text(tmp_path / "report.json", "{}")
    assert mode(tmp_path / "report.json") == 0o666 & ~mask


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, preset("tiny"), {"w": torch.ones(3)})
    before = path.read_bytes()

    def torn(temp: Path) -> None:
        temp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.atomic_write(path, torn)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]
    _, tensors = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.ones(3))
