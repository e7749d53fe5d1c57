"""The declared parameter table (sampling/metadata.py): strict types, ranges, required keys, nested records."""

from dataclasses import dataclass

import pytest

from sampling.metadata import MetadataError, RunSettings, checked, to_json_dict, validate
from sampling.pipeline import GenerationParams


@dataclass
class LoraSpec:   # the shape a feature's record takes (the LoRA helper adds its own in GenerationParams)
    file: str
    strength: float = checked(1.0, lo=-10, hi=10)


@dataclass
class WithLoras:
    loras: list[LoraSpec] = checked(default_factory=list)


def test_round_trip_keeps_every_field():
    params = GenerationParams(prompt="p", seed=3, slg=True, slg_layers=(1, 2), init_image="x.png", denoise=0.5)
    assert GenerationParams.from_dict(params.to_dict()) == params
    run = RunSettings(t5="fp8", dtype="bf16", device="cuda")
    assert RunSettings.from_dict(to_json_dict(run), "x") == run


@pytest.mark.parametrize("value,message", [
    ({"width": 64.0}, "width is 64.0; expected an integer"),
    ({"width": True}, "width is true; expected an integer"),
    ({"slg": 1}, "slg is 1; expected true or false"),
    ({"cfg": "5"}, 'cfg is "5"; expected a finite number'),
    ({"prompt": "a \udcff"}, "prompt is"),
    ({"init_image": 3}, "init_image is 3; expected a string or null"),
    ({"slg_layers": [7, -1]}, "slg_layers is (7, -1); it must be >= 0"),
    ({"slg_start": 1.5}, "slg_start is 1.5; it must be >= 0.0 and <= 1.0"),
    ({"denoise": 0}, "denoise is 0.0; it must be > 0.0"),
])
def test_strict_types_and_ranges(value, message):
    with pytest.raises(MetadataError, match="^x.png: ") as e:
        GenerationParams.from_dict({**GenerationParams(prompt="p").to_dict(), **value}, "x.png")
    assert message in str(e.value)


def test_nested_records_are_checked_field_by_field():
    assert validate(WithLoras, {"loras": [{"file": "a", "strength": 0.5}]}, "x")["loras"] == [LoraSpec("a", 0.5)]
    with pytest.raises(MetadataError, match=r"x.png: loras: strength is 50.0; it must be >= -10 and <= 10"):
        validate(WithLoras, {"loras": [{"file": "a", "strength": 50}]}, "x.png")
    with pytest.raises(MetadataError, match="x.png: loras: required parameter 'file' is missing"):
        validate(WithLoras, {"loras": [{"strength": 1}]}, "x.png")
    assert to_json_dict(WithLoras([LoraSpec("a")])) == {"loras": [{"file": "a", "strength": 1.0}]}
