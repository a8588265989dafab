"""Pydantic's validation errors as located, teaching messages (step 5 of `schemas.loader`).

Each error is placed at the field path where the user wrote the value; an unknown key gets the
closest allowed name ("did you mean `guidance_scale`?") or the list of allowed keys.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from schemas.loader import ErrorSink, Loc

# What A1111, ComfyUI and kohya call castbook's (diffusers') settings: a spec written from
# habit gets the right name, not a guess.
OTHER_TOOLS_SPELLINGS = {
    "cfg": "guidance_scale", "cfg_scale": "guidance_scale",
    "steps": "num_inference_steps", "sampling_steps": "num_inference_steps",
    "sampler": "scheduler", "sampler_name": "scheduler",
}


def _unwrap(tp: Any) -> list[Any]:
    """Annotated/Optional/Union → the concrete member types."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin is Union or (origin is not None and str(origin) == "types.UnionType"):
        out = []
        for arg in typing.get_args(tp):
            if arg is not type(None):
                out.extend(_unwrap(arg))
        return out
    if isinstance(tp, types.UnionType):
        return [m for a in tp.__args__ if a is not type(None) for m in _unwrap(a)]
    return [tp]


def fields_at(model_cls: type[BaseModel], loc: Loc) -> list[str]:
    """Field names allowed at `loc` (a path into data validated by `model_cls`)."""
    current: list[Any] = [model_cls]
    for part in loc:
        nxt: list[Any] = []
        for tp in current:
            for member in _unwrap(tp):
                origin = typing.get_origin(member)
                if isinstance(member, type) and issubclass(member, BaseModel):
                    if isinstance(part, str) and part in member.model_fields:
                        nxt.append(member.model_fields[part].annotation)
                    elif isinstance(part, str):
                        # a discriminator tag inside a union: stay on the member that owns it
                        tag = member.model_fields.get("type")
                        if tag is not None and part in (typing.get_args(tag.annotation) or ()):
                            nxt.append(member)
                elif origin is dict:
                    nxt.append(typing.get_args(member)[1])
                elif origin is list or origin is tuple:
                    if isinstance(part, int):
                        nxt.append(typing.get_args(member)[0])
        current = nxt
    names: list[str] = []
    for tp in current:
        for member in _unwrap(tp):
            if isinstance(member, type) and issubclass(member, BaseModel):
                names.extend(n for n in member.model_fields if n not in names)
    return names


def data_loc(data: Any, loc: Loc) -> Loc:
    """Drop the parts of a pydantic loc that are not in the data (union tags, validator names)."""
    out: list[Union[str, int]] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and part in current:
            out.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            out.append(part)
            current = current[part]
    return tuple(out)


def validation_errors(exc: ValidationError, data: Any, model_cls: type[BaseModel], sink: ErrorSink) -> None:
    for err in exc.errors(include_url=False):
        raw_loc = tuple(err["loc"])
        loc = data_loc(data, raw_loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            parent, key = loc[:-1], loc[-1] if loc else ""
            allowed = fields_at(model_cls, parent)
            other_tool = OTHER_TOOLS_SPELLINGS.get(str(key))
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            if other_tool in allowed:
                hint = f"castbook calls it `{other_tool}` (diffusers' name)"
            elif close:
                hint = f"did you mean `{close[0]}`?"
            else:
                hint = f"allowed: {', '.join(allowed)}"
            sink.add(loc, f"unknown key `{key}`; {hint}")
        elif kind == "missing":
            missing = raw_loc[-1] if raw_loc else "?"
            sink.add(loc, f"missing required key `{missing}`")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            if isinstance(value, (str, int, float, bool)) and kind != "value_error" and repr(value) not in msg:
                msg += f" (got {value!r})"
            if kind != "value_error" and msg:  # pydantic's own sentences; ours are already lower-case where they should be
                msg = msg[0].lower() + msg[1:]
            sink.add(loc, msg or kind)


def validate_model(model_cls: type[BaseModel], data: Any, sink: ErrorSink) -> BaseModel | None:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        validation_errors(exc, data, model_cls, sink)
        return None
