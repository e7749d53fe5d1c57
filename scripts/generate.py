"""Generate images with SD3.5 Medium.

    python scripts/generate.py --prompt "a photo of a cat"              # the demo model if built, else random weights
    python scripts/generate.py --model-dir ~/models/sd3.5_medium --prompt "a photo of a cat" --seed 1
    python scripts/generate.py --model-dir DIR --prompt-file prompts.txt --num-images 4 --memory sequential --t5 fp8
    python scripts/generate.py --model-dir ~/models/stable-diffusion-3.5-medium --prompt "..."   # diffusers folder
    python scripts/generate.py --model sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors --tokenizers DIR --prompt "..."

Without --model-dir: the demo model when one is there (a tiny SD3 trained by this project on coloured shapes,
128x128, no T5; sampling/demo_model/ or $MMDITX_DEMO_DIR; docs/demo_model.md), else (and with --random-weights)
a small random-weight set in the full official layout (built once, cached): its images are noise, but every stage
of the real path runs. Outputs never overwrite existing files; each PNG carries its parameters as metadata
(`--reproduce IMAGE.png` runs them again).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

import torch  # noqa: E402

from sampling.defaults import DEFAULT_PRESET, PRESETS  # noqa: E402
from sampling.pipeline import MEMORY_MODES  # noqa: E402
from sampling.samplers import SAMPLERS  # noqa: E402
from sampling.schedulers import SCHEDULERS  # noqa: E402
from scripts.errors import add_debug_flag, run_cli  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES_BY_TORCH = {v: k for k, v in DTYPES.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Text-to-image with SD3.5 Medium (mmditx).")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-dir", type=Path, help="directory laid out like the official release, or a "
                       "diffusers-format folder (model_index.json); default: the demo model (coloured shapes, "
                       "128x128) if there is one, else the random-weight set")
    model.add_argument("--model", type=Path, metavar="FILE", help="one file holding the transformer, VAE and text "
                       "encoders (text_encoders.clip_l/clip_g/t5xxl.*, e.g. ComfyUI's all-in-one checkpoints); "
                       "tokenizers from --tokenizers")
    model.add_argument("--random-weights", action="store_true", help="the embedded random-weight model set in the "
                       "full official layout (T5 included): noise, for trying every stage of the pipeline")
    p.add_argument("--tokenizers", type=Path, metavar="DIR", help="with --model: the folder holding tokenizer/, "
                   "tokenizer_2/, tokenizer_3/ (default: the file's folder)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt")
    src.add_argument("--prompt-file", type=Path, help="a text file with one prompt per line")
    src.add_argument("--reproduce", type=Path, metavar="PNG", help="run again with the parameters stored in a PNG")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESETS,
                   help="sampling defaults: the official ones (dpmpp_2m, 50 steps, cfg 5, SLG) or the model card's "
                        "(euler, 40 steps, cfg 4.5)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--shift", type=float)
    p.add_argument("--sampler", choices=sorted(SAMPLERS))
    p.add_argument("--scheduler", choices=list(SCHEDULERS),
                   help="sigma schedule (default: official; ComfyUI's definitions for flow models, beta = 0.6/0.6)")
    p.add_argument("--seed", type=int)
    p.add_argument("--slg", action=argparse.BooleanOptionalAction, default=None, help="skip-layer guidance")
    p.add_argument("--init-image", type=Path, help="image-to-image: start from this image")
    p.add_argument("--denoise", type=float, help="image-to-image strength in (0, 1] (default 0.6 with --init-image)")
    hires = p.add_argument_group("two-stage (hi-res) generation: a first pass at --width x --height, then "
                                 "image-to-image at the larger size")
    hires.add_argument("--hires-scale", type=float, help="second pass size / first pass size, more than 1 (e.g. 1.5)")
    hires.add_argument("--hires-denoise", type=float, help="second pass strength in (0, 1] (default 0.45)")
    hires.add_argument("--hires-steps", type=int, help="second pass steps (default: --steps)")
    hires.add_argument("--hires-upscale", choices=["latent", "lanczos"],
                       help="latent: bilinear on the latent (default); lanczos: on the decoded image")
    hires.add_argument("--hires-model-dir", type=Path, help="a second model for the second pass (official layout)")
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
    p.add_argument("--t5-tokens", type=int, metavar="N",
                   help="T5 sequence length: 77 (default) gives T5 the prompt's first 226 characters as the official "
                        "code does; 78..512 the whole prompt, cut and padded to N tokens (diffusers' "
                        "max_sequence_length); the model card warns of edge artifacts past 256")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer: the first step of each size compiles (minutes on CPU), "
                        "later steps run faster; pays for many images or steps (not with --memory frugal)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="apply a LoRA (diffusers, kohya or official-name file) with a strength (default 1.0; "
                        "negative or above 1 allowed); repeat to stack several")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--check-weights", action="store_true",
                   help="scan every weight for NaN/inf while loading (names the broken tensor; slower loading)")
    c = p.add_argument_group("ControlNet (repeat --controlnet and --control-image for several nets; the other "
                             "options are given once for all or once per net)")
    c.add_argument("--controlnet", action="append", default=[], metavar="FILE",
                   help="an official SD3.5 ControlNet file or a diffusers-format one (file or folder)")
    c.add_argument("--control-image", action="append", default=[], metavar="IMG", help="its control image")
    c.add_argument("--control-type", action="append", default=[], choices=["canny", "blur", "depth"],
                   help="the net's kind (official files record it); selects the encoding and the preprocessor")
    c.add_argument("--control-strength", action="append", default=[], type=float, metavar="S", help="default 1")
    c.add_argument("--control-start", action="append", default=[], type=float, help="fraction of the steps (0)")
    c.add_argument("--control-end", action="append", default=[], type=float, help="fraction of the steps (1)")
    c.add_argument("--control-preprocess", action="store_true", default=None,
                   help="the control image is a photo: compute canny edges or a blur from it (OpenCV)")
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


def control_specs(args) -> list[dict]:
    """The ControlNets of the command line. With --reproduce, the stored strengths, step ranges, types and
    preprocessing are reused; the files are not: like an init image, a file named by metadata is never read on
    its own, so --controlnet and --control-image must be given again."""
    from sampling.control import ControlSpec
    from sampling.metadata import read_png_metadata

    stored = read_png_metadata(args.reproduce).get("controlnets", []) if args.reproduce else []
    if not isinstance(stored, list) or not all(isinstance(d, dict) for d in stored):
        raise ValueError(f"{args.reproduce}: its 'controlnets' metadata is not a list of objects")
    n = len(args.controlnet)
    if stored and n == 0:
        named = ", ".join(f"{d.get('file')} with {d.get('image')}" for d in stored)
        raise ValueError(f"{args.reproduce} was made with ControlNet(s) {named}: files named by an image's metadata "
                         f"are never read on their own; pass --controlnet FILE --control-image IMG for each (the "
                         f"stored strengths and step ranges are reused)")
    if len(args.control_image) != n:
        raise ValueError(f"give one --control-image per --controlnet ({n} nets, {len(args.control_image)} images)")
    if stored and len(stored) != n:
        raise ValueError(f"{args.reproduce} was made with {len(stored)} ControlNet(s); {n} given")

    def per_net(values, name, field):
        if len(values) not in (0, 1, n):
            raise ValueError(f"--{name} is given {len(values)} times: give it once, or once per net ({n})")
        default = ControlSpec.__dataclass_fields__[field].default
        return [values[k] if len(values) == n else values[0] if values else
                stored[k].get(field, default) if stored else default for k in range(n)]

    preprocess = [args.control_preprocess] if args.control_preprocess is not None else []
    columns = zip(args.controlnet, args.control_image, per_net(args.control_strength, "control-strength", "strength"),
                  per_net(args.control_start, "control-start", "start"), per_net(args.control_end, "control-end", "end"),
                  per_net(args.control_type, "control-type", "type"),
                  per_net(preprocess, "control-preprocess", "preprocess"))
    return [ControlSpec.parse(col).to_dict() for col in columns]


def run_settings(args, stored, demo: bool):
    """t5 mode, dtype, device: the command line's, else the stored ones (--reproduce), else the defaults
    (the demo model has no T5)."""
    from sampling.embedded import default_t5
    from sampling.metadata import RunSettings

    default = stored or RunSettings(dtype=None, t5=default_t5("demo" if demo else "given"))
    t5 = args.t5 or default.t5
    dtype = args.dtype or default.dtype
    device = args.device or default.device
    if stored is not None and args.device is None and device != "cpu":
        import torch
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{args.reproduce} was made on {device}, which this machine does not have: pass "
                             "--device cpu to run it here (the pixels may then differ slightly)")
    return t5, dtype, device


def build_params(args, prompt: str | None, stored, model_defaults: dict | None = None):
    """The parameters of one prompt: the preset's (or the stored ones with --reproduce), then the command line's;
    model_defaults (the demo model's native size and sampling settings) in place of the preset's."""
    from sampling.pipeline import GenerationParams

    overrides = {"negative_prompt": args.negative_prompt, "width": args.width, "height": args.height,
                 "steps": args.steps, "cfg": args.cfg, "shift": args.shift, "sampler": args.sampler, "seed": args.seed,
                 "scheduler": args.scheduler, "t5_tokens": args.t5_tokens, "hires_scale": args.hires_scale,
                 "hires_denoise": args.hires_denoise, "hires_steps": args.hires_steps, "hires_upscale": args.hires_upscale,
                 "hires_model_dir": str(args.hires_model_dir) if args.hires_model_dir else None,
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
    if model_defaults:
        overrides = model_defaults | overrides
    return GenerationParams.from_preset(args.preset, prompt=prompt, **overrides)


def image_metadata(params, k: int, pipe, t5: str, kind: str) -> dict:
    """What goes into image k's PNG: its GenerationParams and RunSettings (each declared in one field table),
    and its ControlNets if any."""
    from sampling.metadata import RunSettings, to_json_dict

    run = RunSettings(t5=t5, dtype=DTYPES_BY_TORCH[pipe.dtype], device=pipe.device.type,
                      model=pipe.files.model.name, embedded_random_weights=kind == "random",
                      demo_model=kind == "demo",
                      loras=[x.record() for x in pipe.loras])
    controls = {"controlnets": [spec.to_dict() for spec in pipe.controls]} if pipe.controls else {}
    return {**params.to_dict(), "seed": params.seed + k, **to_json_dict(run), **controls}


def lora_specs(args, stored_run) -> list:
    """--lora FILE[:STRENGTH] ...; with --reproduce, the LoRAs the PNG recorded (refused if a file changed)."""
    from sampling.loras import check_reproduce, parse_lora_arg

    given = [parse_lora_arg(s) for s in args.lora]
    if stored_run is not None:
        return check_reproduce(stored_run.loras, given)
    return given


def main(argv=None) -> int:
    """The command (also the console script): run() inside the error boundary (scripts/errors.py)."""
    return run_cli(run, argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.tokenizers is not None and args.model is None:
        raise ValueError("--tokenizers goes with --model FILE (a model directory holds its own tokenizers)")
    from mmditx.runtime import tune_for_memory_mode
    from sampling.embedded import demo_available, demo_defaults, demo_info, model_dir_or_demo, model_label
    from sampling.io import prepare_output, progress_callback, save_png
    from mmditx import read_config
    from mmditx.checkpoint import parse_device
    from sampling.jobs import Rank, plan_names, share
    from sampling.pipeline import MAX_BATCH, MAX_IMAGES, ModelFiles, Pipeline, check_job

    me = Rank.from_env()   # one process, or one of torchrun's
    # Everything that can be checked is checked before anything loads: values, prompts, --out.
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise ValueError(f"--batch-size must be between 1 and {MAX_BATCH}, got {args.batch_size}")
    stored, stored_run = read_stored(args)
    if stored_run is not None and stored_run.embedded_random_weights and args.model_dir is None and args.model is None:
        args.random_weights = True   # reproduce on the set it was made with
    demo = args.model_dir is None and args.model is None and not args.random_weights and demo_available()
    t5, dtype, device = run_settings(args, stored_run, demo)
    loras = lora_specs(args, stored_run)
    parse_device(device)
    model_defaults = demo_defaults(demo_info()) if demo and stored is None else None
    jobs = [build_params(args, prompt, stored, model_defaults) for prompt in read_prompts(args)]
    controls = control_specs(args)
    out_dir, out_file = prepare_output(args.out)
    # The whole job, image by image in a fixed order, and every image's file name, decided before sampling.
    images = [(params, k) for params in jobs for k in range(args.num_images)]
    names = plan_names([out_file or out_dir / f"{params.seed + k:06d}.png" for params, k in images])
    if me.world > 1:
        names = start_group(me, names)   # rank 0's plan, so that no file written meanwhile changes it
        if device and device.startswith("cuda") and ":" not in device:
            device = f"cuda:{me.local_rank}"   # one GPU per process

    def locate():
        if args.model is not None:
            return args.model, "given"
        return model_dir_or_demo(args.model_dir, args.random_weights)
    if me.rank == 0:   # builds the random-weight set on first use: once, before the others look for it
        model_dir, kind = locate()
    barrier(me)
    if me.rank > 0:
        model_dir, kind = locate()
    files = (ModelFiles.from_single_file(args.model, args.tokenizers, t5=t5) if args.model is not None
             else ModelFiles.from_dir(model_dir, t5=t5))
    config = read_config(files.model)   # the header only: sizes before loading
    for params in jobs:
        check_job(params, config, args.num_images, args.batch_size)
    tune_for_memory_mode(args.memory)  # this process is ours: reuse freed activations unless frugal
    pipe = Pipeline(files, device=device, dtype=dtype, memory=args.memory, compile=args.compile,
                    check_weights=args.check_weights, loras=loras, controlnets=controls)
    who = f"process {me.rank + 1}/{me.world}: " if me.world > 1 else ""
    print(f"{who}model {pipe.files.model.name} ({model_label(model_dir, kind)}); "
          f"device {pipe.device}, {DTYPES_BY_TORCH[pipe.dtype]}, memory {args.memory}, T5 {t5}", file=sys.stderr)
    for x in pipe.loras:
        print(f"{who}LoRA {x.path.name} ({x.lora.format} format, strength {x.strength:g}, sha256 {x.sha256[:12]}...)",
              file=sys.stderr)

    mine = share(len(images), me.rank, me.world)
    written, begin = {}, time.perf_counter()
    for first, count in runs_of_one_prompt(images, mine):
        params, k0 = images[first]
        params = dataclasses.replace(params, seed=params.seed + k0)   # image k0 + i is a run with seed + k0 + i
        print(f"{who}sampler {params.sampler}, {params.steps} steps, cfg {params.cfg}, shift {params.shift}, "
              f"SLG {'on (layers ' + ','.join(map(str, params.slg_layers)) + ')' if params.slg else 'off'}, "
              f"{params.scheduler} schedule, "
              f"{params.width}x{params.height}, seed {params.seed} (preset {args.preset})", file=sys.stderr)
        start = time.perf_counter()
        out = pipe.generate(params, num_images=count, batch_size=args.batch_size,
                            callback=progress_callback(args.quiet or me.rank > 0))
        for i, image in enumerate(out):
            written[first + i] = save_png(image, names[first + i], image_metadata(params, i, pipe, t5, kind))
            print(f"{who}wrote {written[first + i]}", file=sys.stderr)
        print(f"{who}{len(out)} image(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if me.world > 1:
        written = finish_group(me, written, time.perf_counter() - begin)
    for j in sorted(written):
        print(written[j])
    return 0


def runs_of_one_prompt(images, indices: range):
    """(first index, count) of each run of consecutive images of one prompt within `indices`."""
    start = None
    for j in indices:
        if start is None or images[j][0] is not images[start][0]:
            if start is not None:
                yield start, j - start
            start = j
    if start is not None:
        yield start, indices.stop - start


def start_group(me, names):
    """Join torchrun's gloo group (CPU or GPU alike: it only carries file names and the summary); rank 0's
    names for everyone."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    box = [names]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(me) -> None:
    if me.world > 1:
        import torch.distributed as dist
        dist.barrier()


def finish_group(me, written: dict, seconds: float) -> dict:
    """Every process's written files to rank 0, which prints the summary; the others return nothing to print."""
    import torch.distributed as dist

    gathered = [None] * me.world if me.rank == 0 else None
    dist.gather_object((written, seconds), gathered, dst=0)
    dist.destroy_process_group()
    if me.rank > 0:
        return {}
    merged = {j: path for part, _ in gathered for j, path in part.items()}
    times = ", ".join(f"{s:.1f}" for _, s in gathered)
    print(f"{len(merged)} image(s) from {me.world} processes (sampling and writing, s per process: {times})",
          file=sys.stderr)
    return merged


if __name__ == "__main__":
    sys.exit(main())
