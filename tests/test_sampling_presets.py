"""The sampling presets are the one home of the sampling defaults: the pipeline's defaults, the command line's,
SkipLayerGuidance's and instruments.anatomy's are the default preset file's values."""

import dataclasses
import json

from configs import CONFIG_DIR, DEFAULT_PRESET, PRESETS
from instruments import anatomy
from sampling.guidance import SkipLayerGuidance
from sampling.pipeline import GenerationParams
from scripts import generate

# the preset's keys and GenerationParams' field names, written out here once on purpose (not derived)
FIELDS = {"width": ("width",), "height": ("height",), "shift": ("shift",), "sampler": ("sampler",),
          "steps": ("steps",), "cfg": ("cfg",), "slg": ("slg", "enabled"), "slg_layers": ("slg", "layers"),
          "slg_scale": ("slg", "scale"), "slg_start": ("slg", "start"), "slg_end": ("slg", "end")}


def from_file(name: str) -> dict:
    raw = json.loads((CONFIG_DIR / f"sampling_{name}.json").read_text())
    values = {}
    for field, keys in FIELDS.items():
        v = raw
        for k in keys:
            v = v[k]
        values[field] = tuple(v) if isinstance(v, list) else v
    return values


def fields(params) -> dict:
    return {k: getattr(params, k) for k in FIELDS}


def test_default_preset_is_the_official_one():
    assert DEFAULT_PRESET == "sd3.5_medium" and set(PRESETS) == {"sd3.5_medium", "sd3.5_medium_model_card"}
    d = from_file(DEFAULT_PRESET)
    assert (d["sampler"], d["steps"], d["cfg"], d["shift"], d["slg"]) == ("dpmpp_2m", 50, 5.0, 3.0, True)


def test_pipeline_cli_and_preset_file_agree():
    file_values = from_file(DEFAULT_PRESET)
    pipeline = GenerationParams(prompt="a cat")
    cli = generate.build_params(generate.parse_args(["--prompt", "a cat"]), "a cat", None)
    assert fields(pipeline) == file_values
    assert fields(cli) == file_values
    assert cli == pipeline   # every other field too (seed, negative prompt, scheduler, ...)


def test_every_preset_reads_the_same_through_from_preset_and_the_cli():
    for name in PRESETS:
        cli = generate.build_params(generate.parse_args(["--prompt", "p", "--preset", name]), "p", None)
        assert fields(GenerationParams.from_preset(name, prompt="p")) == fields(cli) == from_file(name)


def test_slg_and_anatomy_read_the_default_preset():
    d = from_file(DEFAULT_PRESET)
    slg = SkipLayerGuidance()
    assert (slg.layers, slg.scale, slg.start, slg.end) == (d["slg_layers"], d["slg_scale"], d["slg_start"],
                                                          d["slg_end"])
    assert (anatomy.SLG_LAYERS, anatomy.SLG_START, anatomy.SLG_END, anatomy.STEPS) == (
        d["slg_layers"], d["slg_start"], d["slg_end"], d["steps"])
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationParams) if f.name in FIELDS}
    assert defaults == d
