"""Benchmarks against diffusers on the same random full-size weights in the official layout.

    python scripts/benchmark.py transformer [--size 256] [--batch 2] [--tokens 154] [--runs 3]
    python scripts/benchmark.py load [--stored fp16] [--dtype fp32]

`transformer` times one forward pass of the full-size SD3.5 Medium transformer, ours and diffusers'
SD3Transformer2DModel holding the *same* weight tensors, alternating in one process, and prints medians and
the ratio ours/diffusers. `load` measures, in fresh subprocesses, the time and peak RSS of loading the
transformer from the single file and running one small forward pass (which makes every weight resident).

The random checkpoint (official layout, ~5 GB in fp16) is written once under --cache.
Nothing here is a pass/fail test: CI never runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mmditx import load_mmditx  # noqa: E402
from mmditx.checkpoint import parse_dtype  # noqa: E402
from mmditx.compare import diffusers_sd3_kwargs  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("MMDITX_BENCH_CACHE", "/tmp/mmditx_bench"))


def random_checkpoint(cache: Path, stored: str) -> Path:
    """The full SD3.5 Medium single file (transformer + VAE keys) with random weights, written once."""
    from tests.official import official_layout, write_random_checkpoint

    path = cache / f"sd3.5_medium_random_{stored}.safetensors"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once) ...", flush=True)
        tmp = path.with_suffix(".partial")
        write_random_checkpoint(official_layout("sd3.5_medium"), tmp, dtype=parse_dtype(stored))
        tmp.rename(path)
    return path


def diffusers_twin(model):
    """diffusers' SD3Transformer2DModel sharing our model's weight tensors (converted names, no copies)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        ref = SD3Transformer2DModel(**diffusers_sd3_kwargs(model.config))
    sd = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(sd), assign=True, strict=True)
    return ref.eval().requires_grad_(False)


def matmul_bound_seconds(fn) -> dict[str, float]:
    """The time the matrix products of `fn()` alone take: log every matmul/attention call of one run
    (shapes and layouts), then replay the same products on fresh tensors and time them. Attention is replayed
    as its two products (q k^T and p v), the work a perfect fused kernel cannot avoid.
    Returns seconds for {'linear': the linear layers, 'attention': the attention products}."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    log = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name == "linear":  # (input, weight[, bias]): a GEMM of input rows by weight.t()
                log.append((name, [tuple(args[0].shape), tuple(args[1].shape)], args[0].dtype))
            elif name in ("addmm", "addmm_", "mm", "bmm"):
                mats = [a for a in args if isinstance(a, torch.Tensor) and a.ndim >= 2][-2:]
                log.append(("matmul", [(tuple(m.shape), m.stride()) for m in mats], mats[0].dtype))
            elif "scaled_dot_product" in name:
                log.append(("attention", [tuple(args[0].shape), tuple(args[1].shape)], args[0].dtype))
            return func(*args, **(kwargs or {}))

    with Log():
        fn()

    jobs = []
    for kind, shapes, dtype in log:
        if kind == "matmul":
            mats = [torch.empty_strided(sh, st, dtype=dtype).normal_() for sh, st in shapes]
        else:
            mats = [torch.randn(*sh, dtype=dtype) for sh in shapes]
        jobs.append((kind, mats))

    def replay(kinds=("linear", "matmul", "attention")):
        for kind, mats in jobs:
            if kind not in kinds:
                continue
            if kind == "linear":
                torch.nn.functional.linear(*mats)
            elif kind == "matmul":
                torch.matmul(*mats)
            else:
                q, k = mats
                torch.matmul(torch.matmul(q, k.transpose(-1, -2)), k)

    replay()
    parts = {}
    for kinds in (("linear", "matmul"), ("attention",)):
        start = time.perf_counter()
        replay(kinds)
        parts[kinds[0]] = time.perf_counter() - start
    return parts


def bench_transformer(args) -> None:
    torch.manual_seed(0)
    path = random_checkpoint(args.cache, args.stored)
    ours = load_mmditx(path, dtype=args.dtype)
    ref = diffusers_twin(ours)
    cfg, B, lat = ours.config, args.batch, args.size // 8
    dtype = parse_dtype(args.dtype)
    x = torch.randn(B, cfg.in_channels, lat, lat, dtype=dtype)
    ctx = torch.randn(B, args.tokens, cfg.context_dim, dtype=dtype)
    y = torch.randn(B, cfg.pooled_dim, dtype=dtype)
    t = torch.full((B,), 700.0)

    def run_ours():
        return ours(x, t, context=ctx, y=y)

    def run_ref():
        return ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t, return_dict=False)[0]

    times = {"ours": [], "diffusers": []}
    with torch.inference_mode():
        a, b = run_ours(), run_ref()  # warm-up, and a sanity check that both compute the same thing
        print(f"max |ours - diffusers| = {(a - b).abs().max().item():.3e} (output scale {b.abs().max().item():.3f})")
        for _ in range(args.runs):
            for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        bound = [matmul_bound_seconds(run_ours) for _ in range(args.runs)]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"what": "transformer forward", "image": f"{args.size}x{args.size}", "batch": B,
                      "context_tokens": args.tokens, "dtype": args.dtype, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "runs": args.runs,
                      "seconds": {k: [round(s, 3) for s in v] for k, v in times.items()},
                      "median_s": {k: round(v, 3) for k, v in med.items()},
                      "ratio_ours_over_diffusers": round(med["ours"] / med["diffusers"], 3),
                      "matmul_bound_s": {k: round(statistics.median(b[k] for b in bound), 3) for k in bound[0]},
                      "ours_fraction_of_matmul_bound": round(statistics.median(sum(b.values()) for b in bound)
                                                             / med["ours"], 3)}, indent=2))


def peak_rss_kb() -> int:
    """Peak resident memory of this process in KiB. VmHWM is reset at exec; ru_maxrss is not (a child can
    inherit its parent's peak), so prefer VmHWM where Linux provides it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _load_child(path: str, dtype: str) -> None:
    """Run in a fresh process: load, run one small forward pass, print time and peak RSS."""
    base = peak_rss_kb()
    start = time.perf_counter()
    model = load_mmditx(path, dtype=dtype)
    load_s = time.perf_counter() - start
    after_load = peak_rss_kb()
    cfg = model.config
    d = next(model.parameters()).dtype
    with torch.inference_mode():
        model(torch.randn(1, 16, 16, 16, dtype=d), torch.tensor([500.0]), torch.randn(1, 8, cfg.context_dim, dtype=d),
              torch.randn(1, cfg.pooled_dim, dtype=d))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = peak_rss_kb()
    print(json.dumps({"load_s": load_s, "weights_bytes": weights, "rss_before_kb": base,
                      "peak_after_load_kb": after_load, "peak_after_forward_kb": peak}))


def bench_load(args) -> None:
    path = random_checkpoint(args.cache, args.stored)
    out = subprocess.run([sys.executable, __file__, "_load_child", str(path), args.dtype],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 1024 ** 3
    w = r["weights_bytes"]
    peak = r["peak_after_forward_kb"] * 1024
    above = peak - r["rss_before_kb"] * 1024
    print(json.dumps({"what": "load transformer from single file + one small forward", "file": path.name,
                      "stored": args.stored, "dtype": args.dtype, "load_s": round(r["load_s"], 2),
                      "weights_GiB": round(w / gib, 3), "peak_rss_GiB": round(peak / gib, 3),
                      "peak_after_load_GiB": round(r["peak_after_load_kb"] * 1024 / gib, 3),
                      "interpreter_baseline_GiB": round(r["rss_before_kb"] * 1024 / gib, 3),
                      "peak_over_weights": round(peak / w, 3),
                      "peak_above_baseline_over_weights": round(above / w, 3)}, indent=2))


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_load_child":
        return _load_child(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random checkpoint is written")
    p.add_argument("--stored", default="fp16", choices=["fp16", "bf16", "fp32"], help="dtype stored in the file")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("transformer", help="one forward pass, ours vs diffusers")
    t.add_argument("--size", type=int, default=256, help="image side in pixels")
    t.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    t.add_argument("--tokens", type=int, default=154, help="context tokens (77 CLIP + 77 T5)")
    t.add_argument("--runs", type=int, default=3)
    t.add_argument("--dtype", default="fp32")
    ld = sub.add_parser("load", help="time and peak RSS of loading the transformer")
    ld.add_argument("--dtype", default="fp32")
    args = p.parse_args(argv)
    {"transformer": bench_transformer, "load": bench_load}[args.cmd](args)


if __name__ == "__main__":
    main()
