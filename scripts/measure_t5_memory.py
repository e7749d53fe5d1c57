"""Peak resident memory of T5-XXL encoding with the fp16 and the fp8 checkpoint (fp32 compute on CPU).

    .venv/bin/python scripts/measure_t5_memory.py                   # random full-size weights, written to /tmp
    .venv/bin/python scripts/measure_t5_memory.py --blocks 6        # fewer blocks, for small machines
    .venv/bin/python scripts/measure_t5_memory.py --fp16 t5xxl_fp16.safetensors --fp8 t5xxl_fp8_e4m3fn.safetensors

Each file is loaded and run in a fresh subprocess so its peak RSS (VmHWM, which counts the memory-mapped
file pages the weights are read from) is its own. Without files, random weights in the official
layout are written streaming to a temporary directory (fp16: 9.5 GB, fp8: 4.8 GB for 24 blocks) and deleted
afterwards. Both loads use encoders.load_t5's defaults: matrices stay in the stored dtype and are upcast to
fp32 one at a time while computing.
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

import encoders  # noqa: E402
from mmditx.checkpoint import (build_on_meta, expected_shapes, open_safetensors,  # noqa: E402
                               write_safetensors_streaming)


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB. Linux keeps ru_maxrss across exec, so a child started by a parent that
    held more memory (writing the random weights) would report the parent's peak: read VmHWM, which starts
    afresh with the new program, where there is one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_random_t5(path: Path, blocks: int, seed: int = 0) -> Path:
    """T5-XXL-sized random weights (fp16): matrices N(0, 1/fan_in), embedding N(0, 1), norm gains near 1."""
    config = encoders.T5Config(blocks=blocks)
    shapes = expected_shapes(build_on_meta(lambda: encoders.T5Encoder(config)))
    g = torch.Generator().manual_seed(seed)

    def produce(key: str) -> torch.Tensor:
        shape = shapes[key]
        if len(shape) == 1:
            return (1 + 0.1 * torch.randn(shape, generator=g)).half()
        scale = 1.0 if "embed_tokens" in key else shape[1] ** -0.5
        return (torch.randn(shape, generator=g) * scale).half()

    write_safetensors_streaming({k: (s, torch.float16) for k, s in shapes.items()}, produce, path)
    return path


def write_fp8_copy(src: Path, dst: Path) -> Path:
    """Every tensor cast to fp8 e4m3fn, one at a time (as t5xxl_fp8_e4m3fn.safetensors is made)."""
    f = open_safetensors(src)

    def produce(key: str) -> torch.Tensor:
        t = f.tensor(key).to(torch.float8_e4m3fn)
        f.release(key)
        return t

    write_safetensors_streaming({k: (f.shape(k), torch.float8_e4m3fn) for k in f.keys()}, produce, dst)
    return dst


def child(weights: str, tokens: int, out: str | None) -> dict:
    start = time.perf_counter()
    model = encoders.load_t5(weights, dtype=torch.float32)
    load_s, after_load = time.perf_counter() - start, peak_rss_mib()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        hidden = model(ids)
    seconds = time.perf_counter() - start
    if out:
        torch.save(hidden, out)
    q = model.encoder.block[0].layer[0].SelfAttention.q.weight
    return {"file": Path(weights).name, "blocks": model.config.blocks, "weight_dtype": str(q.dtype),
            "peak_rss_mib": round(peak_rss_mib()), "after_load_mib": round(after_load),
            "load_s": round(load_s, 1), "encode_s": round(seconds, 1), "tokens": tokens,
            "threads": torch.get_num_threads()}


def run_child(weights: Path, tokens: int, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(weights), "--tokens", str(tokens),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        raise RuntimeError(f"measuring {weights.name} failed with code {proc.returncode}{killed}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp16", help="t5xxl_fp16.safetensors (default: random weights)")
    parser.add_argument("--fp8", help="t5xxl_fp8_e4m3fn.safetensors (default: made from the fp16 file)")
    parser.add_argument("--blocks", type=int, default=24, help="blocks of the random model (T5-XXL: 24)")
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--tmp", default=None, help="where to write the random files (default: system temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.out)))
        return

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        fp16 = Path(args.fp16) if args.fp16 else write_random_t5(tmp / "t5xxl_fp16.safetensors", args.blocks)
        fp8 = Path(args.fp8) if args.fp8 else write_fp8_copy(fp16, tmp / "t5xxl_fp8_e4m3fn.safetensors")
        print(f"files ready in {time.perf_counter() - start:.0f} s: {fp16.stat().st_size / 2**30:.2f} GiB fp16, "
              f"{fp8.stat().st_size / 2**30:.2f} GiB fp8", flush=True)
        results = []
        for weights in (fp16, fp8):
            results.append(run_child(weights, args.tokens, tmp / f"{weights.stem}.pt"))
            print(json.dumps(results[-1]), flush=True)
        h16, h8 = (torch.load(tmp / f"{w.stem}.pt") for w in (fp16, fp8))
        rel_rms = ((h8 - h16).pow(2).mean().sqrt() / h16.pow(2).mean().sqrt()).item()
        ratio = results[1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
        print(f"peak RSS fp8 / fp16 = {ratio:.2f}; fp8 vs fp16 output: relative RMS difference {rel_rms:.3f}")


if __name__ == "__main__":
    main()
