"""It learns: a tiny MMDiT-X trained from scratch on a handful of captioned images. The loss on fixed draws
falls at least 5x, and images sampled from the trained model for the training captions are closer (PSNR) to
the training images (as the VAE reconstructs them) than those of the untrained model, for the same seeds."""

import math

import torch

from mmditx import MMDiTX, MMDiTXConfig
from mmditx.checkpoint import build_on_meta
from mmditx.init import init_weights
from sampling.embedded import embedded_model_dir
from sampling.pipeline import ModelFiles
from training.cache import CacheOptions, CachedDataset, build_cache
from training.data import scan_folder
from training.example import make_example_data
from training.loop import TrainConfig, Trainer
from training.objective import Objective, draw, flow_matching_loss
from training.validation import sample_latents

import vae as vae_lib

STEPS = 250


def eval_loss(model, ds, objective):
    """Mean loss over the whole set with fixed draws (the same noise before and after training)."""
    g = torch.Generator().manual_seed(1234)
    x0, context, pooled = ds.batch(list(range(len(ds))))
    total = 0.0
    with torch.no_grad():
        for _ in range(8):
            total += flow_matching_loss(model, objective, x0, context.float(), pooled.float(),
                                        draw(objective, model.config, x0.shape, g)).item() / 8
    return total


def psnr(a, b):
    mse = ((a - b) ** 2).mean().item()
    return 10 * math.log10(4.0 / mse)  # images in [-1, 1]: peak-to-peak 2


def test_tiny_model_learns(tmp_path):
    torch.manual_seed(0)
    files = ModelFiles.from_dir(embedded_model_dir(), t5="off")
    examples, _ = scan_folder(make_example_data(tmp_path / "data", count=4, size=64), resolution=64)
    ds = CachedDataset(build_cache(examples, files, tmp_path / "run", CacheOptions(), log=lambda m: None))
    config = MMDiTXConfig(hidden_size=128, depth=3, pos_embed_max_size=4, dual_attention_blocks=(0,))
    model = init_weights(build_on_meta(lambda: MMDiTX(config)).to_empty(device="cpu"), seed=0)
    untrained = init_weights(build_on_meta(lambda: MMDiTX(config)).to_empty(device="cpu"), seed=0)
    objective = Objective(shift=1.0)
    before = eval_loss(model, ds, objective)
    trainer = Trainer(model, ds, TrainConfig(steps=STEPS, batch_size=4, lr=3e-3, warmup_steps=10,
                                             objective=objective, weight_decay=0.0), tmp_path / "run", log_stream=None)
    trainer.save = lambda: None
    trainer.train()
    after = eval_loss(model, ds, objective)
    assert after * 5 <= before, f"loss {before:.3f} -> {after:.3f}"

    ae = vae_lib.load_vae(files.model)
    x0, context, pooled = ds.batch(list(range(len(ds))))
    targets = ae.decode(x0.float())
    gains = []
    for i in range(len(ds)):
        cond = (context[i:i + 1].float(), pooled[i:i + 1].float())
        scores = []
        for m in (model, untrained):
            z = sample_latents(m, cond, cond, [10 + i], (64, 64), steps=10, cfg=1.0, shift=1.0)
            scores.append(psnr(ae.decode(z)[0], targets[i]))
        gains.append(scores[0] - scores[1])
    assert min(gains) > 1.0 and sum(gains) / len(gains) > 3.0, gains
