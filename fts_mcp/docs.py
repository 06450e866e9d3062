"""The reference documents shipped in resources/docs, served as fts://docs/{topic}."""

from __future__ import annotations

from importlib.resources import files

DOC_TOPICS = ("lora", "qlora", "memory", "ft-vs-rag", "data-and-compute", "forgetting", "merging", "edge")


def read_doc(topic: str) -> str:
    return (files("fts_mcp.resources") / "docs" / f"{topic}.md").read_text(encoding="utf-8")
