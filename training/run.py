"""A whole run, as scripts/train.py drives it: folder -> caches -> model (+ LoRA) -> Trainer -> files.

Under torchrun, process 0 builds the caches while the others wait, then every process opens them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmditx import load_mmditx

from .cache import CacheOptions, CachedDataset, build_cache
from .data import scan_folder
from .distributed import Distributed
from .lora import add_lora, target_patterns
from .loop import TrainConfig, Trainer
from .validation import Validation


@dataclass
class LoraOptions:
    rank: int = 16
    alpha: float | None = None            # None: = rank (scale 1)
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn",)  # presets of training.lora.TARGETS
    context: bool = True                  # adapt the text stream's modules too
    patterns: tuple[str, ...] = ()        # extra fnmatch patterns over module paths


@dataclass
class RunOptions:
    data: Path
    model_dir: Path
    out: Path
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraOptions | None = field(default_factory=LoraOptions)   # None: full fine-tuning
    resolution: int = 1024
    max_ratio: float = 2.0
    on_error: str = "skip"
    cache: CacheOptions = field(default_factory=CacheOptions)
    t5: str = "fp16"
    device: str = "cpu"
    fsdp: bool = False                    # under torchrun, full fine-tuning: shard the model over the processes
    from_scratch: bool = False            # initialise the transformer (mmditx.init) instead of using its weights
    resume: bool = False
    validation_prompts: tuple[str, ...] = ()
    validation_seeds: tuple[int, ...] = (0, 1)
    validation_steps: int = Validation.steps
    validation_cfg: float = Validation.cfg


def run(opts: RunOptions, log=None) -> Trainer:
    from sampling.pipeline import ModelFiles

    if opts.fsdp and opts.lora is not None:
        raise ValueError("--fsdp is for full fine-tuning: add --full (LoRA's few trainable parameters gain nothing "
                         "from sharding: train LoRA without --fsdp)")
    dist = Distributed.from_environment(opts.device, fsdp=opts.fsdp)
    say = (log or (lambda m: print(m, file=sys.stderr))) if dist.is_main else (lambda m: None)
    files = ModelFiles.from_dir(opts.model_dir, t5=opts.t5)
    examples, report = scan_folder(opts.data, opts.resolution, opts.max_ratio, opts.on_error)
    say(f"data: {len(examples)} images in {len({e.bucket for e in examples})} buckets from {opts.data}")
    if report:
        say(f"data: skipped {report.summary()}")
    encode_device = dist.device
    if dist.is_main:
        folder = build_cache(examples, files, opts.out, opts.cache, device=encode_device,
                             prompts=opts.validation_prompts, log=say)
    dist.barrier()
    if not dist.is_main:
        folder = build_cache(examples, files, opts.out, opts.cache, prompts=opts.validation_prompts,
                             log=lambda m: None)
    dataset = CachedDataset(folder)

    # FSDP: on the CPU first; sharding moves one block at a time to the device
    model = load_mmditx(files.model, device="cpu" if dist.fsdp else dist.device, dtype=torch.float32)
    if opts.from_scratch:
        from mmditx.init import init_weights
        init_weights(model, seed=opts.train.seed)
    if opts.lora is not None:
        lo = opts.lora
        adapters = add_lora(model, lo.rank, lo.alpha, lo.dropout,
                            target_patterns(lo.targets, lo.context, lo.patterns), seed=opts.train.seed)
        say(f"LoRA: rank {lo.rank} on {len(adapters)} linears, "
            f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    else:
        model.requires_grad_(True)
        say(f"full fine-tuning: {sum(p.numel() for p in model.parameters()):,} parameters")

    validation = None
    if opts.validation_prompts:
        side = int(opts.resolution)
        validation = Validation(dataset, files.vae or files.model, list(opts.validation_prompts),
                                list(opts.validation_seeds), (side, side), opts.validation_steps,
                                opts.validation_cfg)
    trainer = Trainer(model, dataset, opts.train, opts.out, base_file=files.model, dist=dist, validation=validation)
    if dist.fsdp:
        held = sum(p.to_local().numel() for p in model.parameters())
        say(f"FSDP over {dist.world} processes: process 0 holds {held:,} of the "
            f"{sum(p.numel() for p in model.parameters()):,} parameters")
    if opts.resume:
        trainer.resume(opts.out / "state.pt")
        say(f"resumed at step {trainer.step}")
    elif dist.is_main:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "log.jsonl").unlink(missing_ok=True)
    if dist.is_main:
        (opts.out / "options.json").write_text(json.dumps(_jsonable(opts), indent=1))
    trainer.train()
    say(f"done: step {trainer.step}, files in {opts.out}")
    dist.close()
    return trainer


def _jsonable(x):
    if hasattr(x, "__dataclass_fields__"):
        return {k: _jsonable(getattr(x, k)) for k in x.__dataclass_fields__}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
