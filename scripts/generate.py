"""Generate images with SD3.5 Medium.

    python scripts/generate.py --prompt "a photo of a cat"                      # embedded random-weight model set
    python scripts/generate.py --model-dir ~/models/sd3.5_medium --prompt "a photo of a cat" --seed 1
    python scripts/generate.py --model-dir DIR --prompt-file prompts.txt --num-images 4 --memory sequential --t5 fp8

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

from sampling.pipeline import MEMORY_MODES  # noqa: E402
from sampling.samplers import SAMPLERS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Text-to-image with SD3.5 Medium (mmditx).")
    p.add_argument("--model-dir", type=Path, help="directory laid out like the official release; "
                   "default: the embedded random-weight model set (for trying the pipeline)")
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
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output directory, or a .png path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 (CPU default), bf16 (GPU default), fp16")
    p.add_argument("--memory", choices=MEMORY_MODES, default="resident",
                   help="resident: all models stay loaded; sequential: one model at a time; frugal: sequential "
                        "with weights kept as stored (fp16) and converted block by block (same images, ~half "
                        "the memory)")
    p.add_argument("--t5", choices=["fp16", "fp8", "off"], default="fp16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer: the first step of each size compiles (minutes on CPU), "
                        "later steps run faster; pays for many images or steps (not with --memory frugal)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def build_params(args, prompt: str):
    from sampling.io import read_png_params
    from sampling.pipeline import GenerationParams

    if args.reproduce:
        base = GenerationParams.from_dict(read_png_params(args.reproduce))
    else:
        base = GenerationParams.from_preset(args.preset, prompt=prompt)
    overrides = {"negative_prompt": args.negative_prompt, "width": args.width, "height": args.height,
                 "steps": args.steps, "cfg": args.cfg, "shift": args.shift, "sampler": args.sampler, "seed": args.seed,
                 "slg": args.slg, "denoise": args.denoise,
                 "init_image": str(args.init_image) if args.init_image else None}
    for k, v in overrides.items():
        if v is not None:
            setattr(base, k, v)
    if base.init_image and args.denoise is None and not args.reproduce:
        base.denoise = 0.6
    return base


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmditx.runtime import tune_for_memory_mode
    from sampling.embedded import model_dir_or_embedded
    from sampling.io import progress_callback, save_png
    from sampling.pipeline import Pipeline

    if args.prompt_file:
        prompts = [line.strip() for line in args.prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"{args.prompt_file}: no prompts (one per line)")
    elif args.reproduce:
        prompts = [None]
    else:
        prompts = [args.prompt if args.prompt is not None else "a photo of a cat"]

    model_dir, embedded = model_dir_or_embedded(
        args.model_dir, "Its images are noise; pass --model-dir with the official files for real images.")

    tune_for_memory_mode(args.memory)  # this process is ours: reuse freed activations unless frugal
    try:
        pipe = Pipeline.from_model_dir(model_dir, t5=args.t5, device=args.device, dtype=args.dtype, memory=args.memory,
                                       compile=args.compile)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"model {pipe.files.model.name} ({'embedded random weights' if embedded else model_dir}); "
          f"device {pipe.device}, {str(pipe.dtype).replace('torch.', '')}, memory {args.memory}, T5 {args.t5}",
          file=sys.stderr)

    out_dir = args.out if args.out.suffix.lower() != ".png" else args.out.parent
    written = []
    for prompt in prompts:
        params = build_params(args, prompt)
        print(f"sampler {params.sampler}, {params.steps} steps, cfg {params.cfg}, shift {params.shift}, "
              f"SLG {'on (layers ' + ','.join(map(str, params.slg_layers)) + ')' if params.slg else 'off'}, "
              f"{params.width}x{params.height}, seed {params.seed} (preset {args.preset})", file=sys.stderr)
        start = time.perf_counter()
        try:
            images = pipe.generate(params, num_images=args.num_images, callback=progress_callback(args.quiet))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        for k, image in enumerate(images):
            meta = {**params.to_dict(), "seed": params.seed + k, "model": pipe.files.model.name,
                    "embedded_random_weights": embedded, "t5": args.t5}
            name = args.out if args.out.suffix.lower() == ".png" else out_dir / f"{params.seed + k:06d}.png"
            written.append(save_png(image, name, meta))
            print(f"wrote {written[-1]}", file=sys.stderr)
        print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
