"""SD3's text encoders (CLIP-L, CLIP-G, T5-XXL), their tokenizers and the prompt conditioning, written to be read.

    text = encoders.TextConditioner.from_model_dir("sd3.5_medium/", t5="fp16")     # or "fp8", or "off"
    context, pooled = text.encode(["a photo of a cat"])       # (1, 154, 4096), (1, 2048)
    (cond, cond_pooled), (uncond, uncond_pooled) = text.encode_pair(prompts, negatives)   # one T5 length

or piece by piece:

    clip_l = encoders.load_clip_l("text_encoders/clip_l.safetensors")           # also load_clip_g, load_t5
    ids = encoders.CLIPTokenizer("tokenizer/", pad_with_end=True)(["a photo of a cat"])   # (1, 77)
    hidden, pooled = clip_l(ids)          # penultimate layer (1, 77, 768), pooled at the end token (1, 768)
    t5 = encoders.load_t5("text_encoders/t5xxl_fp8_e4m3fn.safetensors")         # fp8 weights stay fp8
    hidden = t5(encoders.T5Tokenizer("tokenizer_3/")(["a photo of a cat"]))    # (1, 77, 4096)
"""

from mmditx.checkpoint import CheckpointError

from .clip import CLIP_G, CLIP_L, CLIPConfig, CLIPTextModel, load_clip_g, load_clip_l
from .conditioning import TextConditioner
from .t5 import T5_XXL, T5Config, T5Encoder, load_t5
from .tokenizers import CLIPTokenizer, T5Tokenizer

__all__ = ["load_clip_l", "load_clip_g", "load_t5", "CLIPTokenizer", "T5Tokenizer", "TextConditioner",
           "CLIPTextModel", "CLIPConfig", "CLIP_L", "CLIP_G", "T5Encoder", "T5Config", "T5_XXL", "CheckpointError"]
