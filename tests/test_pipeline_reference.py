"""End to end: our text-to-image run against diffusers' StableDiffusion3Pipeline assembled from the same tiny
random components (transformers' CLIP/T5 and tokenizers, diffusers' transformer, VAE and Euler scheduler).

Two documented differences are set to match (DESIGN.md): diffusers projects CLIP-L's pooled output (the official
code does not), so the CLIP-L file here has an identity `text_projection`; diffusers pads T5 to 256 tokens by
default (the official code to 77), so it is called with max_sequence_length=77.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmditx.checkpoint import save_safetensors
from sampling.embedded import build
from sampling.pipeline import GenerationParams, ModelFiles, Pipeline
from tests.mmditx_oracle import diffusers_transformer
from tests.test_encoders_common import CLIP_G_HF, CLIP_L_HF, clip_oracle, t5_oracle
from tests.test_vae_reference import diffusers_vae

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build(root)
    path = root / "text_encoders" / "clip_l.safetensors"
    sd = load_file(str(path))
    sd["text_projection.weight"] = torch.eye(sd["text_projection.weight"].shape[0], dtype=torch.float16)
    save_safetensors(sd, path)
    return root


def diffusers_pipeline(root, ours):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    te = root / "text_encoders"
    end = ours.text_encoder().tokenizer_l.end_id
    tok_l = CLIPTokenizer(str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"),
                          model_max_length=77)
    tok_g = CLIPTokenizer(str(root / "tokenizer_2" / "vocab.json"), str(root / "tokenizer_2" / "merges.txt"),
                          pad_token="!", model_max_length=77)  # CLIP-G pads with id 0, as the official one does
    return StableDiffusion3Pipeline(
        transformer=diffusers_transformer(ours.files.model, ours.config),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=diffusers_vae(ours.files.model, ours.autoencoder().config),
        text_encoder=clip_oracle(te / "clip_l.safetensors", eos_token_id=end, **CLIP_L_HF), tokenizer=tok_l,
        text_encoder_2=clip_oracle(te / "clip_g.safetensors", eos_token_id=end, **CLIP_G_HF), tokenizer_2=tok_g,
        text_encoder_3=t5_oracle(te / "t5xxl_fp16.safetensors"),
        tokenizer_3=T5TokenizerFast.from_pretrained(str(root / "tokenizer_3")),
    )


def test_text_to_image_matches_diffusers(model_dir):
    ours = Pipeline(ModelFiles.from_dir(model_dir, t5="fp16"), device="cpu", dtype="fp32")
    params = GenerationParams(prompt="a photo of a cat", negative_prompt="blurry", width=128, height=96, steps=4,
                              cfg=4.5, shift=3.0, sampler="euler", seed=3, slg=False)
    images, latents = ours.generate(params, return_latents=True)

    ref = diffusers_pipeline(model_dir, ours)
    noise = torch.randn((1, 16, 12, 16), generator=torch.Generator("cpu").manual_seed(3))  # DESIGN.md's noise
    with torch.no_grad():
        ref_latents = ref(prompt="a photo of a cat", negative_prompt="blurry", height=96, width=128,
                          num_inference_steps=4, guidance_scale=4.5, latents=noise.clone(), max_sequence_length=77,
                          output_type="latent").images
        ref_image = ref.image_processor.postprocess(
            ref.vae.decode(ref_latents / ref.vae.config.scaling_factor + ref.vae.config.shift_factor).sample,
            output_type="np")[0]
    scale = ref_latents.abs().max()
    assert (latents - ref_latents).abs().max() <= 1e-4 * scale
    ours_px = np.asarray(images[0]).astype(int)
    ref_px = np.round(ref_image * 255).astype(int)
    assert ours_px.shape == ref_px.shape == (96, 128, 3)
    assert np.abs(ours_px - ref_px).max() <= 1  # 8-bit rounding of the same image
    # and the run is not trivial: guidance changed the result
    no_cfg = ours.generate(GenerationParams(**{**params.to_dict(), "cfg": 1.0, "slg_layers": (7, 8, 9)}),
                           return_latents=True)[1]
    assert (no_cfg - latents).abs().max() > 1e-3 * scale
