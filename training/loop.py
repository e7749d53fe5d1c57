"""The training loop: AdamW (or Muon), warm-up then constant or cosine LR, clipping, accumulation, optional EMA, DDP or FSDP.

Every random choice of optimizer step `s`, micro-batch `m` comes from a generator seeded with (seed, s, m):
the data order, flips, caption dropout, noise levels, noise and the positional crop, and any choice the dataset
makes itself (it is handed the generator: the demo's dropout and caption picks). So a run resumed from a
saved state continues exactly as if it had not stopped, and K processes (each computing its shard of every
global batch) draw the same numbers as one.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sampling.io import ProgressBar

from .cache import CachedDataset
from .checkpoints import load_state, save_full_checkpoint, save_lora_file, save_state
from .distributed import Distributed
from .muon import Muon, is_hidden_matrix
from .objective import Objective, draw, drop_captions, flow_matching_loss
from .plots import loss_curve_png


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1                  # global batch per micro-step (split over the processes)
    grad_accum: int = 1                  # micro-steps per optimizer step
    lr: float = 1e-4
    lr_schedule: str = "constant"        # "constant" or "cosine" (to 0 at `steps`), after the warm-up
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0        # max global gradient norm; None: no clipping
    ema_decay: float | None = None       # e.g. 0.999: keep an exponential moving average of the trained weights
    seed: int = 0
    mixed_precision: str = "auto"        # "auto": bf16 autocast on GPU, fp32 on CPU; or "bf16", "fp32"
    gradient_checkpointing: bool | str = False   # True / "full", or "selective" (MMDiTX.gradient_checkpointing)
    caption_dropout: tuple[float, float, float] = (0.0, 0.0, 0.0)   # CLIP-L, CLIP-G, T5
    objective: Objective = field(default_factory=Objective)
    save_every: int | None = None        # steps between checkpoints (and always at the end)
    validate_every: int | None = None
    lora_format: str = "diffusers"
    full_checkpoints: bool = True        # write full weights (LoRA runs: merged) beside LoRA files
    compile: bool = False                # torch.compile the training forward and backward (~2 min to compile
                                         # once; the demo's MMDiT-X steps about 1.2x faster on a 2-core CPU)
    optimizer: str = "adamw"             # or "muon": Muon for the joint blocks' weight matrices (see make_optimizer)

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"mixed_precision must be auto, bf16 or fp32, not {self.mixed_precision!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', not {self.optimizer!r}")
        if min(self.steps, self.batch_size, self.grad_accum) < 1:
            raise ValueError("steps, batch size and gradient accumulation must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warm-up, then 1 or a cosine to 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))


class BatchOrder:
    """Global batches of one bucket each: per epoch, each bucket's examples shuffled, cut into batches
    (the last one filled up from the bucket's start), all batches shuffled. Epoch e depends on (seed, e) only."""

    def __init__(self, buckets: dict[tuple[int, int], list[int]], batch_size: int, seed: int):
        self.buckets, self.batch_size, self.seed = buckets, batch_size, seed
        self._epoch, self._batches = None, None

    def epoch(self, e: int) -> list[list[int]]:
        if self._epoch != e:
            rng = random.Random(f"{self.seed}/epoch/{e}")
            batches = []
            for key in sorted(self.buckets):
                items = list(self.buckets[key])
                rng.shuffle(items)
                n = math.ceil(len(items) / self.batch_size)
                cycled = items * math.ceil(n * self.batch_size / len(items))
                batches += [cycled[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n)]
            rng.shuffle(batches)
            self._epoch, self._batches = e, batches
        return self._batches

    def batch(self, k: int) -> list[int]:
        """The k-th global micro-batch of the run."""
        n = len(self.epoch(0))
        return self.epoch(k // n)[k % n]


class Trainer:
    """Trains `model`'s parameters that require gradients (all of them, or LoRA adapters) on a cached dataset."""

    def __init__(self, model: nn.Module, dataset: CachedDataset, config: TrainConfig, run_dir: str | Path,
                 base_file: str | Path | None = None, dist: Distributed | None = None, validation=None,
                 log_stream=sys.stderr):
        self.config, self.dataset, self.run_dir = config, dataset, Path(run_dir)
        self.dist = dist or Distributed()
        self.base_file, self.validation, self.log_stream = base_file, validation, log_stream
        if config.batch_size % self.dist.world:
            raise ValueError(f"the global batch size {config.batch_size} must be a multiple of the number of "
                             f"processes {self.dist.world} (each takes an equal shard)")
        self.device = self.dist.device
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters: add LoRA adapters (training.lora.add_lora) "
                             "or call model.requires_grad_(True) for full fine-tuning")
        model.gradient_checkpointing = config.gradient_checkpointing
        if config.compile and self.dist.fsdp:
            raise ValueError("compile does not combine with FSDP here (its optimizer state is gathered through "
                             "the wrapped module): drop --compile or --fsdp")
        if config.optimizer == "muon" and self.dist.fsdp:
            raise ValueError("Muon orthogonalises whole weight matrices, and FSDP gives each process a shard of "
                             "them: use --optimizer adamw with --fsdp, or DDP")
        self.net = self.dist.wrap(model)
        if config.compile:
            self.net = torch.compile(self.net)      # shares the parameters: saving and resuming read self.model
        self.model = model           # on the device; under FSDP its parameters are this process's shards
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.ema = ({n: p.detach().clone() for n, p in self.trainable} if config.ema_decay else None)
        self.order = BatchOrder(dataset.buckets, config.batch_size, config.seed)
        self.step = 0
        self.history: list[dict] = []
        use_bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    # -- one optimizer step -----------------------------------------------------------------------------
    def micro_batch(self, k: int):
        """Global micro-batch k: (x0, context, pooled, draw, where), randomness from (seed, k); then this process's
        shard. `where`: the loss weights of the latent positions when the dataset gives them, else None."""
        cfg = self.config
        g = torch.Generator().manual_seed(hash_seed(cfg.seed, k))
        indices = self.order.batch(k)
        flips = [bool(torch.rand(1, generator=g) < 0.5) and self.dataset.flip for _ in indices]
        x0, context, pooled, *where = self.dataset.batch(indices, flips, generator=g)
        where = where[0] if where else None
        context, pooled = drop_captions(context, pooled, cfg.caption_dropout, self.dataset.layout, g)
        d = draw(cfg.objective, self.model.config, x0.shape, g)
        b = cfg.batch_size // self.dist.world
        lo, hi = self.dist.rank * b, (self.dist.rank + 1) * b
        dev = self.device
        where = where[lo:hi].to(dev) if where is not None else None
        return x0[lo:hi].to(dev), context[lo:hi].to(dev), pooled[lo:hi].to(dev), d.shard(lo, hi), where

    def train_step(self) -> float:
        cfg = self.config
        self.net.train()
        total = 0.0
        for m in range(cfg.grad_accum):
            k = self.step * cfg.grad_accum + m
            x0, context, pooled, d, where = self.micro_batch(k)
            torch.manual_seed(hash_seed(cfg.seed, k, self.dist.rank))  # LoRA dropout
            last = m == cfg.grad_accum - 1
            with (nullcontext() if last else self.dist.no_sync(self.net)), self.autocast():
                loss = flow_matching_loss(self.net, cfg.objective, x0, context, pooled, d, where)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.trainable:
                    self.ema[n].lerp_(p.detach(), 1 - cfg.ema_decay)
        self.step += 1
        return self.dist.mean(total)

    # -- the run ----------------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> list[dict]:
        """Train to optimizer step `until` (default: config.steps), logging, validating and saving on the way."""
        cfg = self.config
        until = cfg.steps if until is None else until
        writer = self.dist.is_main
        if writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        bar = ProgressBar(until - self.step, label="steps", stream=_Silent())  # we print its line with the loss
        log = (self.run_dir / "log.jsonl").open("a") if writer else None
        start = time.perf_counter()
        try:
            while self.step < until:
                loss = self.train_step()
                row = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                       "time": round(time.perf_counter() - start, 3)}
                self.history.append(row)
                if writer:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    line = bar.update()
                    if self.log_stream is not None:
                        end = "" if self.log_stream.isatty() and self.step < until else "\n"
                        self.log_stream.write(("\r" if self.log_stream.isatty() else "") + line +
                                              f"  loss {loss:.4f}" + end)
                        self.log_stream.flush()
                if cfg.validate_every and self.step % cfg.validate_every == 0 and self.validation is not None:
                    self.validate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < until:
                    self.save()
        finally:
            if log is not None:
                log.close()
        self.save()
        return self.history

    def validate(self) -> Path | None:
        """Process 0 samples the grid; under FSDP every process samples (each forward gathers the shards)."""
        if not (self.dist.is_main or self.dist.fsdp):
            return None
        path = self.run_dir / "validation" / f"step_{self.step:06d}.png"
        written = self.validation.grid(self.model, path, write=self.dist.is_main)
        if self.dist.fsdp:
            self.net.reshard()      # FSDP keeps the root gathered after a forward, for the backward that follows
        return written

    def save(self) -> None:
        """Checkpoint (full weights and/or LoRA file), training state, loss curve: every process takes part
        (FSDP gathers the shards), process 0 writes."""
        self.dist.barrier()
        state = self.state_dict()
        if not self.dist.is_main:
            return
        name = f"step_{self.step:06d}"
        is_lora = any(".lora_" in n for n, _ in self.trainable)
        if is_lora:
            save_lora_file(self.model, self.run_dir / "lora" / f"{name}.safetensors", self.config.lora_format,
                           metadata={"step": self.step})
        if self.base_file is not None and (self.config.full_checkpoints or not is_lora):
            whole = state["trainable"] if self.dist.fsdp else None   # FSDP trains every weight: gathered above
            save_full_checkpoint(self.model, self.base_file, self.run_dir / "checkpoints" / name, state_dict=whole)
        save_state(state, self.run_dir / "state.pt")
        history = [json.loads(line) for line in (self.run_dir / "log.jsonl").read_text().splitlines() if line]
        loss_curve_png(history, self.run_dir / "loss.png")

    # -- resuming ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Whole tensors on process 0 (FSDP: gathered, so every process calls this; the others get none)."""
        names = [n for n, _ in self.trainable]
        return {"step": self.step, "config": self.config.to_dict(),
                "trainable": self.dist.gather(dict(self.trainable)),
                "optimizer": self.dist.optimizer_state(self.net, self.optimizer, names),
                "scheduler": self.scheduler.state_dict(),
                "ema": None if self.ema is None else self.dist.gather(self.ema),
                "data": {"micro_batches_done": self.step * self.config.grad_accum}}

    def load_state_dict(self, state: dict) -> None:
        free = {"steps", "save_every", "validate_every", "full_checkpoints", "lora_format",   # may change on resume
                "compile"}
        saved, now = {"optimizer": "adamw", **state["config"]}, self.config.to_dict()   # older states: AdamW runs
        changed = sorted(k for k in now if k not in free and _plain(saved.get(k)) != _plain(now[k]))
        if changed:
            raise ValueError(f"resume with the options of the original run: {', '.join(changed)} differ "
                             f"(saved {[saved.get(k) for k in changed]}, now {[now[k] for k in changed]})")
        names = [n for n, _ in self.trainable]
        if set(state["trainable"]) != set(names):
            raise ValueError("the saved state trains different parameters than this run (LoRA targets or rank "
                             "changed?): resume with the options of the original run")
        with torch.no_grad():
            for n, p in self.trainable:
                p.copy_(self.dist.place(state["trainable"][n], p))
        self.dist.load_optimizer_state(self.net, self.optimizer, state["optimizer"], names)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["ema"] is not None:
            self.ema = {n: self.dist.place(state["ema"][n], p) for n, p in self.trainable}
        self.step = state["step"]

    def resume(self, path: str | Path) -> None:
        self.load_state_dict(load_state(path))

    def use_average(self) -> None:
        """Put the moving average (config.ema_decay) into the trained weights, to write it out in their place;
        the last trained weights stay only in the run's state.pt."""
        if self.ema is None:
            raise ValueError("this run kept no moving average: train with ema_decay set")
        with torch.no_grad():
            for n, p in self.trainable:
                p.copy_(self.ema[n])


def make_optimizer(trainable: list[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; or Muon (training.muon: momentum, then the update orthogonalised) for the 2-D weights of the joint
    blocks, the hidden layers, with AdamW for the rest (embedders, final layer, norms, biases), as Muon's authors
    prescribe. Muon's step is scaled to AdamW's RMS, so one learning rate and weight decay serve both.
    With the demo's objective, one object, captions in full, the shape came sooner (docs/demo_model.md, "Muon")."""
    adamw = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW([p for _, p in trainable], **adamw)
    hidden = [p for n, p in trainable if is_hidden_matrix(n, p)]
    if not hidden:
        raise ValueError("--optimizer muon trains the joint blocks' weight matrices, and this run trains none "
                         "(a LoRA run?): use --optimizer adamw")
    chosen = {id(p) for p in hidden}
    rest = [p for _, p in trainable if id(p) not in chosen]
    muon = Muon(hidden, lr=config.lr, weight_decay=config.weight_decay)
    return Combined(muon, torch.optim.AdamW(rest, **adamw)) if rest else muon


class Combined(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, as one: a schedule sets every group's LR, one state to save."""

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts
        super().__init__([g for o in parts for g in o.param_groups], {})   # the parts' own group dicts

    @torch.no_grad()
    def step(self, closure=None):
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [o.state_dict() for o in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("parts", ())) != len(self.parts):
            raise ValueError("the saved optimizer state is not this optimizer's: resume with the original options")
        for o, s in zip(self.parts, state["parts"]):
            o.load_state_dict(s)
        self.param_groups = [g for o in self.parts for g in o.param_groups]   # loading replaced their dicts


def _plain(value):
    """Tuples and lists compare equal (a state read back from disk may hold either)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Silent:
    def write(self, text): pass
    def flush(self): pass
    def isatty(self): return False


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes, unlike Python's hash of a tuple)."""
    h = 1469598103934665603
    for p in parts:
        for byte in int(p).to_bytes(8, "little", signed=True):
            h = ((h ^ byte) * 1099511628211) & ((1 << 63) - 1)
    return h
