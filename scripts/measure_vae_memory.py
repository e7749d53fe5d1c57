"""Peak resident memory of VAE decoding, with and without tiles.

    .venv/bin/python scripts/measure_vae_memory.py                       # random full-size weights, 1024 and 2048
    .venv/bin/python scripts/measure_vae_memory.py --weights sd3.5_medium.safetensors --sizes 1024 1536 2048

Each (size, mode) runs in a fresh subprocess so its peak RSS (resource.ru_maxrss) is its own. Without
--weights, random weights in the official full-size layout are written to a temporary fp16 file first.
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

import torch  # noqa: E402

import vae  # noqa: E402
from mmditx.checkpoint import build_on_meta, expected_shapes, write_safetensors_streaming  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_random_vae(path: Path, seed: int = 0) -> Path:
    """Random weights in the official layout (`first_stage_model.*`, fp16): gains near 1, convs 1/sqrt(fan_in)."""
    shapes = expected_shapes(build_on_meta(lambda: vae.VAE()))
    g = torch.Generator().manual_seed(seed)

    def produce(key: str) -> torch.Tensor:
        shape = shapes[key[len("first_stage_model."):]]
        if len(shape) == 1:
            base = 1.0 if key.endswith("weight") else 0.0  # GroupNorm gains / biases
            return (base + 0.02 * torch.randn(shape, generator=g)).half()
        fan_in = shape[1] * shape[2] * shape[3]
        return (torch.randn(shape, generator=g) / fan_in ** 0.5).half()

    specs = {"first_stage_model." + k: (s, torch.float16) for k, s in shapes.items()}
    write_safetensors_streaming(specs, produce, path)
    return path


def child(weights: str, size: int, tiled: bool, dtype: str) -> dict:
    torch.manual_seed(0)
    model = vae.load_vae(weights, dtype=dtype)
    after_load = peak_rss_mib()
    latent = torch.randn(1, 16, size // 8, size // 8)
    start = time.perf_counter()
    image = model.decode(latent, tiled=tiled)
    seconds = time.perf_counter() - start
    return {"size": size, "tiled": tiled, "peak_rss_mib": round(peak_rss_mib()), "after_load_mib": round(after_load),
            "seconds": round(seconds, 1), "image": list(image.shape), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a file holding the SD3 VAE (default: random full-size weights)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square image sizes in pixels")
    parser.add_argument("--modes", nargs="+", default=["untiled", "tiled"], choices=["untiled", "tiled"])
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.weights, args.sizes[0], args.modes[0] == "tiled", args.dtype)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or str(write_random_vae(Path(tmp) / "vae_random_fp16.safetensors"))
        print(f"weights: {weights if args.weights else 'random, official full-size layout (fp16 file)'}; "
              f"compute dtype {args.dtype}; tiles {vae.TILE}x{vae.TILE} latent, overlap {vae.TILE_OVERLAP}")
        print(f"{'image':>11} {'mode':>8} {'peak RSS':>10} {'after load':>11} {'decode':>9}")
        for size in args.sizes:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--child", "--weights", weights, "--sizes", str(size),
                       "--modes", mode, "--dtype", args.dtype]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode != 0:
                    why = ("killed by SIGKILL: most likely out of memory (see dmesg)" if run.returncode == -9
                           else (run.stderr.strip().splitlines() or ["no message"])[-1])
                    print(f"{size:>5}x{size:<5} {mode:>8}  failed (exit {run.returncode}): {why}", flush=True)
                    continue
                r = json.loads(run.stdout.strip().splitlines()[-1])
                print(f"{size:>5}x{size:<5} {mode:>8} {r['peak_rss_mib']:>6} MiB {r['after_load_mib']:>7} MiB "
                      f"{r['seconds']:>7.1f} s", flush=True)


if __name__ == "__main__":
    main()
