"""Tracing observes without changing a single output value, and records what it claims."""

import pytest
import torch

from mmditx import MMDiTX, load_config
from instruments.tracing import Trace


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MMDiTX(load_config("tiny")).eval().requires_grad_(False)
    torch.nn.init.normal_(m.pos_embed, std=0.5)
    return m


def inputs(B=2, h=12, w=8, tokens=7):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, 16, h, w, generator=g), torch.tensor([900.0, 150.0])[:B],
            torch.randn(B, tokens, 4096, generator=g), torch.randn(B, 2048, generator=g))


def test_outputs_bit_identical_with_tracing(model):
    args = inputs()
    plain = model(*args)
    with Trace(model, tensors=True, attention=True, heads="all") as trace:
        traced = model(*args)
        traced_again = model(*args, skip_layers=(2,))
    assert torch.equal(plain, traced)
    assert torch.equal(model(*args, skip_layers=(2,)), traced_again)
    assert torch.equal(model(*args), plain)  # hooks removed on exit: nothing left behind
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.modules())
    assert {s for s, _ in trace.records} == {0, 1}  # two model calls = two steps


def test_records_streams_modulation_and_attention(model):
    x, t, context, y = inputs()
    B, Lc, Li = 2, context.shape[1], (12 // 2) * (8 // 2)
    with Trace(model, blocks=[1, 3], tensors=True, attention=True) as trace:
        model(x, t, context, y)
    assert set(trace.records) == {(0, 1), (0, 3)}
    rec = trace.records[(0, 1)]
    assert rec["x_in"].shape == rec["x_out"].shape == (B, Li, 128)
    assert rec["context_out"].shape == (B, Lc, 128)
    assert trace.records[(0, 3)]["context_out"] is None  # last block: pre-only context stream
    assert set(rec["stats"]) == {"x_in", "x_out", "context_in", "context_out"}
    assert rec["stats"]["x_out"]["nan"] == 0 and rec["stats"]["x_out"]["rms"] > 0

    # the x stream entering block 3 is the one leaving block 2 (not traced) -> entering 1 is leaving 0
    # modulation: equals the adaLN layer computed directly from c
    c = model.t_embedder(t) + model.y_embedder(y)
    direct = model.joint_blocks[1].x_block.adaLN_modulation(c).chunk(9, dim=-1)
    mod = rec["modulation"]["x"]
    assert list(mod) == ["shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp",
                         "shift_msa2", "scale_msa2", "gate_msa2"]  # block 1 has dual attention
    for got, want in zip(mod.values(), direct):
        assert torch.equal(got, want)
    assert list(trace.records[(0, 3)]["modulation"]["context"]) == ["shift_msa", "scale_msa"]
    assert len(trace.records[(0, 3)]["modulation"]["x"]) == 6  # no attn2 in block 3

    att = rec["attention"]
    assert att["image_to_text"].shape == (B, Li, Lc) and att["text_to_image"].shape == (B, Lc, Li)
    assert att["image_to_image"].shape == (B, Li, Li) and att["text_to_text"].shape == (B, Lc, Lc)
    # every query's row over [text ; image] keys is a probability distribution
    rows = torch.cat([att["image_to_text"], att["image_to_image"]], -1).sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    rows = torch.cat([att["text_to_text"], att["text_to_image"]], -1).sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    p2 = rec["attention2"]
    assert p2.shape == (B, Li, Li) and torch.allclose(p2.sum(-1), torch.ones(B, Li), atol=1e-5)
    assert "attention2" not in trace.records[(0, 3)]


def test_attention_probabilities_match_explicit_softmax(model):
    """The recorded image->text probabilities equal softmax(q k^T / 8) recomputed from the block's own q, k."""
    x, t, context, y = inputs(B=1)
    with Trace(model, blocks=[0], attention=True, heads="all", tensors=True) as trace:
        model(x, t, context, y)
    rec = trace.records[(0, 0)]
    blk = model.joint_blocks[0]
    c = model.t_embedder(t) + model.y_embedder(y)
    (cq, ck, _), _ = blk.context_block.pre_attention(rec["context_in"], blk.context_block.modulation(c))
    (xq, xk, _), _ = blk.x_block.pre_attention(rec["x_in"], blk.x_block.modulation(c))
    q, k = torch.cat([cq, xq], 2), torch.cat([ck, xk], 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
    Lc = context.shape[1]
    assert torch.allclose(rec["attention"]["image_to_text"], p[:, :, Lc:, :Lc], atol=1e-6)


def test_steps_and_statistics_only(model):
    args = inputs()
    with Trace(model, blocks=[0], steps=[1], modulation=False) as trace:
        for _ in range(3):
            model(*args)
    assert list(trace.records) == [(1, 0)]
    rec = trace.records[(1, 0)]
    assert set(rec) == {"stats"}  # statistics only: no tensors, no modulation, no attention
    assert "x_out" in trace.summary()


def test_bad_block_index(model):
    with pytest.raises(ValueError, match="outside the model"):
        Trace(model, blocks=[4])
