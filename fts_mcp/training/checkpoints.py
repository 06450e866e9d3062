"""Finding a job's checkpoints (pure file-system reads, usable from the server)."""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT = re.compile(r"checkpoint-(\d{1,12})")  # fullmatch: `$` lets a trailing newline in


def is_checkpoint(path: Path) -> bool:
    """A `checkpoint-N` folder that the trainer finished writing."""
    return CHECKPOINT.fullmatch(path.name) is not None and (path / "trainer_state.json").is_file()


def checkpoints(folder: Path) -> list[Path]:
    """The finished `checkpoint-N` folders in `folder`, lowest step first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_checkpoint(p)), key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(folder: Path) -> Path | None:
    """The highest-step `checkpoint-N` folder that the trainer finished writing, if any."""
    found = checkpoints(folder)
    return found[-1] if found else None
