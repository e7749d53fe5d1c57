"""Named configurations, kept as data and read from here by every package.

- `<name>.json`: transformer configurations inferred from the official files (mmditx.config.load_config).
- `sampling_<name>.json`: sampling presets, the only home of the sampling defaults (sampler, steps, cfg, shift,
  skip-layer guidance, image size). `GenerationParams`, `SkipLayerGuidance`, the command line and
  `instruments.anatomy` all read their defaults from the preset named `DEFAULT_PRESET`.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_PRESET = "sd3.5_medium"   # the official SD3.5 Medium settings (sd3_infer.py), as generate.py runs them
PRESETS = tuple(sorted(p.stem[len("sampling_"):] for p in CONFIG_DIR.glob("sampling_*.json")))


def load_sampling_preset(name: str = DEFAULT_PRESET) -> dict:
    """'sd3.5_medium' (official: dpmpp_2m, 50 steps, cfg 5.0, SLG) or 'sd3.5_medium_model_card' (euler, 40, 4.5)."""
    path = CONFIG_DIR / f"sampling_{name}.json"
    if not path.is_file():
        raise ValueError(f"no sampling preset named {name!r}: use one of {list(PRESETS)}")
    return json.loads(path.read_text())
