"""Where does the image attend to each prompt word? Generate an image and write one heatmap per word.

    python scripts/attention_maps.py --prompt "a photo of a cat" --steps 8      # demo model if built, else random
    python scripts/attention_maps.py --model-dir ~/models/sd3.5_medium --prompt "a red cube on a blue sphere" \\
        --seed 1 --blocks 0-12 --steps-used 0-19 --out outputs/attention

For every word of the prompt: the joint-attention probability that image patches give to the word's tokens
(CLIP-L/G and T5 positions), averaged over attention heads, the chosen joint blocks and sampling steps (the
conditional prompt only), upsampled, colored and blended over the generated image. Writes one PNG per word
(SEED_NN_word.png) and a contact sheet of the image and all panels (SEED_sheet.png) into --out; existing files
are never overwritten. Without --model-dir the demo model is used when there is one (sampling/demo_model/ or
$MMDITX_DEMO_DIR), else (and with --random-weights) the random-weight set in the full official layout, whose
maps mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

from sampling.defaults import DEFAULT_PRESET, PRESETS  # noqa: E402
from sampling.pipeline import MEMORY_MODES  # noqa: E402
from sampling.samplers import SAMPLERS  # noqa: E402
from scripts.errors import add_debug_flag, run_cli  # noqa: E402

RANDOM_SIZE = 256     # default image side with the random-weight set (its positional table allows 512)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Per-word attention heatmaps from SD3.5 Medium's joint attention (mmditx).")
    p.add_argument("--prompt", default="a photo of a cat", help="the prompt (one panel per word)")
    p.add_argument("--negative", "--negative-prompt", dest="negative", default=None, help="negative prompt")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-dir", type=Path, help="directory laid out like the official release; "
                       "default: the demo model if there is one, else the random-weight set")
    model.add_argument("--random-weights", action="store_true",
                       help="the random-weight set in the full official layout (maps without meaning)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESETS,
                   help="sampling defaults, as for generate.py")
    p.add_argument("--width", type=int, help=f"default 1024 (the demo's 128; {RANDOM_SIZE} with --random-weights)")
    p.add_argument("--height", type=int, help=f"default 1024 (the demo's 128; {RANDOM_SIZE} with --random-weights)")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--shift", type=float)
    p.add_argument("--sampler", choices=sorted(SAMPLERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slg", action=argparse.BooleanOptionalAction, default=None, help="skip-layer guidance")
    p.add_argument("--blocks", default="all", help="joint blocks to average, e.g. '0-12', '5,10', '0-3,20' "
                   "(default: all)")
    p.add_argument("--steps-used", default="all", help="sampling steps to average (0 = the first, noisiest), "
                   "e.g. '0-9' (default: all)")
    p.add_argument("--out", type=Path, default=Path("outputs/attention_maps"), help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 (CPU default), bf16 (GPU default), fp16")
    p.add_argument("--memory", choices=MEMORY_MODES, default="resident",
                   help="as for generate.py (frugal: weights streamed to the compute dtype block by block)")
    p.add_argument("--t5", choices=["fp16", "fp8", "off"], help="default fp16 (off with the demo model, which has none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(p)
    return p.parse_args(argv)


def parse_indices(text: str, limit: int, what: str) -> list[int]:
    """'all', '7', '0-12', '0-3,20' -> sorted indices, each checked against 0..limit-1."""
    text = text.strip()
    if text.lower() == "all":
        return list(range(limit))
    out: set[int] = set()
    for part in text.split(","):
        a, dash, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if dash else int(a)
        except ValueError:
            raise ValueError(f"{what} {text!r}: expected indices like '5', '0-12' or '0-3,20' (or 'all')") from None
        if lo > hi:
            raise ValueError(f"{what} {text!r}: range {lo}-{hi} runs backwards")
        out.update(range(lo, hi + 1))
    bad = sorted(i for i in out if i >= limit)
    if bad:
        raise ValueError(f"{what} {text!r}: {bad[0]} is outside 0..{limit - 1}")
    return sorted(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmditx.runtime import tune_for_memory_mode
    from instruments.attention_maps import attention_maps, contact_sheet, overlay, slug, split_words
    from sampling.embedded import default_t5, demo_defaults, demo_info, model_dir_or_demo, model_label
    from sampling.io import prepare_output, progress_callback, save_png
    from sampling.pipeline import GenerationParams, Pipeline

    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"error: --out {args.out} is a file; give a directory (it is created if missing)")
    args.out = prepare_output(args.out, file_allowed=False)[0]   # writable, checked before anything loads

    model_dir, kind = model_dir_or_demo(args.model_dir, args.random_weights)
    if kind == "demo":
        defaults = demo_defaults(demo_info(model_dir))
    else:
        size = RANDOM_SIZE if kind == "random" else 1024
        defaults = {"width": size, "height": size}
    t5 = args.t5 or default_t5(kind)
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps must be at least 1, got {args.steps}")
    try:
        given = dict(width=args.width, height=args.height, steps=args.steps, cfg=args.cfg, shift=args.shift,
                     sampler=args.sampler, seed=args.seed, slg=args.slg)
        params = GenerationParams.from_preset(
            args.preset, prompt=args.prompt, negative_prompt=args.negative or "",
            **defaults | {k: v for k, v in given.items() if v is not None})
    except ValueError as e:   # a value out of its range (GenerationParams' field table names it)
        raise SystemExit(f"error: {e}") from None

    if not split_words(args.prompt):
        raise SystemExit(f"error: the prompt {args.prompt!r} has no words to map (only spaces and punctuation)")
    tune_for_memory_mode(args.memory)  # this process is ours: reuse freed activations unless frugal
    try:
        pipe = Pipeline.from_model_dir(model_dir, t5=t5, device=args.device, dtype=args.dtype, memory=args.memory)
        blocks = parse_indices(args.blocks, pipe.config.depth, "--blocks")
        steps = parse_indices(args.steps_used, params.steps, "--steps-used")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"model {pipe.files.model.name} ({model_label(model_dir, kind)}), "
          f"{pipe.config.depth} joint blocks; sampler {params.sampler}, {params.steps} steps, cfg {params.cfg}, "
          f"SLG {'on' if params.slg else 'off'}, {params.width}x{params.height}, seed {params.seed}", file=sys.stderr)
    print(f"averaging blocks {args.blocks} and steps {args.steps_used}", file=sys.stderr)

    try:
        result = attention_maps(pipe, params, blocks=blocks, steps=steps, callback=progress_callback(args.quiet))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    meta = {**params.to_dict(), "model": pipe.files.model.name, "embedded_random_weights": kind == "random",
            "demo_model": kind == "demo",
            "blocks": result.blocks, "steps_used": result.steps}
    panels, written = [], []
    for k, (word, heat) in enumerate(zip(result.words, result.maps)):
        if not word.positions:
            print(f"skipped {word.text!r}: past both CLIP's 75 tokens and T5's 226 characters, the model never "
                  f"sees it", file=sys.stderr)
            continue
        share = heat.mean().item()
        panel = overlay(result.image, heat, f"{word.text} {100 * share:.1f}%")
        panels.append(panel)
        info = {**meta, "word": word.text, "clip_positions": word.clip, "t5_positions": word.t5,
                "mean_attention": share}
        written.append(save_png(panel, args.out / f"{params.seed:06d}_{k:02d}_{slug(word.text)}.png", info))
        print(f"{word.text!r}: context positions CLIP {word.clip} T5 {word.t5}, {100 * share:.2f}% of the image's "
              f"attention -> {written[-1]}", file=sys.stderr)
    title = f"{args.prompt}  |  blocks {args.blocks}, steps {args.steps_used}"
    title += {"random": "  |  RANDOM WEIGHTS", "demo": "  |  demo model"}.get(kind, "")
    sheet = contact_sheet(result.image, panels, title)
    written.append(save_png(sheet, args.out / f"{params.seed:06d}_sheet.png", meta))
    print(f"contact sheet -> {written[-1]}", file=sys.stderr)
    if kind == "random":
        print("!! random weights: these maps are not semantically meaningful", file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
