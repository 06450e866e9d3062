"""Argument errors an agent fixes in one try: the argument's path, what was given, what is accepted, and for an
unknown field the closest known one — never a library's URL or its internal model names."""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fts_mcp.errors import InvalidArgument

M = TypeVar("M", bound=BaseModel)
MAX_SHOWN = 80


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names a model accepts at `loc` (its parent), for suggestions."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model is not None else []


# Names agents often use for a field, by the field they mean (difflib cannot see that `lr` is `learning_rate`).
SYNONYMS = {"lr": "learning_rate", "steps": "max_steps", "num_steps": "max_steps", "epoch": "epochs",
            "num_epochs": "epochs", "num_train_epochs": "epochs", "rank": "r", "lora_r": "r", "lora_alpha": "alpha",
            "lora_dropout": "dropout", "warmup": "warmup_ratio", "seq_len": "max_seq_len",
            "max_length": "max_seq_len", "grad_accum": "gradient_accumulation_steps", "bs": "batch_size"}


def closest(given: str, known: list[str]) -> str | None:
    """The known name an unknown one most likely means, or None."""
    if SYNONYMS.get(given) in known:
        return SYNONYMS[given]
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.5) or \
        [k for k in known if given.startswith(k) or k.startswith(given)][:1]
    return close[0] if close else None


def _describe_one(error: dict, prefix: str, model: type[BaseModel] | None) -> tuple[str, str]:
    # keep field names and list indices; drop the union-branch labels pydantic adds (literal['x'], list[...])
    loc = tuple(p for p in error["loc"] if isinstance(p, int) or (isinstance(p, str) and p.isidentifier()))
    path = ".".join([prefix] * bool(prefix) + [str(p) if not isinstance(p, int) else f"[{p}]" for p in loc])
    path = path.replace(".[", "[")
    kind, given = error["type"], error.get("input")
    if kind == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        close = closest(str(loc[-1]), known)
        hint = f"; did you mean {'.'.join([*path.split('.')[:-1], close])}?" if close else ""
        listed = f"; known: {', '.join(known)}" if known and not close else ""
        return path, f"not a known argument{hint}{listed}"
    if kind == "missing":
        return path, "required, and missing"
    message = error["msg"].replace("Input should be", "should be").replace("Value error, ", "")
    return path, f"{message}; got {_shown(given)}"


def describe_all(exc: ValidationError, *, prefix: str = "", model: type[BaseModel] | None = None,
                 see: str | None = None) -> list[tuple[str, str]]:
    """(argument path, message) for every problem pydantic found, in the words an agent acts on, one per path:
    an agent fixes them all in one try rather than one per call."""
    found: dict[str, str] = {}
    for error in exc.errors(include_url=False):
        path, message = _describe_one(error, prefix, model)
        found.setdefault(path, message)  # a union reports each branch's complaint; the first says enough
    if see and any(m.startswith("not a known argument") for m in found.values()):
        last = list(found)[-1]
        found[last] += f" (see {see})"
    return list(found.items())


def describe(exc: ValidationError, *, prefix: str = "", model: type[BaseModel] | None = None,
             see: str | None = None) -> tuple[str, str]:
    """(argument path, message) covering every problem: the first one's path, and each further problem appended
    as `; path: message` (callers show `path: message`)."""
    (path, message), *rest = describe_all(exc, prefix=prefix, model=model, see=see)
    return path, "; ".join([message, *(f"{p}: {m}" for p, m in rest)])


def parse(model: type[M], value: M | dict | None, *, param: str, see: str | None = None) -> M:
    """`value` as a `model`, or an `InvalidArgument` naming the field path (e.g. training.learning_rate)."""
    if value is None:
        return model()
    if isinstance(value, model):
        return value
    if not isinstance(value, dict):
        raise InvalidArgument(f"expected an object of settings, got {_shown(value)}" +
                              (f"; see {see}" if see else ""), param=param)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        path, message = describe(exc, prefix=param, model=model, see=see)
        raise InvalidArgument(message, param=path) from None
