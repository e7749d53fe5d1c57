"""Print the anatomy of an MMDiT-X model: parameters per component and block (dual-attention blocks marked),
FLOPs per forward pass and per sampling step, memory of the weights in fp32/fp16/bf16/fp8. No weights needed.

    python scripts/inspect_model.py sd3.5_medium [--resolution 1024] [--batch 2] [--tokens 154]
    python scripts/inspect_model.py path/to/sd3.5_medium.safetensors --resolution 1216x832
    python -m scripts.inspect_model sd3.5_large
    python scripts/inspect_model.py sd3.5_medium --controlnet net.safetensors    # and the ControlNet's FLOPs

A named config (configs/*.json) or a .json path is read as is; a checkpoint file is read from its header only.
--batch is the batch of one forward pass: 2 = one image with CFG (cond + uncond batched).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

import argparse  # noqa: E402

from mmditx import load_config, read_config, read_controlnet_config  # noqa: E402
from instruments.anatomy import controlnet_report, report  # noqa: E402
from mmditx.controlnet import check_compatible  # noqa: E402
from scripts.errors import add_debug_flag, bounded, run_cli  # noqa: E402


def resolution(text: str) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '1216x832' -> (width 1216, height 832)."""
    try:
        w, _, h = text.lower().partition("x")
        size = int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be N or WxH in pixels, e.g. 1024 or 1216x832; got {text!r}")
    if min(size) < 16 or max(size) > 65536 or size[0] % 16 or size[1] % 16:
        raise argparse.ArgumentTypeError(f"resolution {text!r}: each side must be a multiple of 16 between 16 and "
                                         "65536 pixels")
    return size


def config_of(model: str):
    """A checkpoint file (header only), a .json config, or a config name from configs/."""
    path = Path(model)
    if path.suffix == ".safetensors" or (path.is_file() and path.suffix != ".json"):
        return read_config(path), path.name
    return load_config(model), (path.stem if path.suffix == ".json" else model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="config name (sd3.5_medium, sd3.5_large, sd3_medium, tiny), "
                                      "a .json config or a .safetensors checkpoint")
    parser.add_argument("--resolution", type=resolution, default=(1024, 1024), help="image size: N or WxH pixels")
    parser.add_argument("--batch", type=bounded(int, 1, 4096), default=2,
                        help="batch of one forward pass (2 = one image with CFG)")
    parser.add_argument("--tokens", type=bounded(int, 1, 100000), default=154,
                        help="context tokens (77 CLIP + 77 T5 = 154)")
    parser.add_argument("--steps", type=bounded(int, 1, 100000), default=50,
                        help="sampling steps for the whole-run total")
    parser.add_argument("--controlnet", type=Path, metavar="FILE",
                        help="also the FLOPs of this ControlNet (file or diffusers folder, header only)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    try:
        config, name = config_of(args.model)
        width, height = args.resolution
        print(report(config, height=height, width=width, batch=args.batch, tokens=args.tokens,
                     name=name, steps=args.steps))
        if args.controlnet:
            net = read_controlnet_config(args.controlnet)
            check_compatible(net, config, str(args.controlnet))
            print("\n" + controlnet_report(net, config, height, width, args.batch, args.tokens, args.controlnet.name))
    except ValueError as e:  # ConfigError, CheckpointError and bad sizes are ValueErrors with a clear message
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
