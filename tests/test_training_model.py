"""The model side of training: gradients against diffusers' SD3Transformer2DModel, the training
initialisation, the random positional crop, gradient checkpointing and autocast."""

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmditx import MMDiTX, load_mmditx, load_config
from mmditx.checkpoint import build_on_meta
from mmditx.init import init_weights, sincos_2d
from tests.mmditx_oracle import PREFIX, diffusers_transformer, rel_error
from tests.official import mmditx_layout, write_random_checkpoint

pytest.importorskip("diffusers")

GRAD_TOL = 1e-5


def inputs(cfg, batch=2, h=8, w=12, tokens=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, h, w, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, tokens, cfg.context_dim, generator=g), torch.randn(batch, cfg.pooled_dim, generator=g),
            torch.randn(batch, cfg.in_channels, h, w, generator=g))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our model and diffusers' from one random official-layout file: 3 blocks, dual attention in 0 and 1,
    QK-norm, the last block pre-only; a 12x12 positional table."""
    path = tmp_path_factory.mktemp("grad") / "model.safetensors"
    write_random_checkpoint(mmditx_layout(hidden=128, depth=3, dual=(0, 1), pos_max=12, context_dim=64,
                                          pooled_dim=48), path, seed=zlib.crc32(b"grad"))
    ours = load_mmditx(path)
    return ours, diffusers_transformer(path, ours.config), path


def diffusers_names(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our gradients under diffusers' names, through diffusers' own single-file converter (its splits of qkv,
    its swap of the final layer's shift and scale are linear maps, so they map gradients as they map weights)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    return convert_sd3_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in grads.items()})


@pytest.mark.parametrize("checkpointing", [False, True, "selective"])
def test_every_gradient_matches_diffusers(pair, checkpointing):
    ours, ref, _ = pair
    x, t, context, y, target = inputs(ours.config)
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    ours.gradient_checkpointing = checkpointing
    ours.requires_grad_(True)
    ref.requires_grad_(True)
    ref.pos_embed.pos_embed.requires_grad_(True)  # a buffer in diffusers: ask for its gradient too
    ref.pos_embed.pos_embed.grad = None
    try:
        F.mse_loss(ours(x, t, context, y), target).backward()
        out = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t,
                  return_dict=False)[0]
        F.mse_loss(out, target).backward()
    finally:
        ours.gradient_checkpointing = False
        ref.pos_embed.pos_embed.requires_grad_(False)

    ours_grads = diffusers_names({n: p.grad for n, p in ours.named_parameters()})
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_grads["pos_embed.pos_embed"] = ref.pos_embed.pos_embed.grad
    assert set(ours_grads) == set(ref_grads)
    # the pieces the issue names are really there and really receive gradients
    for name in ("transformer_blocks.0.attn2.to_q.weight", "transformer_blocks.0.attn.norm_q.weight",
                 "transformer_blocks.2.norm1_context.linear.weight", "pos_embed.pos_embed"):
        assert ref_grads[name].abs().max() > 0, name
    for name, g in ref_grads.items():
        assert g is not None, name
        assert rel_error(ours_grads[name].reshape(g.shape), g) <= GRAD_TOL, \
            f"{name}: relative error {rel_error(ours_grads[name].reshape(g.shape), g):.2e}"


class MatrixProducts(TorchDispatchMode):
    """Counts the matrix products (aten mm / addmm) run while active, forward and backward."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def backward_products(model, checkpointing) -> int:
    x, t, context, y, target = inputs(model.config)
    model.gradient_checkpointing = checkpointing
    try:
        loss = F.mse_loss(model(x, t, context, y), target)
        with MatrixProducts() as products:
            loss.backward()
    finally:
        model.gradient_checkpointing = False
        model.zero_grad(set_to_none=True)
    return products.count


def test_selective_checkpointing_recomputes_only_the_qkv_products(pair):
    """The backward pass of full recompute reruns every product of every block; selective reruns one product
    per attention (the fused qkv: context and image stream, and the image stream's second attention in
    blocks 0 and 1: 3 + 3 + 2 = 8 here) and keeps the rest from the forward."""
    ours = pair[0]
    ours.requires_grad_(True)
    plain = backward_products(ours, False)
    qkv = sum(1 for name, _ in ours.named_modules() if name.endswith(".qkv"))
    assert qkv == 8
    assert backward_products(ours, "selective") - plain == qkv
    linears = sum(isinstance(m, torch.nn.Linear) for m in ours.joint_blocks.modules())
    assert linears == 31    # adaLN, qkv, proj, fc1, fc2 per stream; attn2 in 0, 1; block 2's context: adaLN, qkv
    assert backward_products(ours, True) - plain == linears


def test_center_crop_is_the_default_bit_for_bit(pair):
    ours = pair[0]
    x, t, context, y, _ = inputs(ours.config, h=8, w=12)
    m = ours.config.pos_embed_max_size
    with torch.no_grad():
        default = ours(x, t, context, y)
        center = ours(x, t, context, y, pos_offset=((m - 4) // 2, (m - 6) // 2))
        corner = ours(x, t, context, y, pos_offset=(0, 0))
    assert torch.equal(default, center)
    assert (default - corner).abs().max() > 1e-4
    with pytest.raises(ValueError, match="leaves the 12x12 table"):
        ours(x, t, context, y, pos_offset=(9, 0))


def test_sincos_table_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    ref = get_2d_sincos_pos_embed(64, 10, base_size=10, interpolation_scale=1.0, output_type="pt")
    assert torch.allclose(sincos_2d(64, 10), ref.float(), atol=1e-6)


def tiny_from_scratch(seed=0):
    return init_weights(build_on_meta(lambda: MMDiTX(load_config("tiny"))).to_empty(device="cpu"), seed=seed)


def test_init_weights_adaln_zero_and_reproducible():
    model = tiny_from_scratch(seed=3)
    cfg = model.config
    x, t, context, y, _ = inputs(cfg, batch=1, h=4, w=4, tokens=3)
    with torch.no_grad():
        assert torch.equal(model(x, t, context, y), torch.zeros_like(x))  # adaLN-Zero + zero final layer
    again = tiny_from_scratch(seed=3)
    other = tiny_from_scratch(seed=4)
    w = "joint_blocks.0.x_block.attn.qkv.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])
    assert torch.equal(model.pos_embed[0], sincos_2d(cfg.hidden_size, cfg.pos_embed_max_size))
    with pytest.raises(ValueError, match="to_empty"):
        init_weights(build_on_meta(lambda: MMDiTX(cfg)))


def test_bf16_autocast_forward_backward_and_fp16_context(pair):
    """Mlp's sliced product used to fail under autocast; an fp16 context is no longer copied to fp32 first."""
    ours = pair[0]
    x, t, context, y, target = inputs(ours.config)
    ours.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x, t, context.half(), y)
    F.mse_loss(out.float(), target).backward()
    with torch.no_grad():
        full = ours(x, t, context, y)
    assert rel_error(out.float(), full) < 0.05
    assert ours.joint_blocks[0].x_block.mlp.fc1.weight.grad.abs().max() > 0
