"""Text-to-image (and image-to-image) with SD3.5 Medium: prompts -> conditioning -> flow sampling -> VAE -> PIL.

    pipe = Pipeline.from_model_dir("models/sd3.5_medium", device="cpu", memory="sequential", t5="fp8")
    images = pipe.generate(GenerationParams(prompt="a photo of a cat", seed=1))

Memory modes:
  resident   every model is loaded once and stays (fastest for many images);
  sequential each model is loaded only while it works: the text encoders for encoding (then freed), the
             transformer for sampling, the VAE for decoding. Peak memory is the largest single model.
  frugal     sequential, and the weights of CLIP and the transformer stay as stored (fp16, memory-mapped, on
             the CPU), converted to the compute dtype and device one block at a time (mmditx.streaming); T5
             keeps its stored fp16/fp8 matrices anyway. Same images, about half the peak memory, a little slower
             (every weight is converted once per model call); on a GPU, only one block at a time is in VRAM.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

import encoders
import vae as vae_lib
from mmditx import load_controlnet, load_mmditx, read_config, read_controlnet_config, stream_weights
from encoders.clip import PREFIXES as CLIP_PREFIXES
from encoders.conditioning import check_t5_mode, release_text_files
from encoders.t5 import PREFIXES as T5_PREFIXES
from encoders.tokenizers import T5_MAX_LENGTH, T5_MIN_LENGTH
from mmditx.checkpoint import compute_dtype, open_safetensors, parse_device, parse_dtype, read_model_index
from mmditx.controlnet import check_compatible, control_units, read_control_type

from .control import ControlSpec, control_type_of, encode_control, load_control_image
from .defaults import DEFAULTS, preset_fields
from .guidance import GuidedDenoiser, SkipLayerGuidance
from .io import check_image_file, read_image
from .loras import apply_to_text_encoders, apply_to_transformer, load_loras
from .metadata import MetadataError, checked, to_json_dict, validate
from .samplers import MODEL_CALLS_PER_STEP, SAMPLERS, get_sampler
from .schedule import img2img_sigmas, initial_noise, noise_latent
from .schedulers import SCHEDULERS, schedule as make_schedule

MODEL_FILE_NAMES = ("sd3.5_medium.safetensors", "sd3.5_large.safetensors", "sd3_medium.safetensors")
MEMORY_MODES = ("resident", "sequential", "frugal")
HIRES_UPSCALERS = ("latent", "lanczos")
CLIP_PROBE = "text_model.embeddings.token_embedding.weight"


# Bounds on what a user may ask for, named in the errors (beyond them a run is a mistake, or hours long).
MAX_STEPS = 1000
MAX_SIDE = 16384            # pixels; the model's positional table usually allows less (checked at generate time)
MAX_CFG = 100.0
SHIFT_RANGE = (0.01, 100.0)
MAX_SEED = 2 ** 63 - 1
MAX_IMAGES = 10000          # per prompt
MAX_BATCH = 64              # images sampled together (memory grows with it)
STAGE_FAILED = ("check the weights (--check-weights), and lower --cfg or bring --shift nearer 3; in fp16, try "
                "bf16 or fp32")


class NonFiniteError(ValueError):
    """A stage produced NaN or inf: reported with the stage and step instead of writing a black image."""


def check_finite(t: torch.Tensor, stage: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NonFiniteError(f"{stage} produced {bad} non-finite value(s) (NaN or inf) of {t.numel()}: "
                             f"{STAGE_FAILED}")


@dataclass
class GenerationParams:
    """Everything that determines an image (written into the PNG so it can be reproduced).

    The sampling defaults are the default preset's (configs/sampling_sd3.5_medium.json: the official dpmpp_2m,
    50 steps, cfg 5.0, skip-layer guidance on), the same as generate.py's; `from_preset` picks another preset.

    Each field is declared once with its type and allowed range (sampling.metadata.checked): construction,
    --reproduce and the command line are all checked against this table. A new option adds its field here,
    with a default that means "off" (older PNGs without the field then reproduce unchanged)."""
    prompt: str
    negative_prompt: str = ""
    width: int = checked(DEFAULTS["width"], lo=16, hi=MAX_SIDE)
    height: int = checked(DEFAULTS["height"], lo=16, hi=MAX_SIDE)
    steps: int = checked(DEFAULTS["steps"], lo=1, hi=MAX_STEPS)
    cfg: float = checked(DEFAULTS["cfg"], lo=0.0, hi=MAX_CFG)
    shift: float = checked(DEFAULTS["shift"], lo=SHIFT_RANGE[0], hi=SHIFT_RANGE[1])
    sampler: str = checked(DEFAULTS["sampler"], choices=tuple(sorted(SAMPLERS)))
    seed: int = checked(0, lo=0, hi=MAX_SEED)
    slg: bool = DEFAULTS["slg"]
    slg_layers: tuple[int, ...] = checked(DEFAULTS["slg_layers"], lo=0, hi=1000)
    slg_scale: float = checked(DEFAULTS["slg_scale"], lo=0.0, hi=MAX_CFG)
    slg_start: float = checked(DEFAULTS["slg_start"], lo=0.0, hi=1.0)
    slg_end: float = checked(DEFAULTS["slg_end"], lo=0.0, hi=1.0)
    denoise: float = checked(1.0, lo=0.0, lo_open=True, hi=1.0)
    init_image: str | None = None
    scheduler: str = checked("official", choices=tuple(SCHEDULERS))  # sampling.schedulers ('official' = 'normal')
    t5_tokens: int = checked(T5_MIN_LENGTH, lo=T5_MIN_LENGTH, hi=T5_MAX_LENGTH)  # > 77: T5 reads whole prompts
    # two-stage (hi-res) generation, off while hires_scale is None: see Pipeline._hires
    hires_scale: float | None = checked(None, lo=1.0, lo_open=True, hi=16.0)
    hires_denoise: float = checked(0.45, lo=0.0, lo_open=True, hi=1.0)
    hires_steps: int | None = checked(None, lo=1, hi=MAX_STEPS)       # None: `steps`
    hires_upscale: str = checked("latent", choices=HIRES_UPSCALERS)
    hires_model_dir: str | None = None                                # a second model for the second pass

    # Stored by every version so far: a PNG lacking one of these was not written by generate.py.
    REQUIRED_IN_METADATA = ("prompt", "negative_prompt", "width", "height", "steps", "cfg", "shift", "sampler",
                            "seed", "slg")

    def __post_init__(self):
        for k, v in validate(type(self), self.__dict__, "").items():
            setattr(self, k, v)

    def to_dict(self) -> dict:
        return to_json_dict(self)

    @classmethod
    def from_preset(cls, preset: str, **fields) -> "GenerationParams":
        """A preset's sampling settings (configs/sampling_PRESET.json) with `fields` on top; a field given as
        None keeps the preset's value."""
        values = preset_fields(preset)
        values.update({k: v for k, v in fields.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict, source: str = "parameters") -> "GenerationParams":
        """Stored parameters (a PNG's metadata), checked: types, ranges and the required keys."""
        missing = [k for k in cls.REQUIRED_IN_METADATA if not isinstance(d, dict) or k not in d]
        if missing:
            raise MetadataError(f"{source}: required parameter(s) {', '.join(missing)} missing from the metadata")
        return cls(**validate(cls, d, source))


@dataclass
class ModelFiles:
    """Where the weights and tokenizers are. `from_dir` reads the official release layout or a diffusers-format
    folder; `from_single_file` a file that bundles the text encoders. Each weight path is whatever the loaders
    take: a file, or a diffusers folder (each loader picks its own subfolder)."""
    model: Path                      # single file with model.diffusion_model.* and first_stage_model.*
    clip_l: Path
    clip_g: Path
    t5: Path | None                  # None: run without T5 (its part of the context is zeros)
    tokenizer_l: Path
    tokenizer_g: Path
    tokenizer_t5: Path | None
    vae: Path | None = None          # a separate VAE file; default: the VAE inside `model`
    t5_weight_dtype: str | None = None  # "fp8": T5's matrices quantized on load (a folder or file with one T5)

    @classmethod
    def from_diffusers(cls, root: str | os.PathLike, t5: str = "fp16") -> "ModelFiles":
        """A diffusers-format folder (model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/). It holds
        one T5 (text_encoder_3/): t5='fp16' loads it as stored, 'fp8' quantizes its matrices on load, 'off' skips it."""
        root = Path(root)
        index = read_model_index(root)
        parts = ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
        parts += ["text_encoder_3", "tokenizer_3"] if t5 != "off" else []
        for part in parts:
            if not isinstance(index.get(part), list) or index[part][0] is None:
                raise FileNotFoundError(f"{root / 'model_index.json'}: lists no '{part}'"
                                        + ("; run without T5 (--t5 off)" if part.endswith("_3") else ""))
            if not (root / part).is_dir():
                raise FileNotFoundError(f"{root / part}: missing subfolder (model_index.json lists '{part}'). "
                                        "The download is incomplete.")
        return cls(model=root, vae=root, clip_l=root, clip_g=root, t5=None if t5 == "off" else root,
                   tokenizer_l=root / "tokenizer", tokenizer_g=root / "tokenizer_2",
                   tokenizer_t5=None if t5 == "off" else root / "tokenizer_3",
                   t5_weight_dtype="fp8" if t5 == "fp8" else None)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, tokenizers: str | os.PathLike | None = None,
                         t5: str = "fp16") -> "ModelFiles":
        """One file holding the transformer, the VAE and the text encoders (`text_encoders.clip_l.*`,
        `text_encoders.clip_g.*`, optionally `text_encoders.t5xxl.*`, as ComfyUI's all-in-one checkpoints, T5
        possibly in scaled fp8). Tokenizers from `tokenizers` (tokenizer/, tokenizer_2/, tokenizer_3/ in it),
        default: the file's folder. Its T5: t5='fp16' as stored, 'fp8' quantized on load (a scaled-fp8 T5 stays as
        it is), 'off' skipped."""
        path = Path(path)
        f = open_safetensors(path)
        missing = [what for what, prefix in (("CLIP-L", CLIP_PREFIXES["CLIP-L"][1]), ("CLIP-G", CLIP_PREFIXES["CLIP-G"][1]))
                   if prefix + CLIP_PROBE not in f]
        if missing:
            raise FileNotFoundError(f"{path}: holds no {' and no '.join(missing)} text encoder "
                                    f"({CLIP_PREFIXES[missing[0]][1]}*): use --model-dir with the release's "
                                    "text_encoders/, or a file that bundles them")
        has_t5 = T5_PREFIXES[1] + "encoder.final_layer_norm.weight" in f
        t5_in_fp8 = has_t5 and f.dtype(T5_PREFIXES[1] + "encoder.block.0.layer.0.SelfAttention.q.weight").itemsize == 1
        if t5 != "off" and not has_t5:
            raise FileNotFoundError(f"{path}: holds no T5 encoder ({T5_PREFIXES[1]}*): run without T5 (--t5 off)")
        tok = Path(tokenizers) if tokenizers is not None else path.parent
        for sub in ("tokenizer", "tokenizer_2") + (("tokenizer_3",) if t5 != "off" else ()):
            if not (tok / sub).is_dir():
                raise FileNotFoundError(f"{tok / sub}: tokenizer folder not found; {path.name} carries no tokenizers: "
                                        "pass --tokenizers DIR (a folder with tokenizer/, tokenizer_2/, tokenizer_3/, "
                                        "as in the official release)")
        return cls(model=path, clip_l=path, clip_g=path, t5=path if t5 != "off" else None,
                   tokenizer_l=tok / "tokenizer", tokenizer_g=tok / "tokenizer_2",
                   tokenizer_t5=tok / "tokenizer_3" if t5 != "off" else None,
                   t5_weight_dtype="fp8" if t5 == "fp8" and not t5_in_fp8 else None)

    @classmethod
    def from_dir(cls, root: str | os.PathLike, t5: str = "fp16") -> "ModelFiles":
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"model directory {root} does not exist")
        if (root / "model_index.json").is_file():
            return cls.from_diffusers(root, t5)
        models = [root / n for n in MODEL_FILE_NAMES if (root / n).is_file()]
        if not models:
            found = sorted(p.name for p in root.glob("*.safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(
                    f"{root}: expected sd3.5_medium.safetensors (or exactly one .safetensors file) in the directory; "
                    f"found {found or 'none'}")
            models = [root / found[0]]
        check_t5_mode(t5)
        bundled = CLIP_PREFIXES["CLIP-L"][1] + CLIP_PROBE in open_safetensors(models[0])
        if not (root / "text_encoders").is_dir() and bundled:
            return cls.from_single_file(models[0], root, t5)   # a file that bundles the text encoders
        return cls(model=models[0], **release_text_files(root, t5))


def check_size(width: int, height: int, max_pixels_side: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if v % 16 or v <= 0:
            raise ValueError(f"{name} {v} is not a positive multiple of 16 (the VAE halves 3 times and the "
                             f"transformer patches 2x2): try {max(16, round(v / 16) * 16)}")
        if v > max_pixels_side:
            raise ValueError(f"{name} {v} is larger than the positional table allows: at most "
                             f"{max_pixels_side} pixels per side for this model")


def check_job(p: GenerationParams, config, num_images: int = 1, batch_size: int = 1) -> torch.Tensor:
    """Everything about a job that can be checked against the model's configuration (read from the header) before
    any weights load; returns the noise schedule."""
    check_size(p.width, p.height, 8 * config.max_latent_size)
    if not 1 <= num_images <= MAX_IMAGES:
        raise ValueError(f"num_images must be between 1 and {MAX_IMAGES}, got {num_images}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}, got {batch_size}")
    if p.slg and max(p.slg_layers, default=-1) >= config.depth:
        raise ValueError(f"skip-layer guidance layers {p.slg_layers} outside the model's 0..{config.depth - 1}")
    schedule = make_schedule(p.scheduler, p.steps, p.shift)
    if p.init_image is not None:
        check_image_file(p.init_image, "init image")
        schedule = img2img_sigmas(schedule, p.denoise)
    if not torch.isfinite(schedule).all():
        raise ValueError(f"shift {p.shift} gives a schedule with non-finite noise levels: use a shift near 3")
    return schedule


def hires_size(p: GenerationParams) -> tuple[int, int]:
    """(width, height) of the second pass: the first pass's times hires_scale, to the nearest multiple of 16."""
    return (max(16, round(p.width * p.hires_scale / 16) * 16), max(16, round(p.height * p.hires_scale / 16) * 16))


class Pipeline:
    def __init__(self, files: ModelFiles, device: str | torch.device = "cpu", dtype=None,
                 memory: str = "resident", compile: bool = False, check_weights: bool = False,
                 loras=(), controlnets=()):
        """compile: run the transformer through `torch.compile` (the first step of each image size compiles:
        about 2 minutes on a 2-core CPU for ~5% per step there; see docs/performance.md).
        check_weights: scan every weight for NaN/inf while loading (a CheckpointError names the tensor).
        loras: [(path, strength), ...] LoRA files of any supported format (mmditx.lora), merged into the
        transformer and text encoders as they are loaded, in this order (see sampling/loras.py).
        controlnets: [(file, control image, strength, start, end), ...] or sampling.control.ControlSpec's;
        each net steers the steps from start to end (fractions) with its strength (first pass only with hires)."""
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, not {memory!r}")
        if compile and memory == "frugal":
            raise ValueError("compile cannot be combined with the frugal memory mode (its weights are swapped "
                             "inside the forward pass): use the resident or sequential memory mode")
        self.files, self.device, self.memory, self.compile = files, parse_device(device), memory, compile
        self.check_weights = check_weights
        self.dtype = parse_dtype(dtype) or compute_dtype(self.device)    # decided here, passed to every part
        self.config = read_config(files.model)  # header only: sizes can be checked before loading anything
        self.loras = load_loras(loras, self.config)  # read and checked now, before any model is loaded
        self.controls = [ControlSpec.parse(c) for c in controlnets]
        for spec in self.controls:              # wrong net for this model: fail before loading anything
            check_compatible(read_controlnet_config(spec.file), self.config, spec.file)
        self._text = self._transformer = self._vae = None
        self._controlnets = None
        if memory == "resident":
            self.text_encoder(), self.transformer(), self.autoencoder()

    @classmethod
    def from_model_dir(cls, root, t5: str = "fp16", **kw) -> "Pipeline":
        return cls(ModelFiles.from_dir(root, t5=t5), **kw)

    # -- components (loaded on demand; kept in resident mode) ---------------------------------------------
    def text_encoder(self):
        if self._text is None:
            f = self.files
            self._text = encoders.TextConditioner.from_files(
                clip_l=f.clip_l, clip_g=f.clip_g, t5=f.t5, tokenizer_l=f.tokenizer_l, tokenizer_g=f.tokenizer_g,
                tokenizer_t5=f.tokenizer_t5, device=self.device, dtype=self.dtype, stream=self.memory == "frugal",
                check_finite=self.check_weights, t5_weight_dtype=f.t5_weight_dtype)
            apply_to_text_encoders(self._text, self.loras)
        return self._text

    def transformer(self):
        if self._transformer is None:
            if self.memory == "frugal":
                model = load_mmditx(self.files.model, device="cpu", dtype=None,   # as stored, zero copy
                                    check_finite=self.check_weights)
                self._transformer = stream_weights(model, self.device, self.dtype)
                apply_to_transformer(model, self.loras)        # added to each block as it is converted
            else:
                model = load_mmditx(self.files.model, device=self.device, dtype=self.dtype,
                                    check_finite=self.check_weights)
                apply_to_transformer(model, self.loras)        # merged: no cost per step
                self._transformer = torch.compile(model) if self.compile else model
        return self._transformer

    def controlnets(self) -> list:
        """The ControlNets, loaded as the transformer is (streamed in the frugal mode)."""
        if self._controlnets is None:
            nets = []
            for spec in self.controls:
                if self.memory == "frugal":
                    net = load_controlnet(spec.file, device="cpu", dtype=None, check_finite=self.check_weights)
                    nets.append(stream_weights(net, self.device, self.dtype, units=control_units(net)))
                else:
                    nets.append(load_controlnet(spec.file, device=self.device, dtype=self.dtype,
                                                check_finite=self.check_weights))
            self._controlnets = nets
        return self._controlnets

    def autoencoder(self):
        if self._vae is None:
            self._vae = vae_lib.load_vae(self.files.vae or self.files.model, device=self.device, dtype=self.dtype,
                                         check_finite=self.check_weights)
        return self._vae

    def _release(self, name: str) -> None:
        if self.memory != "resident":
            setattr(self, name, None)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- the job -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negatives: list[str], t5_tokens: int = T5_MIN_LENGTH):
        pair = self.text_encoder().encode_pair(prompts, negatives, t5_tokens)   # one T5 length: batched for CFG
        self._release("_text")
        return pair

    @torch.no_grad()
    def generate(self, params: GenerationParams, num_images: int = 1,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None,
                 return_latents: bool = False, batch_size: int = 1):
        """Images (PIL) for `params`, seeds params.seed .. params.seed + num_images - 1.

        Image k is exactly the image of a single run with seed params.seed + k: its initial and ancestral noise
        come from its own generator, the prompts are encoded once for all images, and images are sampled
        `batch_size` at a time (1, the default, gives bit-identical images; larger batches run the transformer
        on other matrix shapes, which on CPU can change the last bits, see README).
        callback(step, total_steps, denoised_latent) is called after every step, and once with step -1 (and no
        latent) when each batch begins sampling, after the prompts are encoded."""
        p = params
        schedule = check_job(p, self.config, num_images, batch_size)
        sampler = get_sampler(p.sampler)
        slg = SkipLayerGuidance(p.slg_layers, p.slg_scale, p.slg_start, p.slg_end) if p.slg else None
        hires_files = self._check_hires(p)

        cond, uncond = self.encode_prompts([p.prompt], [p.negative_prompt], p.t5_tokens)   # (1, ...), shared
        for t, what in ((cond[0], "prompt"), (uncond[0], "negative prompt")):
            check_finite(t, f"encoding the {what} (text encoders)")
        init_latent = self._encode_image(p.init_image, p.width, p.height) if p.init_image is not None else None
        controls = self._control_latents(p.width, p.height)

        seeds = [p.seed + k for k in range(num_images)]
        batches = [seeds[i:i + batch_size] for i in range(0, num_images, batch_size)]
        generators = [[torch.Generator("cpu").manual_seed(s) for s in b] for b in batches]  # ancestral noise
        latents = [self._sample(p, sampler, schedule, cond, uncond, init_latent, slg, b, g, callback,
                                controls=controls)
                   for b, g in zip(batches, generators)]
        self._release("_controlnets")
        if p.hires_scale is not None:
            latents = self._hires(p, sampler, latents, cond, uncond, slg, batches, generators, hires_files, callback)
        self._release("_transformer")
        x = torch.cat(latents)

        images = []
        for k in range(num_images):   # one at a time: the same VAE call as a single run, and bounded memory
            image = self.autoencoder().decode(x[k:k + 1])
            check_finite(image, f"decoding image {k + 1} (seed {seeds[k]}) with the VAE")
            images.append(image)
        self._release("_vae")
        pil = vae_lib.tensor_to_images(torch.cat(images))
        return (pil, x) if return_latents else pil

    def _sample(self, p: GenerationParams, sampler, schedule, cond, uncond, init_latent, slg, seeds, generators,
                callback, size: tuple[int, int] | None = None, steps: int | None = None, model=None, controls=()):
        """One batch: the latents (len(seeds), 16, H/8, W/8) after sampling, each image from its own generators.
        size (height, width), steps and model: the second pass's, when not the first's."""
        n = len(seeds)
        height, width = size or (p.height, p.width)
        noise = initial_noise(seeds, self.config.in_channels, height, width)
        latent = None if init_latent is None else init_latent.expand(n, -1, -1, -1)
        x = noise_latent(noise, latent, schedule[0]).to(self.device)
        as_model = [t.expand(n, *t.shape[1:]).to(self.device, self.dtype) for t in (*cond, *uncond)]
        denoiser = GuidedDenoiser(model or self.transformer(), tuple(as_model[:2]), tuple(as_model[2:]), p.cfg,
                                  steps or p.steps, slg, calls_per_step=MODEL_CALLS_PER_STEP.get(p.sampler, 1),
                                  controls=list(controls))
        total = len(schedule) - 1
        if callback:
            callback(-1, total, None)

        def step_done(i, x_, denoised):
            check_finite(x_, f"sampling step {i + 1}/{total} (sigma {float(schedule[i]):.4g}, seeds {seeds[0]}.."
                             f"{seeds[-1]})")
            if callback:
                callback(i, total, denoised)

        return sampler(denoiser, x.float(), schedule.to(self.device), step_done, generator=generators).cpu()

    # -- two-stage (hi-res) generation ---------------------------------------------------------------------
    def _check_hires(self, p: GenerationParams) -> ModelFiles | None:
        """What the field table cannot check, before any work: the size against the (second) model's positional
        table, and the second model's files (returned, or None)."""
        if p.hires_scale is None:
            return None
        try:
            files = ModelFiles.from_dir(p.hires_model_dir, t5="off") if p.hires_model_dir else None
        except FileNotFoundError as e:
            raise ValueError(f"hires model: {e}") from None
        config = read_config(files.model) if files else self.config
        width, height = hires_size(p)
        most = 8 * config.max_latent_size
        if max(width, height) > most:
            raise ValueError(f"hires_scale {p.hires_scale} makes {width}x{height}, larger than the positional table "
                             f"allows ({most} pixels a side): use a hires_scale of at most "
                             f"{math.floor(most / max(p.width, p.height) * 100) / 100}")
        if p.slg and max(p.slg_layers, default=-1) >= config.depth:
            raise ValueError(f"skip-layer guidance layers {p.slg_layers} outside the second model's "
                             f"0..{config.depth - 1}")
        return files

    def _hires(self, p: GenerationParams, sampler, latents, cond, uncond, slg, batches, generators,
               files: ModelFiles | None, callback) -> list[torch.Tensor]:
        """The second pass, batch by batch: the first pass's latents upscaled to hires_size, then image-to-image
        at strength hires_denoise with hires_steps (fresh noise from the same seeds at the new size; ancestral
        noise continues each image's generator). 'latent' upscales the latent bilinearly (A1111's 'Latent'
        upscaler); 'lanczos' decodes, resizes the 8-bit image with Lanczos and encodes it again, exactly what
        --init-image does with the saved first image. The VAE tiles above 1024x1024 (vae.model)."""
        width, height = hires_size(p)
        steps = p.hires_steps or p.steps
        schedule = img2img_sigmas(make_schedule(p.scheduler, steps, p.shift), p.hires_denoise)
        starts = [self._upscale(p.hires_upscale, x, width, height) for x in latents]
        model = None
        if files is not None:  # the second model: loaded now and freed after (the first one first, unless resident)
            self._release("_transformer")
            model = load_mmditx(files.model, device="cpu" if self.memory == "frugal" else self.device,
                                dtype=None if self.memory == "frugal" else self.dtype, check_finite=self.check_weights)
            if self.memory == "frugal":
                model = stream_weights(model, self.device, self.dtype)
        return [self._sample(p, sampler, schedule, cond, uncond, start, slg, b, g, callback, size=(height, width),
                             steps=steps, model=model)
                for start, b, g in zip(starts, batches, generators)]

    def _upscale(self, how: str, latent: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """(n, 16, h, w) -> (n, 16, height/8, width/8), image by image as a single run would do it."""
        if how == "latent":
            return F.interpolate(latent.float(), size=(height // 8, width // 8), mode="bilinear")
        out = []
        for k in range(latent.shape[0]):
            image = vae_lib.tensor_to_images(self.autoencoder().decode(latent[k:k + 1].to(self.device)))[0]
            image = image.resize((width, height), Image.LANCZOS)
            out.append(self.autoencoder().encode(vae_lib.image_to_tensor(image), sample=False).float().cpu())
        return torch.cat(out)

    def _control_latents(self, width: int, height: int) -> list:
        """[(net, (1, C, h, w) control latent, spec)] for the GuidedDenoiser; the VAE encodes every image first."""
        if not self.controls:
            return []
        latents = []
        for spec in self.controls:  # headers only: the nets load after the VAE is freed
            kind = control_type_of(spec, read_control_type(spec.file))
            image = load_control_image(spec, kind)
            latents.append(encode_control(self.autoencoder(), image, read_controlnet_config(spec.file), kind,
                                          width, height))
        self._release("_vae")
        return [(net, latent.to(self.device), spec) for net, latent, spec in zip(self.controlnets(), latents,
                                                                                  self.controls)]

    def _encode_image(self, path: str, width: int, height: int) -> torch.Tensor:
        image = read_image(path, "init image")
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        latent = self.autoencoder().encode(vae_lib.image_to_tensor(image), sample=False)
        self._release("_vae")
        return latent.float().cpu()
