"""The SD3 16-channel autoencoder, written to be read.

    ae = vae.load_vae("sd3.5_medium.safetensors", device="cpu", dtype=torch.float32)
    image = ae.decode(latent)                    # model-space latent (B, 16, h, w) -> (B, 3, 8h, 8w) in [-1, 1]
    latent = ae.encode(image, generator=g)       # and back (sampled; sample=False gives the mean)
"""

from mmditx.checkpoint import CheckpointError

from .images import image_to_tensor, latent_preview, latent_to_rgb, tensor_to_images
from .loading import config_from_shapes, load_vae, read_vae_config
from .model import (AUTO_TILE_LATENT_AREA, SCALE_FACTOR, SHIFT_FACTOR, TILE, TILE_OVERLAP, VAE, Decoder, Encoder,
                    VAEConfig)

__all__ = ["VAE", "VAEConfig", "Encoder", "Decoder", "load_vae", "read_vae_config", "config_from_shapes",
           "image_to_tensor", "tensor_to_images", "latent_preview", "latent_to_rgb", "CheckpointError",
           "SCALE_FACTOR", "SHIFT_FACTOR", "AUTO_TILE_LATENT_AREA", "TILE", "TILE_OVERLAP"]
