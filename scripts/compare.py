"""Run two configurations layer by layer on the same input and print the error per stage.

    python scripts/compare.py dtype --checkpoint sd3.5_medium.safetensors --a fp32 --b bf16
    python scripts/compare.py diffusers --checkpoint sd3.5_medium.safetensors      # needs the reference extra
    python scripts/compare.py dtype --random tiny --b fp16                           # no weights needed
    python scripts/compare.py t5 --checkpoint t5xxl_fp16.safetensors --b t5xxl_fp8_e4m3fn.safetensors
    python scripts/compare.py t5 --random tiny                                       # fp16 vs fp8 on load

`t5` runs T5 (fp32 compute) from the `--checkpoint` file against `--b`: another T5 file (e.g. the official fp8
one) or "fp8", the same file quantized to fp8 when loading.

`--random CONFIG` writes a random-weight checkpoint of a named config (configs/) to a temporary file first.
Errors are measured against run `a`, the reference (fp32 by default; diffusers in `diffusers` mode).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

import torch  # noqa: E402

from mmditx import MMDiTX, load_config, load_mmditx  # noqa: E402
from mmditx.checkpoint import save_safetensors  # noqa: E402
from scripts.errors import add_debug_flag, bounded, run_cli  # noqa: E402
from mmditx.diffusers_names import diffusers_sd3_kwargs  # noqa: E402
from instruments.compare import (error_table, format_table, watch_diffusers_sd3,  # noqa: E402
                            watch_mmditx)


def random_checkpoint(config_name: str, directory: str) -> Path:
    torch.manual_seed(0)
    model = MMDiTX(load_config(config_name))
    torch.nn.init.normal_(model.pos_embed, std=0.5)
    path = Path(directory) / f"{config_name}_random.safetensors"
    save_safetensors({"model.diffusion_model." + k: v for k, v in model.state_dict().items()}, path)
    return path


def inputs(config, args, dtype):
    g = torch.Generator().manual_seed(args.seed)
    lat = args.size // 8
    x = torch.randn(args.batch, config.in_channels, lat, lat, generator=g)
    context = torch.randn(args.batch, args.tokens, config.context_dim, generator=g)
    y = torch.randn(args.batch, config.pooled_dim, generator=g)
    t = torch.full((args.batch,), args.t)
    return [v.to(dtype) if v.is_floating_point() and v.ndim > 1 else v for v in (x, t, context, y)]


def run_ours(model, args):
    dtype = next(model.parameters()).dtype
    with watch_mmditx(model) as rec, torch.inference_mode():
        rec.out["output"] = model(*inputs(model.config, args, dtype))
    return rec.out


def run_diffusers(model, path, args):
    try:
        from diffusers import SD3Transformer2DModel
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
        from safetensors.torch import load_file
    except ImportError as e:
        raise SystemExit(f"error: the diffusers mode needs the reference extra ({e}): pip install -e '.[reference]'")

    sd = {k: v.float() for k, v in load_file(str(path)).items() if k.startswith("model.diffusion_model.")}
    ref = SD3Transformer2DModel(**diffusers_sd3_kwargs(model.config))
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(sd), strict=True)
    x, t, context, y = inputs(model.config, args, torch.float32)
    with watch_diffusers_sd3(ref.eval()) as rec, torch.inference_mode():
        rec.out["output"] = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t,
                                return_dict=False)[0]
    return rec.out


def random_t5(directory: str) -> Path:
    """A small T5 v1.1 encoder in the official naming (width 256, 4 blocks), fp16 like t5xxl_fp16."""
    from sampling.embedded import t5_layout, write_random

    path = Path(directory) / "t5_tiny_random_fp16.safetensors"
    write_random(t5_layout(256, 4, ff=512, vocab=1000, heads=4), path, dtype=torch.float16, seed=0)
    return path


def run_t5(path: Path, b: str, args) -> tuple[dict, dict, str]:
    from encoders import load_t5
    from instruments.compare import watch_t5

    a_model = load_t5(path)
    if b == "fp8":
        b_model, b_name = load_t5(path, weight_dtype="fp8"), "fp8 (quantized on load)"
    elif Path(b).is_file():
        b_model, b_name = load_t5(b), Path(b).name
    else:
        raise SystemExit(f"--b {b!r}: for t5, give another T5 file or 'fp8'")
    vocab = a_model.encoder.embed_tokens.weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, min(args.tokens, 77)), generator=torch.Generator().manual_seed(args.seed))
    runs = []
    for model in (a_model, b_model):
        with watch_t5(model) as rec, torch.inference_mode():
            rec.out["output"] = model(ids)
        runs.append(rec.out)
    return runs[0], runs[1], f"T5 {b_name} vs {path.name} (reference), fp32 compute, {ids.shape[1]} random tokens"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Layer-by-layer comparison of two configurations.")
    p.add_argument("mode", choices=["dtype", "diffusers", "t5"],
                   help="dtype: our transformer with weights in dtype a vs b; diffusers: ours (fp32) vs diffusers "
                        "(fp32); t5: T5 from --checkpoint vs --b (a file, or fp8)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="sd3.5_medium.safetensors or a bare transformer file")
    src.add_argument("--random", metavar="CONFIG", help="random weights of a named config (e.g. tiny, sd3.5_medium)")
    p.add_argument("--a", default="fp32", help="dtype of run a, the reference (dtype mode)")
    p.add_argument("--b", default=None, help="dtype of run b (dtype mode, default bf16); t5 mode: a T5 file or "
                   "'fp8' (default)")
    p.add_argument("--size", type=bounded(int, 16, 4096), default=256, help="image side in pixels")
    p.add_argument("--batch", type=bounded(int, 1, 64), default=1)
    p.add_argument("--tokens", type=bounded(int, 1, 1024), default=154)
    p.add_argument("--t", type=bounded(float, 0, 1000), default=500.0, help="sigma * 1000")
    p.add_argument("--seed", type=bounded(int, 0, 2 ** 63 - 1), default=0)
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.size % 16:
        p.error(f"--size {args.size} is not a multiple of 16 (the latent is size/8, patched 2x2)")

    with tempfile.TemporaryDirectory() as tmp:
        if args.mode == "t5":
            if args.random and args.random != "tiny":
                p.error("t5 --random: only 'tiny' (the full T5-XXL is 9.5 GB; give --checkpoint instead)")
            a, b, title = run_t5(args.checkpoint or random_t5(tmp), args.b or "fp8", args)
            print(format_table(error_table(b, a), title))
            return
        args.b = args.b or "bf16"
        path = args.checkpoint or random_checkpoint(args.random, tmp)
        if args.mode == "dtype":
            a = run_ours(load_mmditx(path, dtype=args.a), args)
            b = run_ours(load_mmditx(path, dtype=args.b), args)
            title = f"{path.name}: weights and compute in {args.b} vs {args.a} (reference)"
        else:
            model = load_mmditx(path, dtype="fp32")
            a, b = run_diffusers(model, path, args), run_ours(model, args)
            title = f"{path.name}: mmditx vs diffusers SD3Transformer2DModel (reference), fp32"
        print(format_table(error_table(b, a), title))


if __name__ == "__main__":
    sys.exit(run_cli(main))
