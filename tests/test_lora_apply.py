"""mmditx.apply_lora against diffusers + peft (the oracle), in fp32, on a tiny random MMDiT-X.

The random LoRA is made here in diffusers' names (every linear layer diffusers' SD3 transformer has: q, k, v
separate, attn2 of the dual-attention blocks, the pre-only last block, the embedders, norm_out ...) and written
in three layouts by this test's own code: diffusers/PEFT (loaded by diffusers' `load_lora_adapter`), kohya
(q, k, v fused into one block-structured qkv product here) and official names with OneTrainer's split
`qkv.0/1/2`. All three must give diffusers' output.
"""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch
from safetensors.torch import save_file

import mmditx
from mmditx import LoraError, apply_lora, load_mmditx, stream_weights
from tests.mmditx_oracle import diffusers_transformer, rel_error
from tests.official import mmditx_layout, write_random_checkpoint

pytest.importorskip("peft")

TOL = 1e-5
LAYOUT = dict(hidden=128, depth=3, dual=(0, 1), pos_max=16, context_dim=96, pooled_dim=64)
QKV = {"to_q": ("x_block.attn.qkv", 0), "to_k": ("x_block.attn.qkv", 1), "to_v": ("x_block.attn.qkv", 2),
       "add_q_proj": ("context_block.attn.qkv", 0), "add_k_proj": ("context_block.attn.qkv", 1),
       "add_v_proj": ("context_block.attn.qkv", 2)}


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cfg.in_channels, 8, 8, generator=g), torch.tensor([300.0, 800.0]),
            torch.randn(2, 7, cfg.context_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora_apply") / "model.safetensors"
    write_random_checkpoint(mmditx_layout(**LAYOUT), path, seed=zlib.crc32(b"lora_apply"))
    return path


@pytest.fixture(scope="module")
def oracle(model_file):
    """diffusers' transformer with the same weights, and a random LoRA on every one of its linear layers."""
    ours = load_mmditx(model_file)
    ref = diffusers_transformer(model_file, ours.config)
    g = torch.Generator().manual_seed(5)
    lora = {}   # diffusers module name -> (A (r, in), B (out, r))
    for i, (name, m) in enumerate(sorted(ref.named_modules())):
        if isinstance(m, torch.nn.Linear):
            r = 2 + i % 3
            lora[name] = (torch.randn(r, m.in_features, generator=g) / m.in_features ** 0.5,
                          torch.randn(m.out_features, r, generator=g) * 0.2)
    assert any(".attn2." in n for n in lora) and "transformer_blocks.2.norm1_context.linear" in lora
    return ours, ref, lora


def diffusers_file(lora, path):
    sd = {}
    for name, (a, b) in lora.items():
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
    save_file(sd, path)
    return path


def official_names(lora):
    """diffusers names -> official names, written out here: {official: (A, B)} with q/k/v kept as parts
    {official qkv: {part: (A, B)}}; the adaLN linears diffusers orders (scale, shift) get their B rows swapped."""
    plain, parts = {}, {}
    glob = {"context_embedder": "context_embedder", "proj_out": "final_layer.linear",
            "norm_out.linear": "final_layer.adaLN_modulation.1",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
    block = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
             "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
             "ff_context.net.2": "context_block.mlp.fc2"}
    for name, (a, b) in lora.items():
        if name in glob:
            official = glob[name]
        else:
            _, i, rest = name.split(".", 2)
            attn, _, proj = rest.partition(".")
            if proj in QKV:
                qkv, part = QKV[proj]
                qkv = qkv.replace("attn.", attn + ".")
                parts.setdefault(f"joint_blocks.{i}.{qkv}", {})[part] = (a, b)
                continue
            official = f"joint_blocks.{i}.{block[rest]}"
        if official.endswith("adaLN_modulation.1") and b.shape[0] == 2 * a.shape[1]:
            b = torch.cat(b.chunk(2)[::-1])
        plain[official] = (a, b)
    return plain, parts


def kohya_file(lora, path):
    plain, parts = official_names(lora)
    for qkv, p in parts.items():       # fuse: A stacked, B block-diagonal (rank = sum of the part ranks)
        a = torch.cat([p[j][0] for j in range(3)])
        b = torch.block_diag(*[p[j][1] for j in range(3)])
        plain[qkv] = (a, b)
    sd = {}
    for name, (a, b) in plain.items():
        k = "lora_unet_" + name.replace(".", "_")
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = a, b
        sd[k + ".alpha"] = torch.tensor(float(a.shape[0]))          # alpha = rank: scale 1, as diffusers
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def onetrainer_file(lora, path):
    plain, parts = official_names(lora)
    sd = {}
    for name, (a, b) in plain.items():
        sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = a, b
    for qkv, p in parts.items():
        for j, (a, b) in p.items():
            sd[f"diffusion_model.{qkv}.{j}.lora_down.weight"], sd[f"diffusion_model.{qkv}.{j}.lora_up.weight"] = a, b
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


WRITERS = {"diffusers": diffusers_file, "kohya": kohya_file, "official": onetrainer_file}


@pytest.fixture(scope="module")
def reference_outputs(oracle, tmp_path_factory):
    ours, ref, lora = oracle
    path = diffusers_file(lora, tmp_path_factory.mktemp("ref") / "lora.safetensors")
    ref.load_lora_adapter(str(path), prefix="transformer", adapter_name="oracle")
    x, t, ctx, y = inputs(ours.config)
    outs = {}
    with torch.no_grad():
        for s in (1.0, 0.5):
            outs[s] = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                          joint_attention_kwargs={"scale": s}, return_dict=False)[0]
        ref.disable_adapters()
        outs[0.0] = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                        return_dict=False)[0]
    return outs


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "official"])
def test_against_diffusers(oracle, reference_outputs, tmp_path, fmt):
    ours, _, lora = oracle
    path = WRITERS[fmt](lora, tmp_path / f"{fmt}.safetensors")
    x, t, ctx, y = inputs(ours.config)
    with torch.no_grad():
        base = ours(x, t, ctx, y)
        assert rel_error(base, reference_outputs[0.0]) <= TOL
        assert rel_error(base, reference_outputs[1.0]) > 1e-3          # the LoRA really changes the output
        for s in (1.0, 0.5):
            handle = apply_lora(ours, path, strength=s)
            assert handle.format == fmt
            out = ours(x, t, ctx, y)
            handle.remove()
            assert rel_error(out, reference_outputs[s]) <= TOL, f"{fmt} strength {s}: {rel_error(out, reference_outputs[s]):.2e}"


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int32), before[k].view(torch.int32)), k


def test_remove_is_bit_identical_with_stacking_and_any_strength(oracle, tmp_path):
    ours, _, lora = oracle
    before = snapshot(ours)
    a = apply_lora(ours, diffusers_file(lora, tmp_path / "a.safetensors"), strength=1.7)
    b = apply_lora(ours, kohya_file(lora, tmp_path / "b.safetensors"), strength=-0.9)
    c = apply_lora(ours, onetrainer_file(lora, tmp_path / "c.safetensors"), strength=123.0)
    with pytest.raises(RuntimeError, match="reverse order"):
        a.remove()
    c.remove(), b.remove(), a.remove()
    assert_bit_identical(ours, before)
    with pytest.raises(RuntimeError, match="already removed"):
        a.remove()


def test_unrestorable_merge_is_the_same_and_refuses_removal(oracle, tmp_path):
    ours, _, lora = oracle
    path = diffusers_file(lora, tmp_path / "a.safetensors")
    before = snapshot(ours)
    h = apply_lora(ours, path, 0.9)
    merged = snapshot(ours)
    h.remove()
    fast = apply_lora(ours, path, 0.9, restorable=False)
    assert_bit_identical(ours, merged)
    with pytest.raises(RuntimeError, match="restorable=False"):
        fast.remove()
    ours.load_state_dict(before)
    ours._lora_handles.clear()


def test_stacking_adds_the_deltas(oracle, reference_outputs, tmp_path):
    """0.5 + 0.5 of the same LoRA == strength 1 (diffusers' output) up to rounding."""
    ours, _, lora = oracle
    path = diffusers_file(lora, tmp_path / "a.safetensors")
    x, t, ctx, y = inputs(ours.config)
    handles = [apply_lora(ours, path, 0.5), apply_lora(ours, path, 0.5)]
    with torch.no_grad():
        out = ours(x, t, ctx, y)
    for h in reversed(handles):
        h.remove()
    assert rel_error(out, reference_outputs[1.0]) <= TOL


def test_frugal_mode_keeps_stored_weights_and_gives_merged_outputs(model_file, oracle, tmp_path):
    """Weights kept as stored (fp16) and streamed: the LoRA is added to each converted block, so the output is
    bit-identical to a model loaded in fp32 with the LoRA merged, and the stored weights never change."""
    _, _, lora = oracle
    path = diffusers_file(lora, tmp_path / "a.safetensors")
    half = tmp_path / "half.safetensors"
    write_random_checkpoint(mmditx_layout(**LAYOUT), half, dtype=torch.float16, seed=7)
    merged = load_mmditx(half, dtype=torch.float32)
    streamed = stream_weights(load_mmditx(half, dtype=None), "cpu", torch.float32)
    stored = snapshot(streamed)
    x, t, ctx, y = inputs(merged.config)
    h1, h2 = apply_lora(merged, path, 0.8), apply_lora(streamed, path, 0.8)
    assert not h2.merged and h2.streamed
    with torch.no_grad():
        a, b = merged(x, t, ctx, y), streamed(x, t, ctx, y)
    assert torch.equal(a, b)
    assert all(v.dtype == torch.float16 for v in streamed.state_dict().values())
    assert_bit_identical_any(streamed, stored)
    with pytest.raises(ValueError, match="remove them"):
        mmditx.stop_streaming(streamed)
    h2.remove()
    with torch.no_grad():
        assert torch.equal(streamed(x, t, ctx, y), load_mmditx(half, dtype=torch.float32)(x, t, ctx, y))


def assert_bit_identical_any(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fp16_weights_merge_and_restore_exactly(oracle, tmp_path):
    _, _, lora = oracle
    path = kohya_file(lora, tmp_path / "k.safetensors")
    half = tmp_path / "half.safetensors"
    write_random_checkpoint(mmditx_layout(**LAYOUT), half, dtype=torch.float16, seed=8)
    model = load_mmditx(half, dtype=torch.float16)
    before = snapshot(model)
    h = apply_lora(model, path, 0.7)
    # merged in fp32 then rounded once: the formula, per weight
    w0 = before["final_layer.linear.weight"].float()
    a, b = official_names(lora)[0]["final_layer.linear"]
    assert torch.equal(model.final_layer.linear.weight, (w0 + (b * 0.7) @ a).half())
    h.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int16), before[k].view(torch.int16)), k


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_in_place_fp32_merge_gives_the_buffered_bits(offset, monkeypatch):
    """fp32 weights take the LoRA product in place (no buffer copies); removal's fix-ups and the frugal mode rely
    on those bits being exactly the fresh-buffer result, also for weights at unaligned addresses (memory-mapped
    files align tensors to 8 bytes only) and across row chunks."""
    from mmditx import lora as L

    monkeypatch.setattr(L, "CHUNK", 3 * 1536)         # several row chunks
    g = torch.Generator().manual_seed(offset)
    storage = torch.randn(1536 * 384 + offset, generator=g)
    weight = storage[offset:].view(1536, 384)
    f = L.LoraFactor(down=torch.randn(64, 384, generator=g) * 0.02, up=torch.randn(1536, 64, generator=g) * 0.02, alpha=32.0)
    want = weight.clone()
    for _, rows, (buf,), up, down in L._chunks(want, f, 1.3):
        rows.copy_(L._plus_delta(buf, rows, up, down, 1.0))
    L.add_delta_(weight, f, 1.3)
    assert weight.data_ptr() % 16 == (4 * offset) % 16 and torch.equal(weight, want)


# -- bad inputs -------------------------------------------------------------------------------------------

def test_lora_for_another_model_is_refused_naming_both(oracle, tmp_path):
    ours, _, _ = oracle
    g = torch.Generator().manual_seed(0)
    # an SD3.5 Large LoRA (hidden 2432, 38 blocks) by its shapes and depth
    big = {"lora_unet_joint_blocks_37_x_block_attn_proj.lora_down.weight": torch.randn(4, 2432, generator=g),
           "lora_unet_joint_blocks_37_x_block_attn_proj.lora_up.weight": torch.randn(2432, 4, generator=g)}
    save_file(big, tmp_path / "large.safetensors")
    with pytest.raises(LoraError, match=r"made for SD3.5 Large .* the model is an MMDiT with hidden size 128"):
        apply_lora(ours, tmp_path / "large.safetensors")
    # the model's width but more blocks than it has
    deep = {"lora_unet_joint_blocks_7_x_block_attn_proj.lora_down.weight": torch.randn(4, 128, generator=g),
            "lora_unet_joint_blocks_7_x_block_attn_proj.lora_up.weight": torch.randn(128, 4, generator=g)}
    with pytest.raises(LoraError, match="at least 8 blocks.*3 blocks"):
        apply_lora(ours, deep)


def test_unmatched_layers_error_lists_them_and_strict_false_warns(oracle):
    ours, _, _ = oracle
    before = snapshot(ours)
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_final_layer_linear.lora_down.weight": torch.randn(2, 128, generator=g),
          "lora_unet_final_layer_linear.lora_up.weight": torch.randn(64, 2, generator=g),
          "lora_unet_joint_blocks_2_context_block_mlp_fc1.lora_down.weight": torch.randn(2, 128, generator=g),
          "lora_unet_joint_blocks_2_context_block_mlp_fc1.lora_up.weight": torch.randn(512, 2, generator=g)}
    with pytest.raises(LoraError, match=r"1 of 2 LoRA layers match nothing.*joint_blocks.2.context_block.mlp.fc1"):
        apply_lora(ours, sd)
    assert_bit_identical(ours, before)                          # nothing half-applied
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        h = apply_lora(ours, sd, strict=False)
    assert any("ignoring 1 of 2" in str(x.message) for x in w)
    assert h.targets == 1
    h.remove()
    assert_bit_identical(ours, before)
