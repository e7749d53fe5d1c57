"""Hand-written LoRA adapters: gradients against peft on diffusers' model, merging, targets."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from mmditx import load_mmditx
from tests.mmditx_oracle import diffusers_transformer, rel_error
from tests.official import mmditx_layout, write_random_checkpoint
from training.lora import add_lora, find_targets, lora_modules, merge_lora, remove_lora, target_patterns

pytest.importorskip("peft")

RANK = 4


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("lora") / "model.safetensors"
    write_random_checkpoint(mmditx_layout(hidden=128, depth=3, dual=(0, 1), pos_max=12, context_dim=64,
                                          pooled_dim=48), p, seed=zlib.crc32(b"lora"))
    return p


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g) * 1000,
            torch.randn(2, 7, cfg.context_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g),
            torch.randn(2, 16, 8, 8, generator=g))


# Our module -> diffusers' modules (the test's own table, used only to copy our adapter values into peft's).
def diffusers_modules(name: str) -> list[str]:
    _, i, stream, attn, layer = name.split(".")
    if stream == "x_block":
        return ([f"transformer_blocks.{i}.{attn}.to_{c}" for c in "qkv"] if layer == "qkv"
                else [f"transformer_blocks.{i}.{attn}.to_out.0"])
    return ([f"transformer_blocks.{i}.attn.add_{c}_proj" for c in "qkv"] if layer == "qkv"
            else [f"transformer_blocks.{i}.attn.to_add_out"])


def test_lora_gradients_match_peft_on_diffusers(path):
    from peft import LoraConfig, inject_adapter_in_model

    ours = load_mmditx(path)
    ref = diffusers_transformer(path, ours.config)
    adapters = add_lora(ours, rank=RANK, alpha=8, patterns=target_patterns(("attn", "attn2")), seed=1)
    # 3 blocks: x attn (3) + attn2 (2) + context attn (3, the last pre-only: qkv only) -> 8 qkv + 7 proj
    assert len(adapters) == 3 * 2 + 2 * 2 + 2 * 2 + 1
    g = torch.Generator().manual_seed(2)
    for m in adapters.values():                      # ups are zero at init: make them random to test down's grads
        with torch.no_grad():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.05)

    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    ref.requires_grad_(False)
    ref = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=8, target_modules=targets), ref)
    ref_mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in adapters.items():
            for k, ref_name in enumerate(diffusers_modules(name)):
                r = ref_mods[ref_name]
                r.lora_A["default"].weight.copy_(m.lora_down[k * RANK:(k + 1) * RANK])
                r.lora_B["default"].weight.copy_(m.lora_up[k])
    n_ref = sum(p.requires_grad for p in ref.parameters())
    assert n_ref == 2 * sum(len(diffusers_modules(n)) for n in adapters)   # peft adapted exactly these

    x, t, context, y, target = inputs(ours.config)
    F.mse_loss(ours(x, t, context, y), target).backward()
    out = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t, return_dict=False)[0]
    F.mse_loss(out, target).backward()
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)
    for name, m in adapters.items():
        for k, ref_name in enumerate(diffusers_modules(name)):
            r = ref_mods[ref_name]
            a, b = m.lora_down.grad[k * RANK:(k + 1) * RANK], r.lora_A["default"].weight.grad
            # the pre-only last context stream's queries only make outputs that are discarded: zero gradient
            discarded = name == "joint_blocks.2.context_block.attn.qkv" and k == 0
            assert (b.abs().max() == 0) == discarded and rel_error(a, b) <= 1e-5, f"{name} down {k}: {rel_error(a, b):.2e}"
            a, b = m.lora_up.grad[k], r.lora_B["default"].weight.grad
            assert (b.abs().max() == 0) == discarded and rel_error(a, b) <= 1e-5, f"{name} up {k}: {rel_error(a, b):.2e}"


def test_starts_as_identity_merges_and_removes(path):
    model = load_mmditx(path)
    x, t, context, y, _ = inputs(model.config)
    with torch.no_grad():
        base = model(x, t, context, y)
        adapters = add_lora(model, rank=RANK, patterns=target_patterns(("attn", "mlp", "adaln")), seed=0)
        # up = 0: the unchanged model (up to the rounding of the unsliced qkv and MLP products)
        assert rel_error(model(x, t, context, y), base) < 1e-6
        for m in adapters.values():
            m.lora_up.normal_(0, 0.02)
        adapted = model(x, t, context, y)
        assert (adapted - base).abs().max() > 1e-4
        merged = merge_lora(model)
        assert not lora_modules(merged)
        assert rel_error(merged(x, t, context, y), adapted) < 1e-5
    again = load_mmditx(path)
    add_lora(again, rank=RANK)
    remove_lora(again)
    with torch.no_grad():
        assert torch.equal(again(x, t, context, y), base)


def test_target_patterns(path):
    model = load_mmditx(path)
    x_only = find_targets(model, target_patterns(("attn", "mlp"), context=False))
    assert x_only and all(".x_block." in n for n in x_only)
    assert "joint_blocks.0.x_block.attn.qkv" in x_only and "joint_blocks.0.x_block.attn2.qkv" not in x_only
    adaln = find_targets(model, target_patterns(("adaln",)))
    assert len(adaln) == 6 and "final_layer.adaLN_modulation.1" not in adaln
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        target_patterns(("attention",))
    with pytest.raises(ValueError, match="no linear layer matches"):
        add_lora(model, patterns=("*.nothing",))


def test_trained_lora_file_loads_in_diffusers_and_every_format_reads_back(path, tmp_path):
    """The adapters written through mmditx.lora: diffusers' load_lora_adapter (peft) on its own model gives our
    adapted model's output; the kohya and official files read back to the same products."""
    from mmditx.lora import read_lora
    from training.checkpoints import save_lora_file

    ours = load_mmditx(path)
    adapters = add_lora(ours, rank=RANK, alpha=2, patterns=target_patterns(("attn", "attn2", "mlp", "adaln")),
                        seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in adapters.values():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.05)
    x, t, context, y, _ = inputs(ours.config)
    with torch.no_grad():
        expected = ours(x, t, context, y)
    ref = diffusers_transformer(path, ours.config)
    file = save_lora_file(ours, tmp_path / "lora.safetensors", "diffusers")
    ref.load_lora_adapter(str(file), prefix="transformer", adapter_name="trained")
    with torch.no_grad():
        out = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t,
                  return_dict=False)[0]
        plain = load_mmditx(path)(x, t, context, y)
    assert rel_error(expected, plain) > 1e-3                                 # the LoRA changes the output
    assert rel_error(out, expected) < 1e-5
    for fmt in ("kohya", "official"):
        read = read_lora(save_lora_file(ours, tmp_path / f"{fmt}.safetensors", fmt)).transformer
        assert set(read) == set(adapters)
        for name, m in adapters.items():
            f = read[name]
            assert torch.allclose(f.up.float() @ f.down.float() * f.scale, m.delta_weight(), atol=1e-7), name
