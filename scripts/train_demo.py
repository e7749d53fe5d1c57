"""Rebuild the demo model from its seed: the shapes dataset, the VAE, the text encoders, the MMDiT-X.

    python scripts/train_demo.py                       # work in runs/demo, write the model set to runs/demo/model
    python scripts/train_demo.py --out sampling/demo_model    # replace the shipped model set

Every stage keeps its result in --work and is skipped when it is there, so a stopped run continues. About 90
minutes on a 2-core CPU (stage times go into the model set's demo.json). See docs/demo_model.md.
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

from scripts.errors import add_debug_flag, run_cli  # noqa: E402
from training.demo.train import DemoOptions, build_demo  # noqa: E402


def on_off(text: str) -> bool:
    if text.lower() not in ("on", "off", "true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")
    return text.lower() in ("on", "true", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the demo model (a tiny SD3 that draws shapes) from its seed.")
    p.add_argument("--work", type=Path, default=Path("runs/demo"), help="folder for the stages' results")
    p.add_argument("--out", type=Path, help="where to write the model set (default: WORK/model)")
    for f in fields(DemoOptions):
        kind = on_off if isinstance(f.default, bool) else type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                       metavar="on|off" if kind is on_off else None)
    add_debug_flag(p)
    args = p.parse_args(argv)
    opts = DemoOptions(**{f.name: getattr(args, f.name) for f in fields(DemoOptions)})
    out = args.out or args.work / "model"
    from mmditx.runtime import keep_freed_memory
    keep_freed_memory()   # reuse freed activations instead of faulting fresh pages in every step
    build_demo(args.work, out, opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
