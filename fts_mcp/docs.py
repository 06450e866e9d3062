"""The reference documents shipped in resources/docs, served as fts://docs/{topic}; and `settings`, the training
and adapter settings' reference, rendered from the models that validate them (so it cannot drift)."""

from __future__ import annotations

import json
from importlib.resources import files

from pydantic import BaseModel

from fts_mcp.training.spec import LoraSpec, TrainingSpec

DOC_TOPICS = ("lora", "qlora", "memory", "ft-vs-rag", "data-and-compute", "forgetting", "preference", "merging",
              "edge", "settings")


def _bounds(field) -> str:
    parts = []
    for item in field.metadata:
        for name, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(item, name, None) is not None:
                parts.append(f"{sign} {getattr(item, name)}")
    return ", ".join(parts)


def _kind(schema: dict) -> str:
    """A JSON schema property as a short type: `int`, `float or null`, `'cosine' / 'linear'`, `list of string`."""
    if "anyOf" in schema:
        return " or ".join(_kind(s) for s in schema["anyOf"])
    if "enum" in schema or "const" in schema:
        return " / ".join(repr(v) for v in schema.get("enum", [schema.get("const")]))
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_kind(schema.get('items', {}))}"
    return {"integer": "int", "number": "float", "boolean": "bool"}.get(kind, kind)


def _table(model: type[BaseModel], argument: str) -> list[str]:
    lines = [f"## `{argument}`", "", (model.__doc__ or "").strip(), "",
             "| setting | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    properties = model.model_json_schema()["properties"]
    for name, field in model.model_fields.items():
        kind = _kind(properties[name])
        default = json.dumps(field.get_default(call_default_factory=True))  # as an agent writes it: null, true
        lines.append(f"| `{name}` | {kind} | `{default}` | {_bounds(field)} | "
                     f"{field.description or ''} |")
    return lines + [""]


def settings_doc() -> str:
    return "\n".join(["# Training settings", "",
                      "start_qlora_job takes `lora` and `training` as objects; every key is optional. An unknown "
                      "key is refused with the closest known one.", "",
                      *_table(LoraSpec, "lora"), *_table(TrainingSpec, "training")])


def read_doc(topic: str) -> str:
    if topic == "settings":
        return settings_doc()
    return (files("fts_mcp.resources") / "docs" / f"{topic}.md").read_text(encoding="utf-8")
