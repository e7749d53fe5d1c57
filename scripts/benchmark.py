"""Benchmarks against diffusers on the same random full-size weights in the official layout.

    python scripts/benchmark.py transformer [--size 256] [--batch 2] [--tokens 154] [--runs 3]
    python scripts/benchmark.py load [--stored fp16] [--dtype fp32]

`transformer` times one forward pass of the full-size SD3.5 Medium transformer, ours and diffusers'
SD3Transformer2DModel holding the *same* weight tensors, alternating in one process, and prints medians, the
ratio ours/diffusers, and the time the same matrix products take on their own (the matmul bound).
`load` measures, in fresh subprocesses, the time and peak RSS of going from the single file to a ready
transformer + VAE, ours against diffusers' single-file path (read, convert, load), every weight touched once.

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
# Run as a file, Python puts scripts/ first on sys.path, where scripts/inspect.py would shadow the standard
# library's `inspect` (imported by torch): put the repository root in its place.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "scripts":
    sys.path[0] = str(ROOT)
else:
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


def _load_ours(path: str, dtype):
    from vae import load_vae

    return load_mmditx(path, dtype=dtype), load_vae(path, dtype=dtype)


def _load_diffusers(path: str, dtype):
    """What diffusers' `from_single_file` does, without the hub: read the whole file, convert the names with
    diffusers' own converters, build the models empty and load the converted (cast) tensors into them."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)
    from safetensors.torch import load_file

    from mmditx import read_config
    from vae import read_vae_config

    sd = load_file(path)
    with torch.device("meta"):
        tf = SD3Transformer2DModel(**diffusers_sd3_kwargs(read_config(path)))
    tf_sd = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")})
    tf.load_state_dict({k: v.to(dtype) for k, v in tf_sd.items()}, assign=True, strict=True)
    vc = read_vae_config(path)
    levels = len(vc.ch_mult)
    with torch.device("meta"):
        ae = AutoencoderKL(in_channels=vc.in_channels, out_channels=vc.in_channels,
                           down_block_types=("DownEncoderBlock2D",) * levels,
                           up_block_types=("UpDecoderBlock2D",) * levels,
                           block_out_channels=tuple(vc.ch * m for m in vc.ch_mult), layers_per_block=vc.num_res_blocks,
                           latent_channels=vc.z_channels, use_quant_conv=False, use_post_quant_conv=False)
    vae_sd = convert_ldm_vae_checkpoint(sd, dict(ae.config))
    ae.load_state_dict({k: v.to(dtype) for k, v in vae_sd.items()}, assign=True, strict=True)
    del sd, tf_sd, vae_sd
    return tf.eval(), ae.eval()


def _load_child(who: str, path: str, dtype: str) -> None:
    """Run in a fresh process: load transformer + VAE, print the time and the peak RSS (after touching every
    weight once, since memory-mapped weights only become resident when used)."""
    base = peak_rss_kb()
    dt = parse_dtype(dtype)
    start = time.perf_counter()
    tf, ae = (_load_ours if who == "ours" else _load_diffusers)(path, dt)
    load_s = time.perf_counter() - start
    after_load = peak_rss_kb()
    weights = 0
    for p in [*tf.parameters(), *tf.buffers(), *ae.parameters(), *ae.buffers()]:
        p.detach().float().sum()  # touch
        weights += p.numel() * p.element_size()
    print(json.dumps({"load_s": load_s, "weights_bytes": weights, "rss_before_kb": base,
                      "peak_after_load_kb": after_load, "peak_kb": peak_rss_kb()}))


def bench_load(args) -> None:
    path = random_checkpoint(args.cache, args.stored)
    gib, res = 1024 ** 3, {}
    for who in ("ours", "diffusers"):
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "_load_child", who, str(path), args.dtype],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        res[who] = {"load_s": round(statistics.median(r["load_s"] for r in runs), 2),
                    "peak_rss_GiB": round(statistics.median(r["peak_kb"] for r in runs) * 1024 / gib, 3),
                    "peak_rss_right_after_load_GiB": round(statistics.median(r["peak_after_load_kb"] for r in runs)
                                                           * 1024 / gib, 3),
                    "weights_GiB": round(runs[0]["weights_bytes"] / gib, 3),
                    "interpreter_baseline_GiB": round(runs[0]["rss_before_kb"] * 1024 / gib, 3)}
        res[who]["peak_over_weights"] = round(res[who]["peak_rss_GiB"] / res[who]["weights_GiB"], 3)
    print(json.dumps({"what": "single file -> ready transformer + VAE (then every weight touched once)",
                      "file": path.name, "stored": args.stored, "dtype": args.dtype, "runs": args.runs, **res,
                      "time_ratio_ours_over_diffusers": round(res["ours"]["load_s"] / res["diffusers"]["load_s"], 3),
                      "peak_rss_ratio_ours_over_diffusers": round(res["ours"]["peak_rss_GiB"]
                                                                  / res["diffusers"]["peak_rss_GiB"], 3)}, indent=2))


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_load_child":
        return _load_child(sys.argv[2], sys.argv[3], sys.argv[4])
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
    ld = sub.add_parser("load", help="time and peak RSS of loading transformer + VAE, ours vs diffusers")
    ld.add_argument("--dtype", default="fp32")
    ld.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    {"transformer": bench_transformer, "load": bench_load}[args.cmd](args)


if __name__ == "__main__":
    main()
