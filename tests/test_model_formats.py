"""Model formats: a diffusers-format folder written by diffusers' own `save_pretrained`, single files that bundle
the text encoders (T5 also in ComfyUI's scaled fp8), scripts/convert.py both ways, and bad folders.

The diffusers folder is made the way a user's download was made: the official-layout random model set
(sampling.embedded) converted with diffusers' single-file converters and transformers' models (the oracles of
tests/test_pipeline_reference.py), assembled into diffusers' StableDiffusion3Pipeline and saved with
`save_pretrained` in fp16 (as the released folders), in small shards so the shard indexes are exercised.
transformers 5 saves tokenizers as tokenizer.json only; the released SD3.5 folders also carry T5's
spiece.model, which is copied in (our T5 tokenizer reads sentencepiece's file).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import encoders
import vae as vae_lib
from mmditx import CheckpointError, load_mmditx
from mmditx.checkpoint import save_safetensors
from sampling.embedded import build
from sampling.model_formats import diffusers_to_official, official_to_diffusers
from sampling.pipeline import GenerationParams, ModelFiles, Pipeline
from tests.test_encoders_common import record, t5_oracle

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
LOADERS = {  # component: (our loader, the official file it comes from)
    "transformer": (load_mmditx, "sd3.5_medium.safetensors"),
    "vae": (vae_lib.load_vae, "sd3.5_medium.safetensors"),
    "clip_l": (encoders.load_clip_l, "text_encoders/clip_l.safetensors"),
    "clip_g": (encoders.load_clip_g, "text_encoders/clip_g.safetensors"),
    "t5": (encoders.load_t5, "text_encoders/t5xxl_fp16.safetensors"),
}
PARAMS = GenerationParams(prompt="a photo of a cat", negative_prompt="blurry", width=64, height=48, steps=3,
                          cfg=4.5, sampler="euler", seed=5, slg=False)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("official")
    build(root)
    return root


@pytest.fixture(scope="module")
def diffusers_dir(official, tmp_path_factory) -> Path:
    from tests.test_pipeline_reference import diffusers_pipeline

    ours = Pipeline(ModelFiles.from_dir(official), memory="sequential")
    pipe = diffusers_pipeline(official, ours).to(torch.float16)
    out = tmp_path_factory.mktemp("diffusers") / "sd3.5-diffusers"
    pipe.save_pretrained(out, max_shard_size="300KB")
    shutil.copy(official / "tokenizer_3" / "spiece.model", out / "tokenizer_3")
    return out


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def outputs(component: str, model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if component == "transformer":
            x = torch.randn(2, 16, 8, 6, generator=g)
            return model(x, torch.tensor([500.0, 20.0]), context=torch.randn(2, 20, 4096, generator=g),
                         y=torch.randn(2, 2048, generator=g))
        if component == "vae":
            return model.decode(torch.randn(1, 16, 4, 6, generator=g))
        if component == "t5":
            return model(torch.randint(0, 50, (2, 77), generator=g))
        hidden, pooled = model(torch.randint(0, 500, (2, 77), generator=g))
        return torch.cat([hidden.flatten(1), pooled], dim=1)


def test_diffusers_folder_loads_identical_models(official, diffusers_dir):
    """Every loader reads the diffusers folder (whole, its subfolder, or the shard index) into the same weights
    as the official files: bit-identical (fp16 stored both ways, renaming and fusing q/k/v are exact)."""
    for component, (load, file) in LOADERS.items():
        ref = load(official / file)
        ours = load(diffusers_dir)
        assert_same_state(state(ours), state(ref))
        assert torch.equal(outputs(component, ours), outputs(component, ref)), component
    sub = load_mmditx(diffusers_dir / "transformer")
    index = diffusers_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert_same_state(state(sub), state(load_mmditx(index)))
    assert_same_state(state(vae_lib.load_vae(diffusers_dir / "vae")), state(vae_lib.load_vae(official / LOADERS["vae"][1])))
    # the stored dtype is kept on request, as with the official file (fused qkv included)
    assert {p.dtype for p in load_mmditx(diffusers_dir, dtype=None).parameters()} == {torch.float16}


def test_generate_from_diffusers_folder_equals_official(official, diffusers_dir):
    ref = Pipeline.from_model_dir(official, dtype="fp32", memory="sequential")
    ours = Pipeline.from_model_dir(diffusers_dir, dtype="fp32", memory="frugal")
    _, want = ref.generate(PARAMS, return_latents=True)
    _, got = ours.generate(PARAMS, return_latents=True)
    assert torch.equal(got, want)
    # --t5 fp8 with a folder holding one (fp16) T5: its matrices quantized on load, as load_t5(weight_dtype="fp8")
    t5 = Pipeline.from_model_dir(diffusers_dir, t5="fp8", memory="sequential").text_encoder().t5
    assert_same_state(state(t5), state(encoders.load_t5(official / LOADERS["t5"][1], weight_dtype="fp8")))
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float8_e4m3fn


def test_generate_cli_with_diffusers_folder_and_bundled_file(official, diffusers_dir, tmp_path):
    """generate.py --model-dir DIFFUSERS_FOLDER and --model BUNDLED_FILE --tokenizers DIR give the pixels of the
    official release folder (run here in-process with the same preset)."""
    bundle = tmp_path / "sd3.5_medium_incl_clips_t5.safetensors"
    write_bundle(official, bundle)
    params = GenerationParams.from_preset("sd3.5_medium", prompt="a cat", steps=2, width=64, height=48, seed=3)
    want = np.asarray(Pipeline.from_model_dir(official, memory="sequential").generate(params)[0])
    for source in (["--model-dir", str(diffusers_dir)], ["--model", str(bundle), "--tokenizers", str(official)]):
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *source, "--prompt", "a cat",
                              "--steps", "2", "--width", "64", "--height", "48", "--seed", "3", "--quiet",
                              "--out", str(tmp_path / f"{source[0][2:]}.png")],
                             capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert np.array_equal(np.asarray(Image.open(out.stdout.strip().splitlines()[-1])), want), source


def write_bundle(official: Path, path: Path, t5: dict | None = None) -> None:
    """One file as ComfyUI's all-in-one checkpoints: transformer, VAE, text_encoders.{clip_l,clip_g,t5xxl}.transformer.*"""
    sd = load_file(str(official / "sd3.5_medium.safetensors"))
    for name in ("clip_l", "clip_g", "t5xxl"):
        part = t5 if name == "t5xxl" and t5 is not None else load_file(
            str(official / "text_encoders" / (f"{name}.safetensors" if name != "t5xxl" else "t5xxl_fp16.safetensors")))
        sd.update({f"text_encoders.{name}.transformer.{k}": v for k, v in part.items()})
    save_safetensors(sd, path)


def scaled_fp8(t5: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """T5 in ComfyUI's scaled fp8 (comfy/ops.py, comfy/utils.py convert_old_quants): every linear weight stored
    as fp8 e4m3fn of weight / scale_weight, scale_weight = max|weight| / 448 (e4m3's largest value) in fp32, plus
    the marker key `scaled_fp8`; embedding, norms and the position-bias table stay fp16."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in t5.items():
        if k.endswith(".weight") and v.ndim == 2 and "embed" not in k and "relative_attention_bias" not in k:
            scale = v.float().abs().max() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    return out


def test_scaled_fp8_t5_bundle(official, tmp_path):
    """T5 in scaled fp8 inside a bundled file. Three checks:
    - every stored weight is within e4m3's rounding of the fp16 one (3 mantissa bits: relative error at most
      2^-4, or 2^-10 * scale_weight absolute in the subnormal range);
    - our output equals transformers' T5 holding the dequantized weights (fp8 value * scale_weight, in fp32) to
      1e-5: the whole difference from fp16 is the weights' rounding, nothing else;
    - that difference, measured (relative RMS vs the fp16 T5, these random weights, 2 blocks): 7.8e-2 after block
      0 and 1.6e-1 at the output for scaled fp8; plain fp8 of the same weights (most of them subnormal at this
      scale) 1.7e-1 and 3.7e-1. Random weights make attention sharp, which amplifies weight errors."""
    t5_fp16 = load_file(str(official / "text_encoders" / "t5xxl_fp16.safetensors"))
    bundle = tmp_path / "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
    scaled = scaled_fp8(t5_fp16)
    write_bundle(official, bundle, t5=scaled)
    ours = encoders.load_t5(bundle)
    q = ours.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale is not None   # kept in fp8, one scale per matrix

    dequantized = {}
    for k, v in scaled.items():
        if k.endswith(("scale_weight", "scaled_fp8")):
            continue
        scale = scaled.get(k[: -len(".weight")] + ".scale_weight")
        dequantized[k] = v.float() if scale is None else v.float() * scale
        if scale is not None:
            w = t5_fp16[k].float()
            assert ((dequantized[k] - w).abs() <= 2**-4 * w.abs() + 2**-10 * scale).all(), k
    dq_path = tmp_path / "t5_dequantized.safetensors"
    save_safetensors(dequantized, dq_path)
    ids = torch.randint(0, 50, (2, 77), generator=torch.Generator().manual_seed(1))
    names = ["encoder.block.0", "encoder.final_layer_norm"]
    got, want = record(ours, names, ids), record(t5_oracle(dq_path), names, ids)
    for n in names:
        assert (got[n] - want[n]).abs().max() <= 1e-5 * want[n].abs().max(), n

    fp16 = record(encoders.load_t5(official / LOADERS["t5"][1]), names, ids)
    save_safetensors({k: v.to(torch.float8_e4m3fn) for k, v in t5_fp16.items()}, tmp_path / "t5_fp8.safetensors")
    plain = record(encoders.load_t5(tmp_path / "t5_fp8.safetensors"), names, ids)
    rel = lambda a, b: ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()  # noqa: E731
    errors = {n: (rel(got[n], fp16[n]), rel(plain[n], fp16[n])) for n in names}
    print("relative RMS vs fp16 (scaled fp8, plain fp8):", errors)
    for scaled_err, plain_err in errors.values():
        assert 1e-3 < scaled_err < 0.6 * plain_err

    # and the whole bundle runs through the pipeline, T5 included (already fp8: --t5 fp8 leaves it as it is)
    assert ModelFiles.from_single_file(bundle, tokenizers=official, t5="fp8").t5_weight_dtype is None
    files = ModelFiles.from_single_file(bundle, tokenizers=official)
    assert files.t5 == bundle
    images = Pipeline(files, memory="sequential").generate(PARAMS)
    assert images[0].size == (64, 48)


def test_bundle_without_tokenizers_or_t5_is_a_clear_error(official, tmp_path):
    bundle = tmp_path / "bundle.safetensors"
    sd = load_file(str(official / "sd3.5_medium.safetensors"))
    save_safetensors(sd, bundle)
    with pytest.raises(FileNotFoundError, match=r"bundle\.safetensors: holds no CLIP-L and no CLIP-G text encoder"):
        ModelFiles.from_single_file(bundle, tokenizers=official)
    write_bundle(official, bundle)
    with pytest.raises(FileNotFoundError, match=r"tokenizer: tokenizer folder not found.*--tokenizers DIR"):
        ModelFiles.from_single_file(bundle)
    sd.update({f"text_encoders.clip_l.transformer.{k}": v
               for k, v in load_file(str(official / "text_encoders/clip_l.safetensors")).items()})
    sd.update({f"text_encoders.clip_g.transformer.{k}": v
               for k, v in load_file(str(official / "text_encoders/clip_g.safetensors")).items()})
    save_safetensors(sd, bundle)
    with pytest.raises(FileNotFoundError, match=r"bundle\.safetensors: holds no T5 encoder.*--t5 off"):
        ModelFiles.from_single_file(bundle, tokenizers=official)
    assert ModelFiles.from_single_file(bundle, tokenizers=official, t5="off").t5 is None


def tensors(folder_or_file: Path) -> dict[str, torch.Tensor]:
    files = [folder_or_file] if folder_or_file.is_file() else sorted(folder_or_file.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_convert_round_trips_are_bit_identical_and_diffusers_reads_ours(official, diffusers_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    # official -> diffusers (small shards) -> official: every tensor and tokenizer file as it was
    conv = official_to_diffusers(official, tmp_path / "diffusers", max_shard_bytes=200_000)
    assert (conv / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    back = diffusers_to_official(conv, tmp_path / "official")
    for file in ("sd3.5_medium.safetensors", "text_encoders/clip_l.safetensors", "text_encoders/clip_g.safetensors",
                 "text_encoders/t5xxl_fp16.safetensors"):
        assert_bit_identical(tensors(back / file), tensors(official / file))
    for file in ("tokenizer/vocab.json", "tokenizer_2/merges.txt", "tokenizer_3/spiece.model"):
        assert (back / file).read_bytes() == (official / file).read_bytes()

    # diffusers reads what we wrote, holding exactly what its own converters make of the official file
    pipe = StableDiffusion3Pipeline.from_pretrained(conv, dtype=torch.float16)
    official_sd = load_file(str(official / "sd3.5_medium.safetensors"))
    want = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in official_sd.items() if k.startswith("model.diffusion_model.")})
    assert_bit_identical(pipe.transformer.state_dict(), want)
    want = convert_ldm_vae_checkpoint({k: v for k, v in official_sd.items() if k.startswith("first_stage_model.")},
                                      dict(pipe.vae.config))
    assert_bit_identical(pipe.vae.state_dict(), want)
    clip = load_file(str(official / "text_encoders/clip_l.safetensors"))
    assert_bit_identical({k: v for k, v in pipe.text_encoder.state_dict().items() if k in clip}, clip)

    # diffusers' own folder -> official -> diffusers: each component's tensors as diffusers wrote them, except
    # that T5's token table, saved twice here (shared.weight and its tied copy encoder.embed_tokens.weight, equal),
    # comes back once, as shared.weight
    official_again = diffusers_to_official(diffusers_dir, tmp_path / "official2")
    again = official_to_diffusers(official_again, tmp_path / "diffusers2", max_shard_bytes=300_000)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        want = tensors(diffusers_dir / part)
        if part == "text_encoder_3":
            assert torch.equal(want["shared.weight"], want.pop("encoder.embed_tokens.weight"))
        assert_bit_identical(tensors(again / part), want)


def test_convert_cli_refuses_existing_output_and_wrong_input(official, diffusers_dir, tmp_path, capsys):
    from scripts.convert import main

    def error(*args) -> str:
        assert main([str(a) for a in args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
        return err

    assert f"error: {official} exists" in error("to-official", diffusers_dir, official)
    assert "already a diffusers-format folder" in error("to-diffusers", diffusers_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    with pytest.raises(SystemExit):
        main(["to-diffusers", str(official), str(tmp_path / "x"), "--max-shard-size", "lots"])
    assert "'lots' is not a size such as 10GB" in capsys.readouterr().err


# -- bad folders -------------------------------------------------------------------------------------------

def copy_of(diffusers_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(diffusers_dir, dst)
    return dst


def one_line_error(call, exc=CheckpointError) -> str:
    with pytest.raises(exc) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_missing_subfolder(diffusers_dir, tmp_path):
    root = copy_of(diffusers_dir, tmp_path)
    shutil.rmtree(root / "vae")
    msg = one_line_error(lambda: vae_lib.load_vae(root))
    assert f"{root / 'vae'}: missing subfolder" in msg
    msg = one_line_error(lambda: ModelFiles.from_dir(root), FileNotFoundError)
    assert f"{root / 'vae'}: missing subfolder" in msg


def test_broken_index_and_missing_shard(diffusers_dir, tmp_path):
    root = copy_of(diffusers_dir, tmp_path)
    index = root / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    good = index.read_text()
    index.write_text(good[: len(good) // 2])
    assert f"{index}: not a valid shard index" in one_line_error(lambda: load_mmditx(root))
    index.write_text(json.dumps({"metadata": {}}))
    assert f"{index}: not a valid shard index" in one_line_error(lambda: load_mmditx(root))
    index.write_text(good)
    shard = sorted((root / "transformer").glob("*-of-*.safetensors"))[3]
    shard.unlink()
    msg = one_line_error(lambda: load_mmditx(root))
    assert f"{index}: lists shard {shard.name}, which is missing" in msg
    t5_index = root / "text_encoder_3" / "model.safetensors.index.json"
    data = json.loads(t5_index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "model-00001-of-99999.safetensors"
    t5_index.write_text(json.dumps(data))
    assert "lists shard model-00001-of-99999.safetensors, which is missing" in one_line_error(
        lambda: encoders.load_t5(root))


def test_unknown_component_class_and_other_pipelines(diffusers_dir, tmp_path):
    root = copy_of(diffusers_dir, tmp_path)
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    index_path.write_text(json.dumps(index))
    msg = one_line_error(lambda: load_mmditx(root))
    assert f"{index_path}: component 'transformer' is a FluxTransformer2DModel" in msg
    for cls, kind in (("FluxPipeline", "Flux"), ("StableDiffusionXLPipeline", "SDXL")):
        index_path.write_text(json.dumps({**index, "_class_name": cls}))
        for call in (lambda: load_mmditx(root), lambda: encoders.load_clip_l(root),
                     lambda: Pipeline.from_model_dir(root, memory="sequential")):
            msg = one_line_error(call)
            assert f"{index_path}: a {cls} folder ({kind}), not Stable Diffusion 3" in msg
    # a Flux transformer in diffusers' format, given directly
    flux = tmp_path / "flux.safetensors"
    save_safetensors({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4),
                      "single_transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)}, flux)
    assert "a Flux transformer (diffusers format)" in one_line_error(lambda: load_mmditx(flux))


def test_incomplete_diffusers_transformer(diffusers_dir, tmp_path):
    """A q without its k and v cannot be fused: the error names the missing diffusers keys."""
    sd = tensors(diffusers_dir / "transformer")
    del sd["transformer_blocks.2.attn.to_k.weight"]
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_safetensors(sd, path)
    msg = one_line_error(lambda: load_mmditx(path))
    assert "transformer_blocks.2.attn.to_k.weight missing" in msg and "joint_blocks.2.x_block.attn.qkv.weight" in msg


def test_clip_tokenizer_from_tokenizer_json(tmp_path):
    """transformers 5 saves a CLIP tokenizer as tokenizer.json only: ours reads the same vocabulary and merges
    from it (the real CLIP vocabulary, with its 48894 merges)."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from tests.official import CLIP_TOKENIZER_DIR

    HFCLIPTokenizer(str(CLIP_TOKENIZER_DIR / "vocab.json"), str(CLIP_TOKENIZER_DIR / "merges.txt")).save_pretrained(
        tmp_path)
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    prompts = ["a photo of an astronaut riding a horse on the moon, 4k", "Ünïcode café, DON'T stop!! 1234"]
    assert torch.equal(encoders.CLIPTokenizer(tmp_path)(prompts), encoders.CLIPTokenizer(CLIP_TOKENIZER_DIR)(prompts))


def test_model_dir_holding_a_bundled_file(official, tmp_path):
    """--model-dir with one bundled file and the tokenizer folders (no text_encoders/): the file serves all."""
    write_bundle(official, tmp_path / "my_finetune.safetensors")
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(official / name, tmp_path / name)
    files = ModelFiles.from_dir(tmp_path)
    bundle = tmp_path / "my_finetune.safetensors"
    assert (files.model, files.clip_l, files.clip_g, files.t5) == (bundle, bundle, bundle, bundle)
    assert files.tokenizer_t5 == tmp_path / "tokenizer_3"


def test_mapped_names_are_views_except_fused_qkv(diffusers_dir):
    """Renaming costs no copy: a renamed tensor is a view of the memory-mapped shard; only q, k, v (stored apart
    by diffusers) are concatenated into a new fused tensor, and halves swapped into a new one."""
    from mmditx.loading import open_transformer

    f, prefix = open_transformer(diffusers_dir)
    assert prefix == ""
    fc1, src = f.tensor("joint_blocks.1.x_block.mlp.fc1.weight"), f.source.tensor("transformer_blocks.1.ff.net.0.proj.weight")
    assert fc1.untyped_storage().data_ptr() == src.untyped_storage().data_ptr() and torch.equal(fc1, src)
    qkv = f.tensor("joint_blocks.1.context_block.attn.qkv.weight")
    parts = [f.source.tensor(f"transformer_blocks.1.attn.{n}.weight") for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
    assert qkv.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in parts}
    assert torch.equal(qkv, torch.cat(parts))
    final = f.tensor("final_layer.adaLN_modulation.1.bias")
    scale, shift = f.source.tensor("norm_out.linear.bias").chunk(2)   # diffusers: (scale, shift)
    assert torch.equal(final, torch.cat([shift, scale]))                # official: (shift, scale)


def test_convert_lora_round_trips_are_bit_identical(tmp_path, capsys):
    """convert.py lora: diffusers -> kohya -> diffusers (q/k/v merged into one qkv factor and split back) and
    kohya -> official -> kohya (alphas kept) give back the same tensors, bit for bit."""
    from mmditx.lora import save_lora
    from scripts.convert import main
    from tests.test_lora_formats import LAYOUT, linear_targets, random_factors
    from tests.official import mmditx_layout

    targets = linear_targets(mmditx_layout(**LAYOUT))
    start = {"diffusers": save_lora(tmp_path / "a.safetensors", random_factors(targets, alpha=(None,)), "diffusers"),
             "kohya": save_lora(tmp_path / "b.safetensors", random_factors(targets, seed=1), "kohya")}
    for first, via in (("diffusers", "kohya"), ("kohya", "official")):
        middle, back = tmp_path / f"{first}_{via}.safetensors", tmp_path / f"{first}_back.safetensors"
        assert main(["lora", str(start[first]), str(middle), "--to", via]) == 0
        assert main(["lora", str(middle), str(back), "--to", first]) == 0
        assert_bit_identical(tensors(back), tensors(start[first]))
        assert set(tensors(middle)) != set(tensors(back))                 # the middle file really is the other layout
    assert main(["lora", str(start["kohya"]), str(start["diffusers"]), "--to", "kohya"]) == 1
    assert f"error: {start['diffusers']} exists" in capsys.readouterr().err
