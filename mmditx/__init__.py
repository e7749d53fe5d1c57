"""MMDiT-X, the Stable Diffusion 3.5 Medium transformer, written to be read.

    model = mmditx.load_mmditx("sd3.5_medium.safetensors", device="cpu", dtype=torch.float32)
    v = model(x, t, context=context, y=pooled, skip_layers=())   # velocity, shaped like x
    net = mmditx.load_controlnet("controlnet.safetensors")          # official or diffusers format
    v = model(x, t, context=context, y=pooled, controls=[(net, control_latent, 1.0)])
"""

from .checkpoint import CheckpointError
from .config import ConfigError, MMDiTXConfig, load_config
from .controlnet import ControlNet, load_controlnet, read_controlnet_config
from .loading import load_mmditx, read_config
from .lora import LoraError, apply_lora
from .model import MMDiTX
from .streaming import stop_streaming, stream_weights

__all__ = ["MMDiTX", "MMDiTXConfig", "load_mmditx", "read_config", "load_config", "CheckpointError", "ConfigError",
           "stream_weights", "stop_streaming", "apply_lora", "LoraError", "ControlNet", "load_controlnet",
           "read_controlnet_config"]
