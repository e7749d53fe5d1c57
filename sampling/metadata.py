"""The parameters stored in every PNG, and their checks: one declared field table per dataclass.

A field's type comes from its annotation; its allowed range (if any) from `checked(...)`:

    steps: int = checked(40, lo=1, hi=MAX_STEPS)

`validate(cls, values, source)` checks a dict (a PNG's metadata, a preset, command-line values) against that
table and raises `MetadataError` naming the source, the field, the value and what is allowed. A feature that
adds a parameter declares it once, as a field with its range; writing, reading and checking follow from that.
Types: int, float (finite), str (valid UTF-8), bool (strict: "false" is not false), `X | None`, `tuple[X, ...]`,
`list[X]`, and nested dataclasses (records, e.g. `loras: list[LoraSpec] = checked(default_factory=list)` with
`LoraSpec` a dataclass of file, strength and hash, each field checked the same way).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

METADATA_KEY = "mmditx"  # PNG tEXt chunk holding the JSON of every generation parameter
MAX_METADATA = 1 << 20   # bytes of JSON we are willing to parse from an image


class MetadataError(ValueError):
    """Stored or given parameters that cannot be used; the message names the field and what is allowed."""


class NestedError(TypeError):
    """A nested record's own problem (carried up to name the outer field too)."""


def checked(default=dataclasses.MISSING, *, lo=None, hi=None, lo_open: bool = False, choices=None,
            default_factory=dataclasses.MISSING):
    """A dataclass field with an allowed range [lo, hi] (lo excluded when `lo_open`) or a set of choices."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "an object {" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp, value):
    """`value` as type `tp`, or raise TypeError. Strict: "64" is not an int, 1 is not a bool, 1.5 not an int."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value)
            except TypeError:
                pass
        raise TypeError
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [_convert(args[0], v) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is type(None):
        if value is not None:
            raise TypeError
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        if not math.isfinite(value):
            raise TypeError
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 on the command line
            raise TypeError from None
        return value
    if tp is typing.Any:
        return value
    if dataclasses.is_dataclass(tp):   # a nested record, e.g. one LoRA {file, strength, sha256}
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError
        try:
            return tp(**validate(tp, value, "", require=True))
        except MetadataError as e:
            raise NestedError(str(e)) from None
    if not isinstance(value, tp):
        raise TypeError
    return value


def _check_range(f: dataclasses.Field, value) -> str | None:
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        return f"one of {', '.join(map(str, m['choices']))}"
    lo, hi = m.get("lo"), m.get("hi")
    values = value if isinstance(value, (tuple, list)) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if lo is not None and (v < lo or (m.get("lo_open") and v == lo)) or hi is not None and v > hi:
            low = "" if lo is None else f"{'>' if m.get('lo_open') else '>='} {lo}"
            high = "" if hi is None else f"<= {hi}"
            return " and ".join(s for s in (low, high) if s)
    return None


def validate(cls, values: dict, source: str, require: bool = False, partial: bool = False) -> dict:
    """Check `values` against the fields of dataclass `cls`; return them converted ({name: value}).

    require: fields without a default must be present (stored metadata). partial: check only the keys given.
    Unknown keys are ignored (they belong to another table, or to a newer version)."""
    if not isinstance(values, dict):
        raise MetadataError(f"{source or 'parameters'}: expected a JSON object of parameters, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    prefix = f"{source}: " if source else ""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if require and no_default and not partial:
                raise MetadataError(f"{prefix}required parameter {f.name!r} is missing")
            continue
        value = values[f.name]
        try:
            value = _convert(hints[f.name], value)
        except NestedError as e:
            raise MetadataError(f"{prefix}{f.name}: {e}") from None
        except TypeError:
            expected = _describe(hints[f.name]).replace("a number", "a finite number")
            raise MetadataError(f"{prefix}{f.name} is {json.dumps(value, default=str)[:80]}; expected {expected}"
                                ) from None
        problem = _check_range(f, value)
        if problem:
            raise MetadataError(f"{prefix}{f.name} is {value!r}; it must be {problem}")
        out[f.name] = value
    return out


def to_json_dict(obj) -> dict:
    """A dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


@dataclass
class LoraRecord:
    """One LoRA an image was made with (sampling/loras.py): found again by name, refused if its content changed."""
    file: str                                 # the file's name
    path: str                                 # where it was
    sha256: str                               # of the file's bytes
    strength: float


@dataclass
class RunSettings:
    """What changes pixels besides the sampling parameters: how the models run. Stored next to GenerationParams."""
    t5: str = checked("fp16", choices=("fp16", "fp8", "off"))   # T5 file/precision (fp8 vs fp16 differs)
    dtype: str = checked("fp32", choices=("fp32", "fp16", "bf16"))  # compute dtype of the models
    device: str = checked("cpu", choices=("cpu", "cuda", "mps", "xpu"))   # device kind (kernels differ)
    model: str = ""                           # the model file's name (for the record)
    embedded_random_weights: bool = False
    demo_model: bool = False                  # the shipped demo model (sampling/demo_model/)
    loras: list[LoraRecord] = checked(default_factory=list)   # in the order applied

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "RunSettings":
        return cls(**validate(cls, d, source))


def read_png_metadata(path: str | os.PathLike) -> dict:
    """The JSON dict stored by `io.save_png` in an image, with one-line errors for everything else."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: not a file (give a PNG written by generate.py)")
    try:
        with Image.open(path) as im:
            text = im.text.get(METADATA_KEY) if hasattr(im, "text") else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MetadataError(f"{path}: not a readable image ({e})") from None
    if text is None:
        raise MetadataError(f"{path}: no mmditx generation metadata in this image (was it written by generate.py?)")
    if len(text) > MAX_METADATA:
        raise MetadataError(f"{path}: metadata of {len(text)} characters is larger than the {MAX_METADATA} allowed")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise MetadataError(f"{path}: the mmditx metadata is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MetadataError(f"{path}: the mmditx metadata is not a JSON object")
    return data
