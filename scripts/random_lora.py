"""Write a random-weight LoRA for a model file's transformer, in any supported format: something to try
`generate.py --lora` with on a fresh machine, and what `scripts/benchmark.py lora` applies.

    python scripts/random_lora.py --out demo_lora.safetensors                # for the embedded random model
    python scripts/random_lora.py --model ~/models/sd3.5_medium/sd3.5_medium.safetensors --rank 64 --format kohya --out r64.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a random LoRA for an SD3 transformer (a demo / benchmark input).")
    p.add_argument("--model", type=Path, help="the model file (default: the embedded random-weight model)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--format", choices=["diffusers", "kohya", "official"], default="diffusers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--magnitude", type=float, default=0.02, help="scale of each delta's entries (default 0.02)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import torch

    from mmditx import MMDiTX, read_config
    from mmditx.lora import random_lora_factors, save_lora
    from sampling.embedded import embedded_model_dir

    model_file = args.model or embedded_model_dir() / "sd3.5_medium.safetensors"
    try:
        config = read_config(model_file)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    with torch.device("meta"):
        shapes = MMDiTX(config)          # shapes only: no memory
    factors = random_lora_factors(shapes, args.rank, args.seed, args.magnitude)
    save_lora(args.out, factors, format=args.format, metadata={"mmditx_random_lora": f"rank {args.rank} seed {args.seed}"})
    print(f"wrote {args.out}: {len(factors)} layers, rank {args.rank}, {args.format} format, for {model_file.name}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
