"""Tiled decoding and encoding: the tile layout, the blending, and the error against untiled diffusers (the oracle).

Tiles are an approximation: GroupNorm statistics and the mid-block attention see one tile, not the whole image.
On random weights (a harsh case: nothing in them is smooth or local) the bound we test, for a 384x320 image cut
into 2x2 tiles of at most 24x24 latent positions (192 px) overlapping by 8 (64 px), is
    decode: mean |tiled - untiled| <= 0.08 and max <= 1.0 on the [-1, 1] pixel scale (measured 0.066 / 0.73,
            for an image whose pixels have std 0.51)
    encode: mean |tiled - untiled| <= 0.10 x the latent's std (measured 0.061)
and no seam: the error within 4 pixels of a tile edge is at most 1.3x the error elsewhere (measured 0.98),
and so is the error of the horizontal and vertical pixel differences (what the eye sees as a seam; measured
1.01 / 1.03). The same measure on hard-edged tiles (overlap 0) reads 3.3 and 2.9: it does see seams.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import vae.model
from tests.test_vae_reference import SMALL, diffusers_vae, write_vae_file
from vae import load_vae
from vae.tiling import ramp, tile_layout, tiled

GRID = (48, 40)          # latent (h, w): a 384x320 image
TILE, OVERLAP = 24, 8    # -> 2 x 2 tiles of 24 x 24 latent positions


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 400), tile=st.integers(2, 96), data=st.data())
def test_tile_layout_covers_with_overlap(size, tile, data):
    overlap = data.draw(st.integers(0, tile // 2))
    starts, length = tile_layout(size, tile, overlap)
    assert length <= min(tile, size) and starts[0] == 0 and starts[-1] + length == size
    assert starts == sorted(set(starts))
    for a, b in zip(starts, starts[1:]):
        assert a + length - b >= overlap           # neighbours overlap by at least `overlap`
    if len(starts) > 1:                            # and no fewer tiles would do
        n = len(starts) - 1
        assert n * tile - (n - 1) * overlap < size


def test_ramps_partition_unity():
    a = ramp(40, 8, fade_start=False, fade_end=True)
    b = ramp(40, 8, fade_start=True, fade_end=False)
    torch.testing.assert_close(a[-8:] + b[:8], torch.ones(8))
    assert (a > 0).all() and (b > 0).all() and a[0] == 1 and b[-1] == 1


@pytest.mark.parametrize("in_scale,out_scale", [(1, 8), (8, 1)])
def test_blending_is_exact_for_a_pointwise_map(in_scale, out_scale):
    """With a map that has no spatial context, tiling must reproduce it exactly: the weights are normalised."""
    def fn(x):  # pointwise in latent-grid terms: resample by out/in, then a per-pixel nonlinearity
        x = F.interpolate(x, scale_factor=out_scale / in_scale, mode="nearest") if out_scale > in_scale \
            else F.avg_pool2d(x, in_scale)
        return torch.tanh(x[:, :3] * 2 + 0.5)
    x = torch.randn(2, 5, 37 * in_scale, 29 * in_scale)
    got = tiled(fn, x, grid=(37, 29), tile=12, overlap=5, in_scale=in_scale, out_scale=out_scale, out_channels=3)
    torch.testing.assert_close(got, fn(x), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = write_vae_file(tmp_path_factory.mktemp("vae_tiling") / "vae.safetensors", SMALL, seed=5)
    return load_vae(path), diffusers_vae(path, SMALL)


def _edge_mask(size: int, scale: int, overlap: int, band: int = 4) -> torch.Tensor:
    """True within `band` pixels of an interior tile edge (a tile's border that lies inside the image)."""
    starts, length = tile_layout(size, TILE, overlap)
    mask = torch.zeros(size * scale, dtype=torch.bool)
    for s in starts:
        for edge in (s, s + length):
            if 0 < edge < size:
                mask[max(0, edge * scale - band):edge * scale + band] = True
    return mask


def _seam_scores(got: torch.Tensor, want: torch.Tensor, overlap: int = OVERLAP) -> list[float]:
    """Mean error within 4 px of the tile edges / mean error elsewhere, for (columns, rows) of the pixel error
    and of the horizontal / vertical pixel differences (a seam is a jump between neighbouring pixels)."""
    cols, rows = _edge_mask(GRID[1], 8, overlap), _edge_mask(GRID[0], 8, overlap)
    err = (got - want).abs().mean((0, 1))                                              # (H, W)
    dx = ((got[..., 1:] - got[..., :-1]) - (want[..., 1:] - want[..., :-1])).abs().mean((0, 1))
    dy = ((got[..., 1:, :] - got[..., :-1, :]) - (want[..., 1:, :] - want[..., :-1, :])).abs().mean((0, 1))
    ratio = lambda profile, mask: (profile[mask].mean() / profile[~mask].mean()).item()
    return [ratio(err.mean(0), cols), ratio(err.mean(1), rows),
            ratio(dx.mean(0), cols[1:]), ratio(dy.mean(1), rows[1:])]


def test_tiled_decode_error_bound_and_no_seam(pair):
    ours, theirs = pair
    latent = torch.randn(1, 16, *GRID, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs.decode(latent / 1.5305 + 0.0609).sample.clamp(-1, 1)   # untiled, independent
    got = ours.decode(latent, tiled=True, tile=TILE, overlap=OVERLAP)
    err = (got - want).abs()
    assert err.mean() <= 0.08 and err.max() <= 1.0, (err.mean().item(), err.max().item())
    assert max(_seam_scores(got, want)) <= 1.3, _seam_scores(got, want)

    # The measure is sensitive: hard-edged tiles (no overlap, no blending) show their seams.
    hard = ours.decode(latent, tiled=True, tile=TILE, overlap=0)
    assert min(_seam_scores(hard, want, overlap=0)) >= 2.0, _seam_scores(hard, want, overlap=0)


def test_tiled_encode_error_bound(pair):
    ours, theirs = pair
    image = torch.rand(1, 3, GRID[0] * 8, GRID[1] * 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = (theirs.encode(image).latent_dist.mean - 0.0609) * 1.5305
    got = ours.encode(image, sample=False, tiled=True, tile=TILE, overlap=OVERLAP)
    rel = ((got - want).abs().mean() / want.std()).item()
    assert rel <= 0.10, rel


def test_one_tile_is_exact(pair):
    """A tile at least as large as the latent is the untiled computation (to fp32 noise)."""
    ours, theirs = pair
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs.decode(latent / 1.5305 + 0.0609).sample.clamp(-1, 1)
    torch.testing.assert_close(ours.decode(latent, tiled=True, tile=8, overlap=2), want, rtol=0, atol=1e-5)


class _Stub(torch.nn.Module):
    """Stands in for the encoder/decoder so the automatic choice can be tested at full sizes in no time."""

    def __init__(self, out_channels: int, scale: float):
        super().__init__()
        self.out_channels, self.scale = out_channels, scale
        self.conv_in = torch.nn.Conv2d(1, 1, 1)  # carries device/dtype like the real modules

    def forward(self, x):
        B, _, H, W = x.shape
        return torch.zeros(B, self.out_channels, int(H * self.scale), int(W * self.scale))


def test_tiles_are_chosen_above_1024x1024(monkeypatch):
    model = vae.model.VAE(SMALL)
    model.decoder, model.encoder = _Stub(3, 8), _Stub(32, 1 / 8)
    calls = []
    real = vae.model.run_tiled
    monkeypatch.setattr(vae.model, "run_tiled", lambda *a, **k: calls.append(k["grid"]) or real(*a, **k))
    model.decode(torch.zeros(1, 16, 128, 128))                   # 1024x1024: exact, untiled
    model.encode(torch.zeros(1, 3, 1024, 1024))
    assert calls == []
    model.decode(torch.zeros(1, 16, 136, 128))                   # 1088x1024: tiled
    model.encode(torch.zeros(1, 3, 1024, 1088))
    assert calls == [(136, 128), (128, 136)]
    model.decode(torch.zeros(1, 16, 256, 256), tiled=False)      # forced either way
    model.decode(torch.zeros(1, 16, 16, 16), tiled=True)
    assert calls[-1] == (16, 16) and len(calls) == 3
    with pytest.raises(ValueError, match="overlap"):
        model.decode(torch.zeros(1, 16, 16, 16), tiled=True, tile=16, overlap=9)
