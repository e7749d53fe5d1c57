"""Benchmarks against diffusers on the same random full-size weights in the official layout.

    python scripts/benchmark.py transformer [--size 256] [--batch 2] [--tokens 154] [--runs 3]
    python scripts/benchmark.py transformer --attention math|flash|default [--compile] [--profile]
    python scripts/benchmark.py load [--stored fp16] [--dtype fp32]
    python scripts/benchmark.py vae [--size 512] [--profile]
    python scripts/benchmark.py gemm [--rows 308 512 2048 8192] [--kernels]
    python scripts/benchmark.py pipeline [--size 512] [--steps 4]
    python scripts/benchmark.py train [--mode lora|full] [--checkpointing] [--size 256] [--steps 3]
    python scripts/benchmark.py lora [--rank 64] [--dtype fp32] [--size 256] [--tokens 154]
    python scripts/benchmark.py controlnet [--size 256] [--blocks 12] [--kind 8b]
    python scripts/benchmark.py muon [--model demo|tiny|sd3.5_medium] [--runs 20]

`transformer` times one forward pass of the full-size SD3.5 Medium transformer, ours and diffusers'
SD3Transformer2DModel holding the *same* weight tensors, alternating in one process, and prints medians, the
ratio ours/diffusers, and the time the same matrix products take on their own (the matmul bound).
`load` measures, in fresh subprocesses, the time and peak RSS of going from the single file to a ready
transformer + VAE, ours against diffusers' single-file path (read, convert, load), every weight touched once.
`vae` times one decode, ours (also in channels-last memory format) against diffusers' AutoencoderKL.
`pipeline` runs whole text-to-image jobs (load, encode, sample, decode) in fresh subprocesses on a full-size
random model directory in the release layout, ours in each memory mode and diffusers' StableDiffusion3Pipeline
with the same components, and prints seconds and peak RSS. diffusers cannot hold T5-XXL in fp32 next to the
rest in 24 GiB, so the side-by-side runs are without T5 (both zero its part of the context); ours also runs with
the fp8 T5 file, which it keeps in fp8.
`lora` applies a random LoRA of --rank on every linear layer of the full-size transformer (stored fp16, as
LoRA files usually are): the time to read it, merge it and remove it, one forward pass with and without it
merged, and (fresh subprocesses) the peak RSS of a frugal-mode forward pass with and without it.

`controlnet` times one forward pass of the full-size transformer with and without one random full-size
ControlNet (official layout, --blocks blocks of --kind), alternating, and prints the measured ratio next to the
ratio of FLOPs (instruments.anatomy.controlnet_flops).

`train` times one training step (forward, backward, AdamW) in fresh subprocesses, one side after the other:
ours (training.lora adapters, rank 16 on the attention q/k/v/out of both streams) against the core loop of
diffusers' train_dreambooth_lora_sd3.py (SD3Transformer2DModel + peft LoRA on the same targets, same rank),
batch 1, cached conditioning (random 154 x 4096 context), gradient checkpointing on both or off on both;
`--mode full` trains every weight. Prints seconds per step (median after one warm-up step) and peak RSS.

`muon` times one optimizer step over the joint blocks' 2-D weights (random weights and gradients, no model
forward): training.muon, which orthogonalises the matrices of one shape together, against torch.optim.Muon (one
by one; the same arithmetic) and AdamW.

The random checkpoint (official layout, ~5 GB in fp16) is written once under --cache.
Nothing here is a pass/fail test: CI never runs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

import torch  # noqa: E402

from mmditx import load_mmditx, read_config  # noqa: E402
from mmditx.checkpoint import parse_dtype  # noqa: E402
from mmditx.diffusers_names import diffusers_sd3_kwargs  # noqa: E402
from vae.diffusers_names import diffusers_vae_kwargs  # noqa: E402
from mmditx.runtime import keep_freed_memory  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("MMDITX_BENCH_CACHE", "/tmp/mmditx_bench"))


def time_runs(runners: dict, runs: int, faults: dict | None = None) -> dict[str, list[float]]:
    """Seconds of each call, `runs` rounds, the runners alternating within a round (so drift hits all alike).
    `faults`, if given, receives each runner's median count of page faults per call (minor + major)."""
    times = {name: [] for name in runners}
    counts = {name: [] for name in runners}
    for _ in range(runs):
        for name, fn in runners.items():
            before = page_faults()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            counts[name].append(page_faults() - before)
    if faults is not None:
        faults.update({name: int(statistics.median(c)) for name, c in counts.items()})
    return times


def page_faults() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt


def random_checkpoint(cache: Path, stored: str) -> Path:
    """The full SD3.5 Medium single file (transformer + VAE keys) with random weights, written once."""
    from tests.official import official_layout, write_random_checkpoint

    path = cache / f"sd3.5_medium_random_{stored}.safetensors"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once) ...", flush=True)
        write_random_checkpoint(official_layout("sd3.5_medium"), path, dtype=parse_dtype(stored))  # whole or not at all
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


def matmul_bound_seconds(fn, keep: set[int] = frozenset()) -> dict[str, float]:
    """The time the matrix products of `fn()` alone take: log every matmul/attention call of one run
    (shapes and layouts), then replay the same products on fresh tensors and time them. Attention is replayed
    as its two products (q k^T and p v), the work a perfect fused kernel cannot avoid. Operands whose storage
    pointer is in `keep` (the model's weights) are reused as they are rather than copied: no second set of weights.
    Returns seconds for {'linear': the linear layers, 'attention': the attention products}."""
    from torch.utils._python_dispatch import TorchDispatchMode

    log = []

    def spec(t):  # a model weight is kept (a reference); anything else is remembered by its layout
        return t if t.untyped_storage().data_ptr() in keep else (tuple(t.shape), t.stride(), t.dtype)

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name == "linear":  # (input, weight[, bias]): a GEMM of input rows by weight.t()
                log.append(("linear", [spec(args[0]), spec(args[1])]))
            elif name in ("addmm", "addmm_", "mm", "bmm"):
                mats = [a for a in args if isinstance(a, torch.Tensor) and a.ndim >= 2][-2:]
                log.append(("matmul", [spec(m) for m in mats]))
            elif "scaled_dot_product" in name:
                log.append(("attention", [spec(args[0]), spec(args[1])]))
            return func(*args, **(kwargs or {}))

    with Log():
        fn()

    def make(s):
        return s if isinstance(s, torch.Tensor) else torch.empty_strided(s[0], s[1], dtype=s[2]).normal_()

    jobs = [(kind, [make(s) for s in specs]) for kind, specs in log]

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

    runners = {"ours": run_ours, "diffusers": run_ref}
    extra = {}
    with torch.inference_mode(), attention_backend(args.attention):
        a, b = run_ours(), run_ref()  # warm-up, and a sanity check that both compute the same thing
        print(f"max |ours - diffusers| = {(a - b).abs().max().item():.3e} (output scale {b.abs().max().item():.3f})")
        if args.compile:
            compiled = torch.compile(ours)
            start = time.perf_counter()
            c = compiled(x, t, context=ctx, y=y)
            extra["compile_s"] = round(time.perf_counter() - start, 1)
            extra["max_abs_compiled_vs_eager"] = float((c - a).abs().max())
            runners["ours_compiled"] = lambda: compiled(x, t, context=ctx, y=y)
        faults = {}
        times = time_runs(runners, args.runs, faults)
        weights = {t.untyped_storage().data_ptr() for t in [*ours.parameters(), *ours.buffers()]}
        bound = [matmul_bound_seconds(run_ours, weights) for _ in range(args.runs)]
        if args.profile:
            extra["profile_top_ops"] = {name: top_ops(fn) for name, fn in runners.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    if args.compile:
        extra["ratio_compiled_over_eager"] = round(med["ours_compiled"] / med["ours"], 3)
        extra["ratio_compiled_over_diffusers"] = round(med["ours_compiled"] / med["diffusers"], 3)
    print(json.dumps({"what": "transformer forward", "image": f"{args.size}x{args.size}", "batch": B,
                      "context_tokens": args.tokens, "dtype": args.dtype, "attention": args.attention,
                      "malloc": args.malloc, "page_faults_per_forward": faults,
                      "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "runs": args.runs,
                      "seconds": {k: [round(s, 3) for s in v] for k, v in times.items()},
                      "median_s": {k: round(v, 3) for k, v in med.items()},
                      "ratio_ours_over_diffusers": round(med["ours"] / med["diffusers"], 3),
                      "matmul_bound_s": {k: round(statistics.median(b[k] for b in bound), 3) for k in bound[0]},
                      "ours_fraction_of_matmul_bound": round(statistics.median(sum(b.values()) for b in bound)
                                                             / med["ours"], 3), **extra}, indent=2))


def diffusers_vae(vc, sd: dict, dtype):
    """diffusers' AutoencoderKL built empty for our VAEConfig, loaded from the official-named tensors in `sd`
    (`first_stage_model.*`) through diffusers' own converter."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        ae = AutoencoderKL(**diffusers_vae_kwargs(vc))
    ae.load_state_dict({k: v.to(dtype) for k, v in convert_ldm_vae_checkpoint(sd, dict(ae.config)).items()},
                       assign=True, strict=True)
    return ae.eval().requires_grad_(False)


def bench_vae(args) -> None:
    """VAE decode of one latent, ours (plain and channels-last) vs diffusers' AutoencoderKL, same weights."""
    from vae import load_vae

    path = random_checkpoint(args.cache, args.stored)
    ours = load_vae(path, dtype=args.dtype)
    sd = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    ref = diffusers_vae(ours.config, sd, parse_dtype(args.dtype))
    ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    z = torch.randn(1, ours.config.z_channels, args.size // 8, args.size // 8, dtype=parse_dtype(args.dtype))
    runners = {"ours": lambda: ours.decoder(z),
               "ours_channels_last": lambda: ours_cl.decoder(z.contiguous(memory_format=torch.channels_last)),
               "diffusers": lambda: ref.decode(z).sample}
    with torch.inference_mode():
        outs = {k: fn() for k, fn in runners.items()}  # warm-up and agreement check
        err = {k: float((outs[k].float() - outs["diffusers"].float()).abs().max()) for k in ("ours", "ours_channels_last")}
        times = time_runs(runners, args.runs)
        extra = {"profile_top_ops": {k: top_ops(fn) for k, fn in runners.items()}} if args.profile else {}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"what": "VAE decode (decoder only, no tiling)", "image": f"{args.size}x{args.size}",
                      "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "max_abs_vs_diffusers": err, "seconds": {k: [round(s, 3) for s in v] for k, v in times.items()},
                      "median_s": {k: round(v, 3) for k, v in med.items()},
                      "ratio_ours_over_diffusers": round(med["ours"] / med["diffusers"], 3),
                      "ratio_channels_last_over_ours": round(med["ours_channels_last"] / med["ours"], 3), **extra},
                     indent=2))


def top_ops(fn, n: int = 8) -> dict[str, str]:
    """Where one call of `fn` spends its time: the n operators with the most self CPU time, as percentages."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return {e.key: f"{100 * e.self_cpu_time_total / total:.1f}%" for e in rows[:n]}


def bench_gemm(args) -> None:
    """The matrix-product layouts the transformer could use, alone, at SD3.5 Medium's width: q/k/v as one
    (3D, D) product or three (D, D) ones, and the MLP as two whole products, over square slices of the hidden
    width as the model does (fc2's slices are column blocks of the checkpoint's (D, 4D) weight), or over
    slices copied contiguous (not possible without a second copy of fc2's weights)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    D = 1536
    w, b = torch.randn(3 * D, D), torch.randn(3 * D)
    w1, b1, w2, b2 = torch.randn(4 * D, D), torch.randn(4 * D), torch.randn(D, 4 * D), torch.randn(D)
    w2_blocks = [w2[:, i:i + D].contiguous() for i in range(0, 4 * D, D)]

    def mlp_sliced(x, blocks):
        out = None
        for j, i in enumerate(range(0, 4 * D, D)):
            h = F.gelu(F.linear(x, w1[i:i + D], b1[i:i + D]), approximate="tanh")
            out = torch.addmm(b2, h, blocks[j].t()) if out is None else out.addmm_(h, blocks[j].t())
        return out

    def median_s(fn):
        fn()  # warm-up
        return statistics.median(time_runs({"fn": fn}, args.runs)["fn"])

    rows = {}
    for n in args.rows:
        x = torch.randn(n, D)
        r = {"qkv_one_product": median_s(lambda: F.linear(x, w, b)),
             "qkv_three_square": median_s(lambda: [F.linear(x, w[i * D:(i + 1) * D], b[i * D:(i + 1) * D])
                                                   for i in range(3)]),
             "mlp_whole": median_s(lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)),
             "mlp_sliced_as_model": median_s(lambda: mlp_sliced(x, [w2[:, i:i + D] for i in range(0, 4 * D, D)])),
             "mlp_sliced_contiguous": median_s(lambda: mlp_sliced(x, w2_blocks))}
        if args.kernels:
            r.update(other_linear_kernels(x, w1, b1, median_s))
        rows[n] = {k: round(v * 1e3, 1) for k, v in r.items()}
        rows[n]["qkv_GFLOPs_per_s_three_square"] = round(2 * n * 3 * D * D / r["qkv_three_square"] / 1e9)
    print(json.dumps({"what": "milliseconds per product group, fp32, width 1536", "threads": torch.get_num_threads(),
                      "runs": args.runs, "rows": rows}, indent=2))


def other_linear_kernels(x, w1, b1, median_s) -> dict[str, float]:
    """fc1 (D -> 4D) through the CPU kernels torch offers besides F.linear's MKL sgemm: MKL with the weight packed
    once ahead (what inductor's freezing uses) and oneDNN's linear, alone and with tanh-GELU fused as a
    post-op. Each is checked against F.linear before it is timed."""
    import torch.nn.functional as F

    n, out = x.shape[0], {}
    ref = F.linear(x, w1, b1)
    candidates = {"fc1_mkl_sgemm": lambda: F.linear(x, w1, b1),
                  "fc1_gelu_mkl_sgemm": lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh")}
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w1, n)
        candidates["fc1_mkl_prepacked"] = lambda: torch.ops.mkl._mkl_linear(x, packed, w1, b1, n)
    if torch.backends.mkldnn.is_available():
        candidates["fc1_onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w1, b1, "none", [], "")
        candidates["fc1_gelu_onednn_fused"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w1, b1, "gelu", [], "tanh")
    for name, fn in candidates.items():
        want = F.gelu(ref, approximate="tanh") if "gelu" in name else ref
        err = float((fn() - want).abs().max())
        if err > 1e-4 * float(want.abs().max()):
            raise RuntimeError(f"{name} disagrees with F.linear by {err:.2e}")
        out[name] = median_s(fn)
    return out


def attention_backend(name: str):
    """The scaled_dot_product_attention kernels torch may pick, for ours and diffusers alike. On CPU torch
    offers the fused flash kernel and the math (two matmuls and a softmax) one; on CUDA also cuDNN and
    memory-efficient attention."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "default":
        return contextlib.nullcontext()
    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return sdpa_kernel([backends[name]])


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
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    from mmditx import read_config
    from vae import read_vae_config

    sd = load_file(path)
    with torch.device("meta"):
        tf = SD3Transformer2DModel(**diffusers_sd3_kwargs(read_config(path)))
    tf_sd = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")})
    tf.load_state_dict({k: v.to(dtype) for k, v in tf_sd.items()}, assign=True, strict=True)
    ae = diffusers_vae(read_vae_config(path), sd, dtype)
    del sd, tf_sd
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


def full_model_dir(cache: Path) -> Path:
    """A release-layout directory with random full-size weights: the transformer + VAE file above, CLIP-L and
    CLIP-G (fp16, the real CLIP vocabulary) and T5-XXL in fp8 (a small sentencepiece vocabulary: the real one
    is not available offline; the ids it makes are valid rows of the full 32128-row table). Written once."""
    import shutil

    from sampling.embedded import write_random, write_t5_tokenizer
    from tests.official import CLIP_TOKENIZER_DIR, official_layout

    root = cache / "sd3.5_medium_random"
    if (root / "COMPLETE").is_file():
        return root
    te = root / "text_encoders"
    te.mkdir(parents=True, exist_ok=True)
    model = root / "sd3.5_medium.safetensors"
    if not model.exists():
        model.symlink_to(random_checkpoint(cache, "fp16"))
    for name, file, dtype, seed in (("clip_l", "clip_l.safetensors", torch.float16, 1),
                                    ("clip_g", "clip_g.safetensors", torch.float16, 2),
                                    ("t5xxl", "t5xxl_fp8_e4m3fn.safetensors", torch.float8_e4m3fn, 3)):
        if not (te / file).exists():
            print(f"writing {te / file} (once) ...", flush=True)
            write_random(official_layout(name), te / file, dtype=dtype, seed=seed)
    for tok in ("tokenizer", "tokenizer_2"):
        if not (root / tok).exists():
            shutil.copytree(CLIP_TOKENIZER_DIR, root / tok)
    if not (root / "tokenizer_3").exists():
        write_t5_tokenizer(root / "tokenizer_3")
    (root / "COMPLETE").write_text("random weights, for scripts/benchmark.py\n")
    return root


def _diffusers_pipeline(root: Path):
    """diffusers' StableDiffusion3Pipeline from the same files, without T5 (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    from tests.test_encoders_common import CLIP_G_HF, CLIP_L_HF, clip_oracle

    transformer, vae = _load_diffusers(str(root / "sd3.5_medium.safetensors"), torch.float32)
    te = root / "text_encoders"
    tok = lambda d, **kw: CLIPTokenizer(str(root / d / "vocab.json"), str(root / d / "merges.txt"),  # noqa: E731
                                        model_max_length=77, **kw)
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        text_encoder=clip_oracle(te / "clip_l.safetensors", **CLIP_L_HF), tokenizer=tok("tokenizer"),
        text_encoder_2=clip_oracle(te / "clip_g.safetensors", **CLIP_G_HF), tokenizer_2=tok("tokenizer_2", pad_token="!"),
        text_encoder_3=None, tokenizer_3=None)


def _pipeline_child(who: str, memory: str, t5: str, malloc: str, root: str, size: int, steps: int) -> None:
    """In a fresh process: one whole text-to-image job from the files, timed from the first load to the image."""
    from sampling.pipeline import GenerationParams, Pipeline

    if malloc == "keep":
        keep_freed_memory()

    prompt, negative = "a photo of a red fox in the snow, golden hour", "blurry"
    start = time.perf_counter()
    with torch.inference_mode():
        if who == "ours":
            pipe = Pipeline.from_model_dir(root, t5=t5, memory=memory)
            image = pipe.generate(GenerationParams(prompt=prompt, negative_prompt=negative, width=size, height=size,
                                                   steps=steps, cfg=4.5, sampler="euler", seed=0, slg=False))[0]
        else:
            pipe = _diffusers_pipeline(Path(root))
            image = pipe(prompt=prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps,
                         guidance_scale=4.5, max_sequence_length=77,
                         generator=torch.Generator("cpu").manual_seed(0)).images[0]
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_kb": peak_rss_kb(), "image": list(image.size)}))


# name: (who, memory mode, T5, malloc). Ours runs as scripts/generate.py does: with keep_freed_memory() (malloc
# "keep") except in the frugal mode, which puts memory first; diffusers runs both as it comes and with the same
# setting, so the gain of the setting is seen apart from the implementation's.
PIPELINE_RUNS = {
    "ours resident, no T5": ("ours", "resident", "off", "keep"),
    "diffusers, no T5": ("diffusers", "resident", "off", "default"),
    "diffusers, no T5, malloc keep": ("diffusers", "resident", "off", "keep"),
    "ours resident, no T5, malloc default": ("ours", "resident", "off", "default"),
    "ours frugal, no T5": ("ours", "frugal", "off", "default"),
    "ours frugal, no T5, malloc keep": ("ours", "frugal", "off", "keep"),
    "ours sequential, T5 fp8": ("ours", "sequential", "fp8", "keep"),
    "ours frugal, T5 fp8": ("ours", "frugal", "fp8", "default"),
}


def bench_pipeline(args) -> None:
    root = full_model_dir(args.cache)
    gib, res = 1024 ** 3, {}
    for name in args.only or PIPELINE_RUNS:
        who, memory, t5, malloc = PIPELINE_RUNS[name]
        print(f"running {name} ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "_pipeline_child", who, memory, t5, malloc, str(root),
                              str(args.size), str(args.steps)], capture_output=True, text=True)
        if out.returncode != 0:
            res[name] = {"failed": out.stderr.strip().splitlines()[-1:]}
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res[name] = {"seconds": round(r["seconds"], 1), "peak_rss_GiB": round(r["peak_kb"] * 1024 / gib, 2)}
        print(json.dumps({name: res[name]}), flush=True)
    ratios = {}
    for ours, theirs, tag in [("ours resident, no T5", "diffusers, no T5", "as each comes"),
                              ("ours resident, no T5", "diffusers, no T5, malloc keep", "both malloc keep"),
                              ("ours resident, no T5, malloc default", "diffusers, no T5", "both malloc default")]:
        a, b = res.get(ours, {}), res.get(theirs, {})
        if "seconds" in a and "seconds" in b:
            ratios[f"ours resident / diffusers, {tag}"] = {
                "time": round(a["seconds"] / b["seconds"], 3), "peak_rss": round(a["peak_rss_GiB"] / b["peak_rss_GiB"], 3)}
    print(json.dumps({"what": f"text-to-image {args.size}x{args.size}, {args.steps} euler steps, CFG 4.5, from "
                              "the files to the image (fresh process each)", "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "runs": res, "ratios": ratios}, indent=2))


DREAMBOOTH_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                      "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]  # train_dreambooth_lora_sd3.py


def _train_child(who: str, mode: str, checkpointing: str, path: str, size: int, steps: int) -> None:
    """Fresh process: load the transformer (fp32), set up LoRA or full training, run `steps` + 1 steps."""
    import torch.nn.functional as F

    keep_freed_memory()
    torch.manual_seed(0)
    model = load_mmditx(path, dtype=torch.float32)
    lat = size // 8
    x0 = torch.randn(1, 16, lat, lat)
    context, pooled = torch.randn(1, 154, 4096).half(), torch.randn(1, 2048).half()  # as cached (fp16)
    if who == "ours":
        from training.lora import add_lora, target_patterns
        from training.objective import Objective, draw, flow_matching_loss
        if mode == "lora":
            add_lora(model, rank=16, patterns=target_patterns(("attn",)))
        else:
            model.requires_grad_(True)
        model.gradient_checkpointing = {"on": True, "off": False, "selective": "selective"}[checkpointing]
        net = model.train()
        objective = Objective()

        def loss_fn(g):
            return flow_matching_loss(net, objective, x0, context, pooled, draw(objective, model.config, x0.shape, g))
    else:
        net = diffusers_twin(model)
        del model
        if mode == "lora":
            from peft import LoraConfig
            net.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                       target_modules=DREAMBOOTH_TARGETS))
        else:
            net.requires_grad_(True)
        if checkpointing in ("on", "selective"):   # diffusers has full recompute only
            net.enable_gradient_checkpointing()
        net.train()
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        def loss_fn(g):  # the core of train_dreambooth_lora_sd3.py (continuous sigmas, shift 3)
            u = compute_density_for_timestep_sampling("logit_normal", 1, 0.0, 1.0, generator=g)
            sigmas = 3 * u / (1 + 2 * u)
            noise = torch.randn(x0.shape, generator=g)
            s = sigmas.view(-1, 1, 1, 1)
            noisy = (1.0 - s) * x0 + s * noise
            pred = net(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=context.float(),
                       pooled_projections=pooled.float(), return_dict=False)[0]
            w = compute_loss_weighting_for_sd3("logit_normal", sigmas).view(-1, 1, 1, 1)
            return torch.mean((w.float() * (pred.float() - (noise - x0)) ** 2).reshape(1, -1), 1).mean()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn(g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(times[1:]), "first_step_s": times[0], "peak_kb": peak_rss_kb(),
                      "trainable": sum(p.numel() for p in params), "loss": loss.item()}))


def bench_train(args) -> None:
    path = random_checkpoint(args.cache, args.stored)
    gib = 1024 ** 3
    res = {}
    for who in ("ours", "diffusers"):  # one after the other, each in a fresh process
        cmd = [sys.executable, __file__, "_train_child", who, args.mode,
               {None: "off", "full": "on", "selective": "selective"}[args.checkpointing],
               str(path), str(args.size), str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode != 0:
            raise SystemExit(f"{who} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res[who] = {"step_s": round(r["step_s"], 2), "first_step_s": round(r["first_step_s"], 2),
                    "peak_rss_GiB": round(r["peak_kb"] * 1024 / gib, 2), "trainable_params": r["trainable"]}
        print(who, res[who], flush=True)
    print(json.dumps({"mode": args.mode, "checkpointing": args.checkpointing, "size": args.size, **res,
                      "ratio_ours_over_diffusers": {
                          "step_time": round(res["ours"]["step_s"] / res["diffusers"]["step_s"], 3),
                          "peak_rss": round(res["ours"]["peak_rss_GiB"] / res["diffusers"]["peak_rss_GiB"], 3)}},
                     indent=2))
def lora_file(cache: Path, rank: int) -> Path:
    """A rank-`rank` LoRA on every linear layer of SD3.5 Medium (random, fp16, kohya names), written once."""
    from mmditx import MMDiTX
    from mmditx.lora import LoraFactor, random_lora_factors, save_lora

    path = cache / f"lora_rank{rank}_fp16.safetensors"
    if not path.exists():
        with torch.device("meta"):
            shapes = MMDiTX(read_config(random_checkpoint(cache, "fp16")))
        factors = {k: LoraFactor(f.down.half(), f.up.half(), float(rank))
                   for k, f in random_lora_factors(shapes, rank).items()}
        save_lora(path, factors, format="kohya")
    return path


def _lora_frugal_child(model: str, lora: str, size: int, tokens: int) -> None:
    """In a fresh process: one frugal-mode forward pass (weights as stored, streamed in fp32), peak RSS."""
    from mmditx import apply_lora, stream_weights

    base = peak_rss_kb()
    m = stream_weights(load_mmditx(model, dtype=None), "cpu", torch.float32)
    if lora:
        apply_lora(m, lora)
    cfg, lat = m.config, size // 8
    with torch.inference_mode():
        m(torch.randn(2, cfg.in_channels, lat, lat), torch.full((2,), 700.0), context=torch.randn(2, tokens, cfg.context_dim),
          y=torch.randn(2, cfg.pooled_dim))
    print(json.dumps({"peak_kb": peak_rss_kb(), "rss_before_kb": base}))


def bench_lora(args) -> None:
    from mmditx import apply_lora
    from mmditx.lora import read_lora

    path, gib = random_checkpoint(args.cache, "fp16"), 1024 ** 3
    lora = lora_file(args.cache, args.rank)
    res = {"what": f"rank-{args.rank} LoRA on every linear layer of the full-size SD3.5 Medium transformer "
                   f"(random weights), LoRA stored fp16", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "lora_file_MiB": round(lora.stat().st_size / 2 ** 20, 1)}
    frugal = {}
    for name, extra in (("without LoRA", ""), ("with LoRA", str(lora))) if "frugal" in args.parts else ():
        out = subprocess.run([sys.executable, __file__, "_lora_frugal_child", str(path), extra, str(args.size),
                              str(args.tokens)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            frugal[name] = {"failed": out.stderr.strip().splitlines()[-1:]}
            continue
        frugal[name] = {"peak_rss_GiB": round(json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"] * 1024 / gib, 3)}
    if frugal and all("peak_rss_GiB" in v for v in frugal.values()):
        frugal["ratio_with_over_without"] = round(frugal["with LoRA"]["peak_rss_GiB"]
                                                  / frugal["without LoRA"]["peak_rss_GiB"], 3)
    res[f"frugal forward {args.size}x{args.size}, batch 2, {args.tokens} tokens: peak RSS"] = frugal
    print(json.dumps(res, indent=2), flush=True)

    model = load_mmditx(path, dtype=args.dtype)
    with torch.no_grad():
        for p in model.parameters():       # touch every weight once: no page faults inside the timings
            p.data.view(-1)[::1024].sum()
    start = time.perf_counter()
    factors = read_lora(lora)
    res["read_s"] = round(time.perf_counter() - start, 2)
    if "apply" in args.parts:
        apply_s, remove_s = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            handle = apply_lora(model, factors)
            apply_s.append(round(time.perf_counter() - start, 2))
            start = time.perf_counter()
            handle.remove()
            remove_s.append(round(time.perf_counter() - start, 2))
        start = time.perf_counter()
        handle = apply_lora(model, factors, restorable=False)   # the pipeline's way: one product per weight
        res.update({"weights_dtype": args.dtype, "apply_s": apply_s, "remove_s": remove_s,
                    "apply_unrestorable_s": round(time.perf_counter() - start, 2),
                    "weights_GiB": round(sum(p.numel() * p.element_size() for p in model.parameters()) / gib, 2)})
        print(json.dumps(res, indent=2), flush=True)
        del model, handle
        model = load_mmditx(path, dtype=args.dtype)         # fresh weights for the forward passes
    if "forward" not in args.parts:
        return

    cfg, lat = model.config, args.size // 8
    x, t = torch.randn(2, cfg.in_channels, lat, lat, dtype=model.pos_embed.dtype), torch.full((2,), 700.0)
    ctx = torch.randn(2, args.tokens, cfg.context_dim, dtype=x.dtype)
    y = torch.randn(2, cfg.pooled_dim, dtype=x.dtype)
    step = {"without LoRA": [], "with LoRA merged": []}
    with torch.inference_mode():
        for name in step:                                   # all runs without, then all with the LoRA merged
            if name != "without LoRA":
                apply_lora(model, factors, restorable=False)
            model(x, t, context=ctx, y=y)                   # warm-up
            for _ in range(args.runs):
                start = time.perf_counter()
                model(x, t, context=ctx, y=y)
                step[name].append(round(time.perf_counter() - start, 2))
    res[f"forward {args.size}x{args.size}, batch 2, {args.tokens} tokens: seconds"] = step
    res["forward_ratio_with_over_without"] = round(statistics.median(step["with LoRA merged"])
                                                   / statistics.median(step["without LoRA"]), 3)
    print(json.dumps(res, indent=2))


def bench_controlnet(args) -> None:
    from instruments.anatomy import controlnet_flops, forward_flops
    from mmditx.controlnet import random_controlnet

    torch.manual_seed(0)
    model = load_mmditx(random_checkpoint(args.cache, args.stored), dtype="fp32")
    cfg, B, lat = model.config, args.batch, args.size // 8
    net = random_controlnet(cfg, args.blocks, args.kind, "canny", seed=0)
    x, ctx = torch.randn(B, cfg.in_channels, lat, lat), torch.randn(B, args.tokens, cfg.context_dim)
    y, t, cond = torch.randn(B, cfg.pooled_dim), torch.full((B,), 700.0), torch.randn(1, 16, lat, lat)
    runners = {"without": lambda: model(x, t, context=ctx, y=y),
               "with_controlnet": lambda: model(x, t, context=ctx, y=y, controls=[(net, cond, 1.0)])}
    with torch.inference_mode():
        for run in runners.values():
            run()  # warm-up
        times = time_runs(runners, args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = forward_flops(cfg, args.size, args.size, B, args.tokens)
    extra = sum(controlnet_flops(net.config, cfg, args.size, args.size, B, args.tokens).values())
    print(json.dumps({"what": "transformer forward with and without one ControlNet",
                      "image": f"{args.size}x{args.size}", "batch": B, "context_tokens": args.tokens,
                      "controlnet": f"{args.kind}, {args.blocks} blocks",
                      "threads": torch.get_num_threads(), "runs": args.runs,
                      "seconds": {k: [round(s, 3) for s in v] for k, v in times.items()},
                      "median_s": {k: round(v, 3) for k, v in med.items()},
                      "ratio_with_over_without": round(med["with_controlnet"] / med["without"], 3),
                      "flop_ratio_with_over_without": round((base + extra) / base, 3)}, indent=2))


def bench_muon(args) -> None:
    """One optimizer step over the joint blocks' 2-D weights: training.muon (matrices of one shape batched)
    against torch.optim.Muon (one by one) and AdamW, on the same gradients."""
    from mmditx import MMDiTX, load_config
    from training.demo.model_set import TRANSFORMER
    from training.muon import Muon, is_hidden_matrix

    cfg = TRANSFORMER if args.model == "demo" else load_config(args.model)
    with torch.device("meta"):
        shapes = [tuple(p.shape) for n, p in MMDiTX(cfg).named_parameters() if is_hidden_matrix(n, p)]
    torch.manual_seed(0)
    params = {name: [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes] for name in ("ours", "torch", "adamw")}
    for group in params.values():
        for p in group:
            p.grad = torch.randn_like(p)
    optimizers = {"ours": Muon(params["ours"], lr=1e-3, weight_decay=1e-2),
                  "torch": torch.optim.Muon(params["torch"], lr=1e-3, weight_decay=1e-2, adjust_lr_fn="match_rms_adamw"),
                  "adamw": torch.optim.AdamW(params["adamw"], lr=1e-3)}
    runners = {name: o.step for name, o in optimizers.items()}
    for run in runners.values():
        run()  # warm-up
    times = time_runs(runners, args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"what": "one optimizer step over the joint blocks' 2-D weights",
                      "model": args.model, "matrices": len(shapes), "shapes": len(set(shapes)),
                      "parameters": sum(torch.Size(s).numel() for s in shapes), "threads": torch.get_num_threads(),
                      "runs": args.runs, "median_s": {k: round(v, 4) for k, v in med.items()},
                      "ratio_ours_over_torch_muon": round(med["ours"] / med["torch"], 3)}, indent=2))


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_load_child":
        return _load_child(sys.argv[2], sys.argv[3], sys.argv[4])
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_train_child":
        return _train_child(*sys.argv[2:6], int(sys.argv[6]), int(sys.argv[7]))
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_lora_frugal_child":
        return _lora_frugal_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_pipeline_child":
        return _pipeline_child(*sys.argv[2:7], int(sys.argv[7]), int(sys.argv[8]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random checkpoint is written")
    p.add_argument("--stored", default="fp16", choices=["fp16", "bf16", "fp32"], help="dtype stored in the file")
    p.add_argument("--malloc", default="default", choices=["default", "keep"],
                   help="keep: mmditx.runtime.keep_freed_memory() in this process first (both sides profit)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("transformer", help="one forward pass, ours vs diffusers")
    t.add_argument("--size", type=int, default=256, help="image side in pixels")
    t.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    t.add_argument("--tokens", type=int, default=154, help="context tokens (77 CLIP + 77 T5)")
    t.add_argument("--runs", type=int, default=3)
    t.add_argument("--dtype", default="fp32")
    t.add_argument("--attention", default="default", choices=["default", "math", "flash", "efficient", "cudnn"],
                   help="restrict scaled_dot_product_attention to one backend (both models)")
    t.add_argument("--compile", action="store_true", help="also time torch.compile(ours); prints compile time")
    t.add_argument("--profile", action="store_true", help="also print each model's top operators by self CPU time")
    ld = sub.add_parser("load", help="time and peak RSS of loading transformer + VAE, ours vs diffusers")
    ld.add_argument("--dtype", default="fp32")
    ld.add_argument("--runs", type=int, default=3)
    va = sub.add_parser("vae", help="VAE decode, ours (plain and channels-last) vs diffusers")
    va.add_argument("--size", type=int, default=512, help="image side in pixels")
    va.add_argument("--dtype", default="fp32")
    va.add_argument("--runs", type=int, default=3)
    va.add_argument("--profile", action="store_true", help="also print each decoder's top operators")
    gm = sub.add_parser("gemm", help="the transformer's product layouts alone (q/k/v, MLP) at several row counts")
    gm.add_argument("--rows", type=int, nargs="+", default=[308, 512, 2048, 8192],
                    help="token rows (batch x tokens): 308 = 2 x 154 context, 512/2048/8192 = 2 x image tokens "
                         "at 256/512/1024 pixels")
    gm.add_argument("--runs", type=int, default=5)
    gm.add_argument("--kernels", action="store_true",
                    help="also time fc1 through MKL with a prepacked weight and through oneDNN (GELU fused or not)")
    pl = sub.add_parser("pipeline", help="whole text-to-image runs: seconds and peak RSS, ours vs diffusers")
    pl.add_argument("--size", type=int, default=512)
    pl.add_argument("--steps", type=int, default=4)
    pl.add_argument("--only", nargs="+", choices=list(PIPELINE_RUNS), help="run only these")
    tr = sub.add_parser("train", help="one training step (LoRA rank 16 or full), ours vs diffusers + peft")
    tr.add_argument("--mode", choices=["lora", "full"], default="lora")
    tr.add_argument("--checkpointing", nargs="?", const="full", choices=["full", "selective"],
                    help="gradient checkpointing on both sides (selective: ours keeps its matrix products but qkv; "
                         "diffusers recomputes in full)")
    tr.add_argument("--size", type=int, default=256, help="image side in pixels")
    tr.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    lo = sub.add_parser("lora", help="LoRA: read/apply/remove time, forward with and without, frugal peak RSS")
    lo.add_argument("--rank", type=int, default=64)
    lo.add_argument("--dtype", default="fp32", help="the model's weights (fp32 needs ~10 GiB of RAM)")
    lo.add_argument("--size", type=int, default=256, help="image side of the timed forward passes")
    lo.add_argument("--tokens", type=int, default=154, help="context tokens of the timed forward passes")
    lo.add_argument("--runs", type=int, default=2)
    lo.add_argument("--parts", nargs="+", choices=["frugal", "apply", "forward"], default=["frugal", "apply", "forward"],
                    help="what to measure (apply is always measured when forward is)")
    cn = sub.add_parser("controlnet", help="one forward pass with and without one ControlNet (step cost ratio)")
    cn.add_argument("--size", type=int, default=256, help="image side in pixels")
    cn.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    cn.add_argument("--tokens", type=int, default=154)
    cn.add_argument("--blocks", type=int, default=12, help="ControlNet blocks (half of SD3.5 Medium's 24)")
    cn.add_argument("--kind", choices=["8b", "2b"], default="8b")
    cn.add_argument("--runs", type=int, default=3)
    mu = sub.add_parser("muon", help="one Muon step: training.muon (batched by shape) vs torch.optim.Muon, and AdamW")
    mu.add_argument("--model", default="demo", help="'demo' (the demo's MMDiT-X) or a config name (e.g. tiny)")
    mu.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    if args.malloc == "keep" and not keep_freed_memory():
        print("warning: --malloc keep has no effect here (not glibc)", file=sys.stderr)
    {"transformer": bench_transformer, "load": bench_load, "vae": bench_vae, "gemm": bench_gemm,
     "pipeline": bench_pipeline, "train": bench_train, "lora": bench_lora, "controlnet": bench_controlnet,
     "muon": bench_muon}[args.cmd](args)


if __name__ == "__main__":
    main()
