"""Named sampling defaults (configs/sampling_<name>.json)."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_sampling_defaults(name: str = "sd3.5_medium") -> dict:
    """'sd3.5_medium' (official: dpmpp_2m, 50 steps, cfg 5.0, SLG) or 'sd3.5_medium_model_card' (euler, 40, 4.5)."""
    path = CONFIG_DIR / f"sampling_{name}.json"
    if not path.is_file():
        names = sorted(p.stem[len("sampling_"):] for p in CONFIG_DIR.glob("sampling_*.json"))
        raise ValueError(f"no sampling defaults named {name!r}: use one of {names}")
    return json.loads(path.read_text())
