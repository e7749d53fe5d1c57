"""Generate images with SD3.5 Medium.

    python scripts/generate.py --prompt "a photo of a cat"                      # embedded random-weight model set
    python scripts/generate.py --model-dir ~/models/sd3.5_medium --prompt "a photo of a cat" --seed 1
    python scripts/generate.py --model-dir DIR --prompt-file prompts.txt --num-images 4 --memory sequential --t5 fp8
    python scripts/generate.py --model-dir ~/models/stable-diffusion-3.5-medium --prompt "..."   # diffusers folder
    python scripts/generate.py --model sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors --tokenizers DIR --prompt "..."

Without --model-dir a small random-weight model set in the official layout is built once (cached) and used:
its images are noise, but every stage of the real path runs. Outputs never overwrite existing files; each PNG
carries its parameters as metadata (`--reproduce IMAGE.png` runs them again).
"""

from __future__ import annotations

import argparse
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

from sampling.pipeline import MEMORY_MODES  # noqa: E402
from sampling.samplers import SAMPLERS  # noqa: E402
from scripts.errors import add_debug_flag, run_cli  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES_BY_TORCH = {v: k for k, v in DTYPES.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Text-to-image with SD3.5 Medium (mmditx).")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-dir", type=Path, help="directory laid out like the official release, or a "
                       "diffusers-format folder (model_index.json); default: the embedded random-weight model set "
                       "(for trying the pipeline)")
    model.add_argument("--model", type=Path, metavar="FILE", help="one file holding the transformer, VAE and text "
                       "encoders (text_encoders.clip_l/clip_g/t5xxl.*, e.g. ComfyUI's all-in-one checkpoints); "
                       "tokenizers from --tokenizers")
    p.add_argument("--tokenizers", type=Path, metavar="DIR", help="with --model: the folder holding tokenizer/, "
                   "tokenizer_2/, tokenizer_3/ (default: the file's folder)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt")
    src.add_argument("--prompt-file", type=Path, help="a text file with one prompt per line")
    src.add_argument("--reproduce", type=Path, metavar="PNG", help="run again with the parameters stored in a PNG")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--preset", default="sd3.5_medium", choices=["sd3.5_medium", "sd3.5_medium_model_card"],
                   help="sampling defaults: the official ones (dpmpp_2m, 50 steps, cfg 5, SLG) or the model card's "
                        "(euler, 40 steps, cfg 4.5)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--shift", type=float)
    p.add_argument("--sampler", choices=sorted(SAMPLERS))
    p.add_argument("--seed", type=int)
    p.add_argument("--slg", action=argparse.BooleanOptionalAction, default=None, help="skip-layer guidance")
    p.add_argument("--init-image", type=Path, help="image-to-image: start from this image")
    p.add_argument("--denoise", type=float, help="image-to-image strength in (0, 1] (default 0.6 with --init-image)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images sampled together (default 1: image k equals a single run at seed+k bit for bit; "
                        "larger batches may differ in the last bits on CPU and need more memory)")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output directory, or a .png path")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N, mps; --reproduce: the stored kind")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="fp32 (CPU default), bf16 (GPU default), fp16; --reproduce: the stored one")
    p.add_argument("--memory", choices=MEMORY_MODES, default="resident",
                   help="resident: all models stay loaded; sequential: one model at a time; frugal: sequential "
                        "with weights kept as stored (fp16) and converted block by block (same images, ~half "
                        "the memory)")
    p.add_argument("--t5", choices=["fp16", "fp8", "off"], default=None,
                   help="T5 weights: fp16 (default), fp8 or off; --reproduce: the stored mode")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer: the first step of each size compiles (minutes on CPU), "
                        "later steps run faster; pays for many images or steps (not with --memory frugal)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--check-weights", action="store_true",
                   help="scan every weight for NaN/inf while loading (names the broken tensor; slower loading)")
    add_debug_flag(p)
    return p.parse_args(argv)


MAX_PROMPT_FILE = 10 << 20   # bytes


def check_prompt_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes on the command line arrive as lone surrogates
        raise ValueError(f"{where} is not valid UTF-8 text (character {e.start}): check the terminal's "
                         "encoding, or put the prompt in a UTF-8 file (--prompt-file)") from None
    return text


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file, with one-line errors for anything else."""
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} not found: check the path")
    if not path.is_file():
        raise ValueError(f"prompt file {path} is not a regular file (a directory?): give a text file, one prompt "
                         "per line")
    if path.stat().st_size > MAX_PROMPT_FILE:
        raise ValueError(f"prompt file {path} is larger than {MAX_PROMPT_FILE >> 20} MiB: is it really prompts?")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"prompt file {path} is UTF-16 text: save it as UTF-8")
    if b"\0" in data:
        raise ValueError(f"prompt file {path} is a binary file, not text: give a UTF-8 text file, one prompt per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not valid UTF-8 (byte {e.start}): save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def read_prompts(args) -> list[str | None]:
    if args.prompt_file:
        return read_prompt_file(args.prompt_file)
    if args.reproduce:
        return [None]   # the stored prompt
    return [check_prompt_text(args.prompt if args.prompt is not None else "a photo of a cat", "--prompt")]


def read_stored(args):
    """(GenerationParams, RunSettings) stored in the --reproduce PNG, checked; (None, None) without one."""
    from sampling.metadata import RunSettings, read_png_metadata
    from sampling.pipeline import GenerationParams

    if not args.reproduce:
        return None, None
    data = read_png_metadata(args.reproduce)
    source = f"{args.reproduce} (metadata)"
    params, run = GenerationParams.from_dict(data, source), RunSettings.from_dict(data, source)
    if params.init_image is not None and args.init_image is None:
        raise ValueError(f"{args.reproduce} was made image-to-image from {params.init_image!r} (denoise "
                         f"{params.denoise}): a file named by an image's metadata is never read on its own; pass "
                         f"--init-image PATH to use it (or another image)")
    return params, run


def run_settings(args, stored):
    """t5 mode, dtype, device: the command line's, else the stored ones (--reproduce), else the defaults."""
    from sampling.metadata import RunSettings

    default = stored or RunSettings(dtype=None)
    t5 = args.t5 or default.t5
    dtype = args.dtype or default.dtype
    device = args.device or default.device
    if stored is not None and args.device is None and device != "cpu":
        import torch
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{args.reproduce} was made on {device}, which this machine does not have: pass "
                             "--device cpu to run it here (the pixels may then differ slightly)")
    return t5, dtype, device


def build_params(args, prompt: str | None, stored):
    """The parameters of one prompt: the preset's (or the stored ones with --reproduce), then the command line's."""
    from sampling.pipeline import GenerationParams

    overrides = {"negative_prompt": args.negative_prompt, "width": args.width, "height": args.height,
                 "steps": args.steps, "cfg": args.cfg, "shift": args.shift, "sampler": args.sampler, "seed": args.seed,
                 "slg": args.slg, "denoise": args.denoise,
                 "init_image": str(args.init_image) if args.init_image else None}
    if args.negative_prompt is not None:
        check_prompt_text(args.negative_prompt, "--negative-prompt")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if stored is not None:
        base = stored.to_dict()
        if prompt is not None:
            base["prompt"] = prompt
        return GenerationParams(**{**base, **overrides})
    if "init_image" in overrides and "denoise" not in overrides:
        overrides["denoise"] = 0.6
    return GenerationParams.from_preset(args.preset, prompt=prompt, **overrides)


def image_metadata(params, k: int, pipe, t5: str, embedded: bool) -> dict:
    """What goes into image k's PNG: its GenerationParams and RunSettings (each declared in one field table)."""
    from sampling.metadata import RunSettings, to_json_dict

    run = RunSettings(t5=t5, dtype=DTYPES_BY_TORCH[pipe.dtype], device=pipe.device.type,
                      model=pipe.files.model.name, embedded_random_weights=embedded)
    return {**params.to_dict(), "seed": params.seed + k, **to_json_dict(run)}


def main(argv=None) -> int:
    """The command (also the console script): run() inside the error boundary (scripts/errors.py)."""
    return run_cli(run, argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.tokenizers is not None and args.model is None:
        raise ValueError("--tokenizers goes with --model FILE (a model directory holds its own tokenizers)")
    from mmditx.runtime import tune_for_memory_mode
    from sampling.embedded import model_dir_or_embedded
    from sampling.io import prepare_output, progress_callback, save_png
    from mmditx import read_config
    from mmditx.checkpoint import parse_device
    from sampling.pipeline import MAX_BATCH, MAX_IMAGES, ModelFiles, Pipeline, check_job

    # Everything that can be checked is checked before anything loads: values, prompts, --out.
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise ValueError(f"--batch-size must be between 1 and {MAX_BATCH}, got {args.batch_size}")
    stored, stored_run = read_stored(args)
    t5, dtype, device = run_settings(args, stored_run)
    parse_device(device)
    jobs = [build_params(args, prompt, stored) for prompt in read_prompts(args)]
    out_dir, out_file = prepare_output(args.out)

    if args.model is not None:
        model_dir, embedded = args.model, False
    else:
        model_dir, embedded = model_dir_or_embedded(
            args.model_dir, "Its images are noise; pass --model-dir with the official files for real images.")
    files = (ModelFiles.from_single_file(args.model, args.tokenizers, t5=t5) if args.model is not None
             else ModelFiles.from_dir(model_dir, t5=t5))
    config = read_config(files.model)   # the header only: sizes before loading
    for params in jobs:
        check_job(params, config, args.num_images, args.batch_size)
    tune_for_memory_mode(args.memory)  # this process is ours: reuse freed activations unless frugal
    pipe = Pipeline(files, device=device, dtype=dtype, memory=args.memory, compile=args.compile,
                    check_weights=args.check_weights)
    print(f"model {pipe.files.model.name} ({'embedded random weights' if embedded else model_dir}); "
          f"device {pipe.device}, {DTYPES_BY_TORCH[pipe.dtype]}, memory {args.memory}, T5 {t5}", file=sys.stderr)

    written = []
    for params in jobs:
        print(f"sampler {params.sampler}, {params.steps} steps, cfg {params.cfg}, shift {params.shift}, "
              f"SLG {'on (layers ' + ','.join(map(str, params.slg_layers)) + ')' if params.slg else 'off'}, "
              f"{params.width}x{params.height}, seed {params.seed} (preset {args.preset})", file=sys.stderr)
        start = time.perf_counter()
        images = pipe.generate(params, num_images=args.num_images, batch_size=args.batch_size,
                               callback=progress_callback(args.quiet))
        for k, image in enumerate(images):
            name = out_file or out_dir / f"{params.seed + k:06d}.png"
            written.append(save_png(image, name, image_metadata(params, k, pipe, t5, embedded)))
            print(f"wrote {written[-1]}", file=sys.stderr)
        print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
