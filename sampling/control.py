"""Control images for ControlNets: preprocessors (canny edges, Gaussian blur) and the VAE encoding per type.

    spec = ControlSpec("sd3.5_large_controlnet_canny.safetensors", "photo.png", strength=0.8, preprocess=True)
    latent = encode_control(vae, load_image(spec), net.config, "canny", width, height)   # (1, 16, H/8, W/8)

Encoding follows the official `sd3_infer.py` (`_image_to_latent`, `vae_encode`): the image is resized to the
output size with Lanczos, scaled to [0, 1], then
    "2b" nets (own patch embedding): 2x - 1 for every type;
    other nets, canny: x * 255 * 0.5 + 0.5 (sic: the official scaling of the SD3.5 Large canny net, which
        diffusers' documentation for that net repeats);
    other nets, blur and depth, and diffusers' own nets: 2x - 1 (diffusers' image processor).
The official code samples the VAE's latent distribution with an unseeded generator; we take its mean, so a
control image always gives the same latent (the VAE's std is tiny next to the mean).

Preprocessors use OpenCV (headless build; the `control` extra): it is maintained, small, has no GUI
dependencies and gives both operations in one call each. Depth maps cannot be computed here (no depth model is
available); give a depth-map image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmditx.controlnet import CONTROL_TYPES, ControlNetConfig

from .io import read_image

CANNY_THRESHOLDS = (100, 200)    # OpenCV's usual pair (the lllyasviel ControlNet annotator's defaults)
BLUR_KERNEL = 51                 # odd side of the Gaussian kernel; sigma follows from it (OpenCV's rule)


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet of a generation: the net's file, its control image, and how strongly / when it steers."""
    file: str
    image: str
    strength: float = 1.0
    start: float = 0.0               # fraction of the steps where it starts steering ...
    end: float = 1.0                 # ... and stops (diffusers' control_guidance_start/end)
    type: str | None = None          # blur, canny or depth; None: the file's own (official files record it)
    preprocess: bool = False         # turn a photo into the control image first (canny edges, blur)

    @classmethod
    def parse(cls, item) -> "ControlSpec":
        """A ControlSpec, a dict of its fields, or a tuple (file, image[, strength, start, end, type, preprocess])."""
        if isinstance(item, ControlSpec):
            spec = item
        elif isinstance(item, dict):
            spec = cls(**{k: v for k, v in item.items() if k in cls.__dataclass_fields__})
        elif isinstance(item, (tuple, list)) and 2 <= len(item) <= 7:
            spec = cls(*item)
        else:
            raise ValueError(f"a ControlNet is given as (file, image, strength, start, end); got {item!r}")
        spec = cls(str(spec.file), str(spec.image), float(spec.strength), float(spec.start), float(spec.end),
                   spec.type, bool(spec.preprocess))
        if not 0.0 <= spec.start < spec.end <= 1.0:
            raise ValueError(f"ControlNet {spec.file}: need 0 <= start < end <= 1, got start {spec.start}, "
                             f"end {spec.end}")
        if spec.type is not None and spec.type not in CONTROL_TYPES:
            raise ValueError(f"unknown control type {spec.type!r}: use one of {', '.join(CONTROL_TYPES)}")
        if spec.preprocess and spec.type == "depth":
            raise ValueError("no depth model is available to compute a depth map: give a depth-map image as the "
                             "control image, without preprocessing")
        if not Path(spec.image).is_file():
            raise ValueError(f"control image {spec.image} not found")
        return spec

    def to_dict(self) -> dict:
        return asdict(self)

    def active(self, step: int, steps: int) -> bool:
        """diffusers' rule: steers on step i (0-based) of n unless i/n < start or (i+1)/n > end."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)


class MissingOpenCV(ImportError, ValueError):
    """OpenCV is not installed (an ImportError, and a ValueError so that scripts report it in one line)."""


def _cv2():
    try:
        import cv2
    except ImportError:
        raise MissingOpenCV("the canny and blur preprocessors need OpenCV: pip install 'mmditx[control]' "
                          "(opencv-python-headless), or give a ready control image without preprocessing") from None
    return cv2


def canny_edges(image: Image.Image, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Image.Image:
    """White edges on black (RGB), from the grayscale image."""
    cv2 = _cv2()
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    return Image.fromarray(cv2.Canny(gray, *thresholds)).convert("RGB")


def gaussian_blur(image: Image.Image, kernel: int = BLUR_KERNEL) -> Image.Image:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the blur kernel side must be a positive odd number, got {kernel}")
    cv2 = _cv2()
    return Image.fromarray(cv2.GaussianBlur(np.asarray(image.convert("RGB")), (kernel, kernel), 0))


PREPROCESSORS = {"canny": canny_edges, "blur": gaussian_blur}


def control_type_of(spec: ControlSpec, file_type: str | None) -> str | None:
    if spec.type and file_type and spec.type != file_type:
        raise ValueError(f"{spec.file} is a {file_type} ControlNet, but --control-type {spec.type} was given")
    return spec.type or file_type


def load_control_image(spec: ControlSpec, control_type: str | None) -> Image.Image:
    image = read_image(spec.image, "control image")
    if spec.preprocess:
        if control_type not in PREPROCESSORS:
            raise ValueError(f"{spec.file}: preprocessing needs the control type canny or blur "
                             f"(give --control-type); got {control_type}")
        image = PREPROCESSORS[control_type](image)
    return image


def control_pixels(image: Image.Image, config: ControlNetConfig, control_type: str | None, width: int,
                   height: int) -> torch.Tensor:
    """The VAE input for a control image, per the official rules above: (1, 3, height, width) float32."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if config.variant == "8b" and control_type == "canny":
        return x * 255 * 0.5 + 0.5
    return 2.0 * x - 1.0


def encode_control(autoencoder, image: Image.Image, config: ControlNetConfig, control_type: str | None,
                   width: int, height: int) -> torch.Tensor:
    """(1, 16, height/8, width/8) control latent in the model's latent format (the VAE mean)."""
    pixels = control_pixels(image, config, control_type, width, height)
    return autoencoder.encode(pixels, sample=False).float().cpu()
