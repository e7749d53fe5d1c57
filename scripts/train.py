"""Fine-tune SD3.5 Medium (LoRA or full) on an image folder with captions.

    python scripts/train.py --make-example-data examples/shapes                  # a small folder to try it on
    python scripts/train.py --data examples/shapes --out runs/lora --resolution 256 --steps 100
    python scripts/train.py --data DIR --model-dir ~/models/sd3.5_medium --out runs/full --full --lr 1e-5
    torchrun --nproc_per_node=2 scripts/train.py --data DIR --out runs/ddp --batch-size 4
    torchrun --nproc_per_node=4 scripts/train.py --data DIR --model-dir DIR --out runs/fsdp --full --fsdp ...
    python scripts/train.py --data DIR --out runs/lora --steps 200 --resume      # continue a run

Data: name.png|jpg|webp + name.txt captions, or metadata.jsonl (file_name, text). Without --model-dir the
embedded random-weight model set is used (everything runs; nothing meaningful is learned).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for its packages

from scripts.errors import add_debug_flag, run_cli  # noqa: E402


def floats(text: str, n: int) -> tuple[float, ...]:
    values = [float(v) for v in text.split(",")]
    if len(values) == 1:
        values *= n
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"give one value or {n} comma-separated values, not {text!r}")
    return tuple(values)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LoRA or full fine-tuning of SD3.5 Medium (mmditx).")
    p.add_argument("--make-example-data", type=Path, metavar="DIR", help="write a small example folder and exit")
    p.add_argument("--data", type=Path, help="image folder (name.png + name.txt, or metadata.jsonl)")
    p.add_argument("--model-dir", type=Path, help="official release layout; default: embedded random weights")
    p.add_argument("--out", type=Path, help="run directory (caches, checkpoints, LoRA files, logs, state)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    d = p.add_argument_group("data")
    d.add_argument("--resolution", type=int, default=1024, help="bucket area = resolution^2 (multiples of 64)")
    d.add_argument("--max-ratio", type=float, default=2.0, help="most elongated bucket aspect ratio")
    d.add_argument("--crop", choices=["center", "random"], default="center")
    d.add_argument("--flip", action="store_true", help="random horizontal flips")
    d.add_argument("--on-error", choices=["skip", "stop"], default="skip", help="bad images: skip them or stop")
    d.add_argument("--t5", choices=["fp16", "fp8", "off"], default="fp16")
    m = p.add_argument_group("what to train")
    m.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    m.add_argument("--fsdp", action="store_true",
                   help="with --full under torchrun: shard weights, gradients and Adam state over the processes")
    m.add_argument("--from-scratch", action="store_true", help="initialise the transformer (sin-cos, adaLN-Zero)")
    m.add_argument("--lora-rank", type=int, default=16)
    m.add_argument("--lora-alpha", type=float, default=None, help="default: the rank (scale 1)")
    m.add_argument("--lora-dropout", type=float, default=0.0)
    m.add_argument("--lora-targets", default="attn", help="comma-separated: attn, attn2, mlp, adaln")
    m.add_argument("--lora-pattern", action="append", default=[], help="extra module-path pattern (fnmatch)")
    m.add_argument("--lora-no-context", action="store_true", help="adapt the image stream only")
    m.add_argument("--lora-format", choices=["diffusers", "kohya", "official"], default="diffusers")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000)
    o.add_argument("--batch-size", type=int, default=1, help="global batch (split over torchrun processes)")
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--weight-decay", type=float, default=1e-2)
    o.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: Muon for the joint blocks' weight matrices, AdamW for the rest, one LR (full "
                        "fine-tuning; not with --fsdp)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    o.add_argument("--ema", type=float, default=None, metavar="DECAY")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--mixed-precision", choices=["auto", "bf16", "fp32"], default="auto")
    o.add_argument("--gradient-checkpointing", nargs="?", const="full", choices=["full", "selective"],
                   help="recompute each joint block in the backward pass (full), or only its qkv products, "
                        "attention and element-wise ops (selective: faster, a little more memory)")
    o.add_argument("--compile", action="store_true",
                   help="torch.compile the training step: minutes to compile, then faster steps (not with --fsdp)")
    o.add_argument("--device", default="cpu")
    f = p.add_argument_group("flow-matching objective")
    f.add_argument("--sigma-sampling", choices=["logit_normal", "uniform", "mode"], default="logit_normal")
    f.add_argument("--logit-mean", type=float, default=0.0)
    f.add_argument("--logit-std", type=float, default=1.0)
    f.add_argument("--mode-scale", type=float, default=1.29)
    f.add_argument("--shift", default="3.0", help="sigma shift, or 'auto' (resolution-dependent)")
    f.add_argument("--weighting", choices=["none", "sigma_sqrt", "cosmap"], default="none")
    f.add_argument("--no-random-pos-crop", action="store_true", help="center positional crop (as inference)")
    f.add_argument("--caption-dropout", type=lambda s: floats(s, 3), default=(0.0, 0.0, 0.0),
                   help="drop rate per encoder: one value or CLIP-L,CLIP-G,T5")
    v = p.add_argument_group("outputs")
    v.add_argument("--save-every", type=int, default=None)
    v.add_argument("--no-full-checkpoints", action="store_true", help="LoRA runs: LoRA files only")
    v.add_argument("--validation-prompt", action="append", default=[])
    v.add_argument("--validation-seeds", default="0,1")
    v.add_argument("--validate-every", type=int, default=None)
    v.add_argument("--validation-steps", type=int, help="sampling steps of a validation image (default: 20)")
    v.add_argument("--validation-cfg", type=float, help="its guidance scale (default: the sampling preset's)")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_example_data:
        from training.example import make_example_data
        print(make_example_data(args.make_example_data))
        return 0
    if args.data is None or args.out is None:
        raise SystemExit("error: --data and --out are required (or --make-example-data DIR)")
    from sampling.embedded import model_dir_or_embedded
    from training.data import DataError
    from training.loop import TrainConfig
    from training.objective import Objective
    from training.run import LoraOptions, RunOptions, run

    model_dir, _ = model_dir_or_embedded(args.model_dir, "Training runs, but on random weights.")
    try:
        objective = Objective(args.sigma_sampling, args.logit_mean, args.logit_std, args.mode_scale,
                              None if args.shift == "auto" else float(args.shift), args.weighting,
                              not args.no_random_pos_crop)
        train = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
            lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
            grad_clip=args.grad_clip or None, ema_decay=args.ema, seed=args.seed,
            mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing or False,
            caption_dropout=args.caption_dropout, objective=objective, save_every=args.save_every,
            validate_every=args.validate_every, lora_format=args.lora_format,
            full_checkpoints=not args.no_full_checkpoints, compile=args.compile,
            optimizer=args.optimizer)
        lora = None if args.full else LoraOptions(
            args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets.split(",")),
            not args.lora_no_context, tuple(args.lora_pattern))
        from training.cache import CacheOptions
        opts = RunOptions(args.data, model_dir, args.out, train, lora, args.resolution, args.max_ratio,
                          args.on_error, CacheOptions(args.crop, args.flip, args.seed), args.t5, args.device,
                          args.fsdp, args.from_scratch, args.resume, tuple(args.validation_prompt),
                          tuple(int(s) for s in args.validation_seeds.split(",")),
                          **{k: v for k, v in (("validation_steps", args.validation_steps),
                                               ("validation_cfg", args.validation_cfg)) if v is not None})
        run(opts)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))   # OS, decoding, image and device errors as one line (scripts/errors.py)
