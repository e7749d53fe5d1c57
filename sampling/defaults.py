"""A sampling preset (configs/sampling_<name>.json) as GenerationParams fields.

The presets are the only home of the sampling defaults: `GenerationParams`' field defaults and
`SkipLayerGuidance`'s are `DEFAULTS`, the default preset's values, so `GenerationParams(prompt=...)`, the
command line without options and the preset file describe the same run."""

from __future__ import annotations

from configs import DEFAULT_PRESET, PRESETS, load_sampling_preset

__all__ = ["DEFAULT_PRESET", "PRESETS", "DEFAULTS", "preset_fields"]


def preset_fields(name: str = DEFAULT_PRESET) -> dict:
    """The preset's values under GenerationParams' field names."""
    d = load_sampling_preset(name)
    slg = d["slg"]
    return dict(width=d["width"], height=d["height"], steps=d["steps"], cfg=d["cfg"], shift=d["shift"],
                sampler=d["sampler"], slg=slg["enabled"], slg_layers=tuple(slg["layers"]), slg_scale=slg["scale"],
                slg_start=slg["start"], slg_end=slg["end"])


DEFAULTS = preset_fields(DEFAULT_PRESET)
