"""Convert a model between the official release layout and a diffusers-format folder.

    python scripts/convert.py to-diffusers ~/models/sd3.5_medium ~/models/sd3.5_medium-diffusers
    python scripts/convert.py to-diffusers sd3.5_medium_incl_clips.safetensors OUT --tokenizers ~/models/sd3.5_medium
    python scripts/convert.py to-official ~/models/stable-diffusion-3.5-medium ~/models/sd3.5_medium
    python scripts/convert.py lora my_lora.safetensors my_lora_kohya.safetensors --to kohya

Tensors are copied bit for bit (a round trip gives back identical tensors) unless --dtype asks for a cast.
The output folder must not exist; it appears only when complete. LoRA files: read in any format mmditx.lora
reads (diffusers/PEFT, kohya, official names), written in --to's (see mmditx/lora.py for what each holds: the
diffusers layout folds alpha into lora_B, exact where alpha/rank is a power of two).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 10GB, 500MB or 1000000")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def parse_args(argv=None):
    from scripts.errors import add_debug_flag

    p = argparse.ArgumentParser(description="Convert SD3.5 models between the official layout and diffusers'.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("to-diffusers", help="official release folder (or one file bundling the text encoders) "
                       "-> diffusers-format folder")
    d.add_argument("src", type=Path, help="official release folder, or a single .safetensors file")
    d.add_argument("out", type=Path, help="new folder to write")
    d.add_argument("--tokenizers", type=Path, help="with a single file: folder holding tokenizer/, tokenizer_2/, "
                   "tokenizer_3/ (default: the file's folder)")
    d.add_argument("--max-shard-size", type=size, default="10GB", help="largest shard (default 10GB, as diffusers)")
    d.add_argument("--dtype", help="cast floating-point tensors (fp16, bf16, fp32); default: as stored")
    o = sub.add_parser("to-official", help="diffusers-format folder -> official release folder")
    o.add_argument("src", type=Path, help="diffusers-format folder (model_index.json)")
    o.add_argument("out", type=Path, help="new folder to write")
    o.add_argument("--name", default="sd3.5_medium.safetensors", help="file name of the transformer + VAE file")
    o.add_argument("--dtype", help="cast floating-point tensors (fp16, bf16, fp32); default: as stored")
    lo = sub.add_parser("lora", help="LoRA file in one key format -> another")
    lo.add_argument("src", type=Path, help="a LoRA .safetensors file (format detected from its keys)")
    lo.add_argument("out", type=Path, help="new file to write")
    lo.add_argument("--to", required=True, choices=["diffusers", "kohya", "official"], help="format to write")
    for command in (d, o, lo):
        add_debug_flag(command)
    return p.parse_args(argv)


def convert_lora(src: Path, out: Path, fmt: str) -> Path:
    from mmditx.lora import read_lora, save_lora

    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new output file (nothing is overwritten)")
    lora = read_lora(src)
    return save_lora(out, lora.transformer, fmt, text_encoders=lora.text_encoders or None)


def main(argv=None) -> int:
    """The command: run() inside the scripts' error boundary (one line on stderr, exit 1; --debug for more)."""
    from scripts.errors import run_cli

    return run_cli(run, argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    from sampling.model_formats import diffusers_to_official, official_to_diffusers

    if args.command == "to-diffusers":
        out = official_to_diffusers(args.src, args.out, args.tokenizers, args.max_shard_size, args.dtype)
    elif args.command == "lora":
        out = convert_lora(args.src, args.out, args.to)
    else:
        out = diffusers_to_official(args.src, args.out, args.dtype, args.name)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
