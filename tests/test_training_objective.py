"""The flow-matching objective against diffusers' training_utils and the formulas of the SD3 paper."""

import math

import pytest
import torch

from training.objective import (ConditioningLayout, Objective, draw, drop_captions, flow_matching_loss, loss_weight,
                                resolution_shift, sample_sigmas, sample_u)

training_utils = pytest.importorskip("diffusers.training_utils")


@pytest.mark.parametrize("scheme,kw", [("logit_normal", dict(logit_mean=0.0, logit_std=1.0)),
                                       ("logit_normal", dict(logit_mean=0.5, logit_std=0.7)),
                                       ("uniform", {}), ("mode", dict(mode_scale=1.29)),
                                       ("mode", dict(mode_scale=-0.5))])
def test_time_density_matches_diffusers(scheme, kw):
    ours = sample_u(Objective(sampling=scheme, **kw), 4096, torch.Generator().manual_seed(7))
    ref = training_utils.compute_density_for_timestep_sampling(
        scheme, 4096, logit_mean=kw.get("logit_mean"), logit_std=kw.get("logit_std"),
        mode_scale=kw.get("mode_scale"), generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, ref)
    # and the draws depend on the generator (the comparison above is not of two constants)
    assert not torch.equal(ours, sample_u(Objective(sampling=scheme, **kw), 4096, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_match_diffusers(weighting):
    sigmas = torch.rand(100, generator=torch.Generator().manual_seed(0)) * 0.98 + 0.01
    ref = training_utils.compute_loss_weighting_for_sd3("logit_normal" if weighting == "none" else weighting, sigmas)
    assert torch.allclose(loss_weight(weighting, sigmas), ref.float(), rtol=1e-6)


def test_shift_and_resolution_shift():
    u = sample_u(Objective(), 64, torch.Generator().manual_seed(1))
    s = sample_sigmas(Objective(shift=3.0), 64, (1024, 1024), torch.Generator().manual_seed(1))
    assert torch.allclose(s, 3 * u / (1 + 2 * u), atol=1e-6)               # sigma(t) = shift t / (1 + (shift-1) t)
    assert resolution_shift(1024, 1024) == 3.0
    assert math.isclose(resolution_shift(512, 512), 1.5)                   # sqrt(m/n) = 1/2 of the area ratio 1/4
    auto = sample_sigmas(Objective(shift=None), 64, (512, 512), torch.Generator().manual_seed(1))
    assert torch.allclose(auto, 1.5 * u / (1 + 0.5 * u), atol=1e-6)


def test_loss_is_the_rectified_flow_formula():
    """The loss of a model that records its inputs, against the formula written out as in diffusers'
    train_dreambooth_lora_sd3.py (x_t = (1-s) x0 + s n, target n - x0, weighted mean squared error)."""
    seen = {}

    class Probe(torch.nn.Module):
        config = type("C", (), {"patch_size": 2, "pos_embed_max_size": 16})()

        def forward(self, x, t, context, y, pos_offset=None):
            seen.update(x=x, t=t, offset=pos_offset)
            return x * 0.5

    x0 = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    obj = Objective(weighting="cosmap")
    d = draw(obj, Probe.config, x0.shape, torch.Generator().manual_seed(5))
    loss = flow_matching_loss(Probe(), obj, x0, torch.zeros(3, 5, 8), torch.zeros(3, 4), d)
    g = torch.Generator().manual_seed(5)
    sigmas = sample_sigmas(obj, 3, (64, 64), g)
    noise = torch.randn(x0.shape, generator=g)
    s = sigmas.view(-1, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise
    assert torch.allclose(seen["x"], x_t) and torch.allclose(seen["t"], sigmas * 1000)
    weighting = training_utils.compute_loss_weighting_for_sd3("cosmap", sigmas).view(-1, 1, 1, 1)
    ref = torch.mean((weighting.float() * (x_t * 0.5 - (noise - x0)) ** 2).reshape(3, -1), 1).mean()
    assert torch.allclose(loss, ref, rtol=1e-6)
    top, left = seen["offset"]
    assert 0 <= top <= 12 and 0 <= left <= 12


def test_masked_loss_is_the_weighted_mean_over_positions():
    """`where` weights latent positions: uniform weights give the plain loss; zero weight on a region leaves
    the loss blind to errors there; otherwise each sample's error is sum(w * e) / sum(w) (kohya's masked loss)."""
    class Shift(torch.nn.Module):
        config = type("C", (), {"patch_size": 2, "pos_embed_max_size": 16})()

        def forward(self, x, t, context, y, pos_offset=None):
            return x + bump

    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    obj = Objective(random_pos_crop=False)
    d = draw(obj, Shift.config, x0.shape, torch.Generator().manual_seed(2))
    ctx, y = torch.zeros(2, 5, 8), torch.zeros(2, 4)
    bump = torch.zeros(1, 1, 8, 8)
    plain = flow_matching_loss(Shift(), obj, x0, ctx, y, d)
    assert torch.allclose(flow_matching_loss(Shift(), obj, x0, ctx, y, d, torch.full((2, 1, 8, 8), 3.0)), plain)
    where = torch.ones(2, 1, 8, 8)
    where[:, :, :4] = 0                                 # the top half does not count
    masked = flow_matching_loss(Shift(), obj, x0, ctx, y, d, where)
    bump[..., :4, :] = 10.0                             # a huge error there changes nothing
    assert torch.allclose(flow_matching_loss(Shift(), obj, x0, ctx, y, d, where), masked)
    bump.zero_()
    where = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    s = d.sigmas.view(-1, 1, 1, 1)
    e = (x0 * (1 - s) + d.noise * s - (d.noise - x0)) ** 2
    ref = ((e * where).sum((1, 2, 3)) / (where.expand_as(e)).sum((1, 2, 3))).mean()
    assert torch.allclose(flow_matching_loss(Shift(), obj, x0, ctx, y, d, where), ref, rtol=1e-6)


def test_caption_dropout_per_encoder():
    layout = ConditioningLayout(clip_l_width=3, clip_g_width=5, clip_tokens=4)
    context, pooled = torch.ones(2, 7, 10), torch.ones(2, 8)
    c, p = drop_captions(context, pooled, (1.0, 0.0, 0.0), layout)
    assert c[:, :4, :3].abs().sum() == 0 and p[:, :3].abs().sum() == 0
    assert (c[:, :4, 3:] == 1).all() and (c[:, 4:] == 1).all() and (p[:, 3:] == 1).all()
    c, p = drop_captions(context, pooled, (0.0, 0.0, 1.0), layout)
    assert c[:, 4:].abs().sum() == 0 and (c[:, :4] == 1).all() and (p == 1).all()
    c, p = drop_captions(context, pooled, (0.0, 1.0, 0.0), layout)
    assert c[:, :4, 3:8].abs().sum() == 0 and (c[:, :4, 8:] == 1).all() and p[:, 3:8].abs().sum() == 0
    # independent, at the asked rate
    c, _ = drop_captions(torch.ones(4000, 7, 10), torch.ones(4000, 8), (0.3, 0.3, 0.3), layout,
                         torch.Generator().manual_seed(0))
    dropped = (c[:, 0, 0] == 0).float()
    assert abs(dropped.mean().item() - 0.3) < 0.03
    both = ((c[:, 0, 0] == 0) & (c[:, 5, 0] == 0)).float().mean().item()
    assert abs(both - 0.09) < 0.02


def test_bad_options():
    with pytest.raises(ValueError, match="sigma sampling"):
        Objective(sampling="cosine")
    with pytest.raises(ValueError, match="loss weighting"):
        Objective(weighting="snr")
