"""Merging SD3-without-T5's identical padding tokens (training.objective.merge_repeated_context) changes nothing:
outputs, loss and every gradient equal those of the full context, whose path the suite holds against diffusers
(test_mmditx_vs_diffusers, test_training_gradients)."""

import pytest
import torch

from mmditx import MMDiTX, MMDiTXConfig
from mmditx.init import init_weights
from training.objective import Draw, Objective, flow_matching_loss, merge_repeated_context

CONFIG = MMDiTXConfig(hidden_size=128, depth=3, pos_embed_max_size=8, context_dim=32, pooled_dim=16,
                      dual_attention_blocks=(0,))


def model_and_inputs():
    model = init_weights(MMDiTX(CONFIG), seed=0)
    for p in model.parameters():            # init_weights zeroes the adaLN and final layers (adaLN-Zero): move
        p.data += 0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))  # them off 0
    g = torch.Generator().manual_seed(1)
    context = torch.cat([torch.randn(2, 5, 32, generator=g), torch.zeros(2, 7, 32)], dim=1)   # 5 text + 7 padding
    return model, torch.randn(2, 16, 8, 8, generator=g), context, torch.randn(2, 16, generator=g)


def test_merge_finds_the_trailing_run_shared_by_the_batch():
    _, _, context, _ = model_and_inputs()
    merged, repeats = merge_repeated_context(context)
    assert merged.shape == (2, 6, 32) and repeats.tolist() == [1, 1, 1, 1, 1, 7]
    assert torch.equal(merged, context[:, :6])
    context[1, -1, 0] = 1.0                  # the last token now differs in one sample: nothing to merge
    assert merge_repeated_context(context)[1] is None


def test_merged_forward_equals_the_full_context():
    model, x, context, y = model_and_inputs()
    with torch.no_grad():
        full = model(x, 500.0, context, y)
        merged, repeats = merge_repeated_context(context)
        fast = model(x, 500.0, merged, y, context_repeats=repeats)
        without_counts = model(x, 500.0, merged, y)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    # the counts matter: dropping the 6 copies without raising the logit of the one kept changes the output
    assert (without_counts - full).abs().max() > 1e-3


@pytest.mark.parametrize("checkpointing", [False, "selective"])
def test_merged_loss_and_gradients_equal_the_full_context(checkpointing):
    grads = {}
    for merge in (False, True):
        model, x, context, y = model_and_inputs()
        model.gradient_checkpointing = checkpointing
        d = Draw(torch.tensor([0.3, 0.9]), torch.randn(x.shape, generator=torch.Generator().manual_seed(2)), None)
        loss = flow_matching_loss(model, Objective(merge_repeated_context=merge), x, context, y, d)
        loss.backward()
        grads[merge] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    for name, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_controls_with_merged_context_are_refused():
    model, x, context, y = model_and_inputs()
    merged, repeats = merge_repeated_context(context)
    with pytest.raises(ValueError, match="cannot be combined with ControlNet"):
        model(x, 500.0, merged, y, controls=[(None, x, 1.0)], context_repeats=repeats)
