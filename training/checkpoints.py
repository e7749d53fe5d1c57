"""What a run writes: full weights in the official single-file layout, LoRA files, the training state.

    RUN/checkpoints/step_000100/sd3.5_medium.safetensors   model.diffusion_model.* (trained) + first_stage_model.*
                                                           (copied from the base file); text_encoders/ and
                                                           tokenizer*/ link to the base model directory, so the
                                                           folder is a model directory for generate.py --model-dir
    RUN/lora/step_000100.safetensors                       the adapters (diffusers/PEFT or kohya format)
    RUN/state.pt                                           optimizer, LR schedule, step, EMA, trainable weights
Every file is written beside its target and renamed over it: an interrupted write never leaves a partial file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmditx.checkpoint import open_safetensors, write_safetensors_streaming, written_whole

from .lora import lora_factors, lora_modules

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
LINKED = ("text_encoders", "tokenizer", "tokenizer_2", "tokenizer_3")


def save_full_checkpoint(model, base_file: str | Path, folder: str | Path, file_name: str = "sd3.5_medium.safetensors",
                         dtype: torch.dtype = torch.float16, state_dict: dict | None = None) -> Path:
    """The model's weights (adapters merged into a copy of each adapted weight) under the official names, plus
    the base file's VAE, in `dtype`; links to the base directory's text encoders and tokenizers.
    state_dict: the model's, when the model does not hold it whole (FSDP: gathered from the shards)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapters = lora_modules(model)
    weights = {}
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        if ".lora_" in name:
            continue
        module = name.rpartition(".")[0].removesuffix(".base")
        if name.endswith(".base.weight") and module in adapters:
            t = t + adapters[module].delta_weight().to(t.dtype)
        weights[TRANSFORMER_PREFIX + name.replace(".base.", ".")] = t
    base = open_safetensors(base_file)
    vae_keys = [k for k in base.keys() if k.startswith(VAE_PREFIX)]
    specs = {k: (tuple(t.shape), dtype) for k, t in weights.items()}
    specs.update({k: (base.shape(k), dtype) for k in vae_keys})

    def produce(key: str) -> torch.Tensor:
        t = weights[key] if key in weights else base.tensor(key)
        return t.detach().to("cpu", dtype)

    path = folder / file_name
    write_safetensors_streaming(specs, produce, path, metadata={"format": "pt", "written_by": "mmditx training"})
    for name in LINKED:
        source = Path(base_file).parent / name
        link = folder / name
        if source.exists() and not link.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)
    return path


def save_lora_file(model, path: str | Path, format: str = "diffusers", metadata: dict | None = None) -> Path:
    """The adapters of `model` as a LoRA file, through the project's one LoRA key mapping (mmditx.lora)."""
    from mmditx.lora import save_lora

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, lora_factors(model), format=format, metadata=metadata)
    return Path(path)


def save_state(state: dict, path: str | Path) -> None:
    with written_whole(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state to resume from (written as RUN/state.pt by a run)")
    # mmap: the processes of one machine share the file's pages instead of each reading a copy into memory
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
