"""Finding a job's checkpoints (pure file-system reads, usable from the server)."""

from __future__ import annotations

from pathlib import Path


def latest_checkpoint(folder: Path) -> Path | None:
    """The highest-step `checkpoint-N` folder that the trainer finished writing, if any."""
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)
