"""Peak resident memory and time of loading the transformer from the official single file and from the same
weights as a diffusers-format folder (sharded; names mapped and q/k/v fused while assigning).

    .venv/bin/python scripts/measure_formats_memory.py                 # full-size SD3.5 Medium, random fp16 weights
    .venv/bin/python scripts/measure_formats_memory.py --depth 6       # the first 6 blocks only (less disk and RAM)

The official-layout file is written to a temporary folder and its transformer written in diffusers' names and
shards (2 GB) by the code scripts/convert.py uses; each load runs in a fresh subprocess, so its peak RSS
(ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages


def child(path: str, dtype: str) -> dict:
    from mmditx import load_mmditx

    start = time.perf_counter()
    model = load_mmditx(path, dtype=dtype)
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "weights_gib": weights / 2**30}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=24, help="joint blocks to keep (24: the full model)")
    p.add_argument("--dtype", default="fp32", help="dtype to load into (fp32, or fp16 = as stored)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1])))
        return 0

    import torch

    from mmditx.checkpoint import open_safetensors
    from mmditx.diffusers_names import to_diffusers
    from sampling.model_formats import Tensors
    from tests.official import mmditx_layout, write_random_checkpoint

    dual = tuple(range(min(13, args.depth)))
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        tmp = Path(tmp)
        official = tmp / "official"
        official.mkdir()
        layout = mmditx_layout(hidden=1536, depth=args.depth, dual=dual, pos_max=384)
        write_random_checkpoint(layout, official / "sd3.5_medium.safetensors", torch.float16)
        folder = tmp / "transformer"
        Tensors().add(to_diffusers(open_safetensors(official / "sd3.5_medium.safetensors"))).write_sharded(
            folder, "diffusion_pytorch_model", 2 * 10**9, None)
        for name, path in (("official single file", official / "sd3.5_medium.safetensors"),
                           ("diffusers folder (sharded)", folder)):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), args.dtype], capture_output=True,
                                 text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:28s} load {r['seconds']:.2f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
                  f"for {r['weights_gib']:.2f} GiB of {args.dtype} weights ({r['peak_rss_gib'] / r['weights_gib']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
