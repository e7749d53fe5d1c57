"""Write an untrained (random-weight) ControlNet in the official SD3.5 layout for a model, to try the ControlNet
path end to end without downloading one (its steering is meaningless, like the embedded model's images).

    python scripts/make_controlnet.py --out outputs/random_canny.safetensors              # for the embedded model
    python scripts/make_controlnet.py --model-dir DIR --blocks 12 --kind 8b --type canny --out net.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, help="the model it is for (default: the embedded random-weight set)")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--blocks", type=int, help="control blocks (default: half the model's blocks)")
    p.add_argument("--kind", choices=["8b", "2b"], default="8b",
                   help="which official variant (see mmditx/controlnet.py)")
    p.add_argument("--type", choices=["canny", "blur", "depth"], default="canny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from mmditx import read_config
    from mmditx.checkpoint import save_safetensors
    from mmditx.controlnet import official_state_dict, random_controlnet
    from sampling.embedded import model_dir_or_embedded
    from sampling.pipeline import ModelFiles

    model_dir, _ = model_dir_or_embedded(args.model_dir, "The ControlNet is made for it.")
    try:
        config = read_config(ModelFiles.from_dir(model_dir, t5="off").model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    blocks = args.blocks or max(1, config.depth // 2)
    if blocks < 1:
        raise SystemExit("error: --blocks must be at least 1")
    net = random_controlnet(config, blocks, args.kind, args.type, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(official_state_dict(net), args.out)  # written next to it and renamed: never a partial file
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
