"""MMDiT-X, the Stable Diffusion 3.5 Medium transformer, written to be read.

    model = mmditx.load_mmditx("sd3.5_medium.safetensors", device="cpu", dtype=torch.float32)
    v = model(x, t, context=context, y=pooled, skip_layers=())   # velocity, shaped like x
    net = mmditx.load_controlnet("controlnet.safetensors")          # official or diffusers format
    v = model(x, t, context=context, y=pooled, controls=[(net, control_latent, 1.0)])

The names below load on first use (PEP 562), so that `import mmditx.checkpoint`, the checkpoint reader that
encoders/ and vae/ share, does not import the transformer.
"""

from importlib import import_module

_HOMES = {  # public name -> the module that defines it
    "MMDiTX": "model", "MMDiTXConfig": "config", "load_config": "config", "ConfigError": "config",
    "load_mmditx": "loading", "read_config": "loading", "CheckpointError": "checkpoint",
    "stream_weights": "streaming", "stop_streaming": "streaming", "apply_lora": "lora", "LoraError": "lora",
    "ControlNet": "controlnet", "load_controlnet": "controlnet", "read_controlnet_config": "controlnet",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'mmditx' has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
