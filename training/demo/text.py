"""The demo's text encoders, trained as CLIP was: contrastively, each caption against the scene it describes.

Why train them at all. The transformer reads words through joint attention over 154 context tokens (77 CLIP,
77 zeros where T5's would be). In random CLIPs each word stays in its own token: "left" and "right" change
token 7 of a caption completely and the tokens after it by 3-10% (measured). A colour, which tints the whole
object, is learned from that one token; a position, which needs the word *and* the image token's place, is not:
in 300-step runs that regress the picture from the prompt alone (sigma 1), a random code for each position in
one context token moved the object by 0.3 of ~14, the same code in all 77 tokens by 7 (docs/demo_model.md).
Real CLIPs carry the whole caption into the tokens after it (the end token and CLIP-L's padding end tokens);
contrastive training gives the tiny ones that too.

    text side   [pooled ++ mean of the penultimate tokens] of CLIP-L and CLIP-G -> linear -> 128, normalised
    image side  the scene's VAE latent (16 x 16 x 16) -> MLP -> 128, normalised
    loss        symmetric cross-entropy over the batch's caption-scene similarities (CLIP, Radford et al. 2021)

The text side reads both outputs SD3 uses: the pooled vector (adaLN) and the penultimate tokens (attention);
their mean gives every token, padding included, the same pull towards its caption. Both projection heads are
thrown away: only the two CLIPs are kept, in their official layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES = 128


@dataclass(frozen=True)
class TextTrainConfig:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0


def caption_features(conditioner, ids_l: torch.Tensor, ids_g: torch.Tensor) -> torch.Tensor:
    """(B, 77) token ids of each CLIP -> (B, 4 * width): pooled and token mean of CLIP-L, then of CLIP-G."""
    out = []
    for clip, ids in ((conditioner.clip_l, ids_l), (conditioner.clip_g, ids_g)):
        hidden, pooled = clip(ids)                                   # (B, 77, D), (B, D)
        out += [pooled, hidden.mean(1)]
    return torch.cat(out, dim=-1)


def train_text_encoders(conditioner, captions: list[str], latents: torch.Tensor,
                        config: TextTrainConfig = TextTrainConfig(),
                        log: Callable[[str], None] = print, every: int = 100) -> dict:
    """Train `conditioner`'s two CLIPs in place on (caption, latent) pairs; they are left frozen in eval mode.
    Returns {"loss": last step's loss, "retrieval": share of the last batch's captions whose own scene is
    the closest}; chance is 1 / batch_size."""
    torch.manual_seed(config.seed)
    clips = (conditioner.clip_l, conditioner.clip_g)
    width = sum(clip.text_model.final_layer_norm.weight.numel() for clip in clips)
    text_head = nn.Linear(2 * width, FEATURES)
    image_head = nn.Sequential(nn.Flatten(), nn.Linear(latents[0].numel(), 256), nn.GELU(), nn.Linear(256, FEATURES))
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))      # CLIP's initial temperature
    for clip in clips:
        clip.train().requires_grad_(True)
    params = [p for m in (*clips, text_head, image_head) for p in m.parameters()] + [log_scale]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    ids_l, ids_g = conditioner.tokenizer_l(captions), conditioner.tokenizer_g(captions)   # (N, 77) each
    generator = torch.Generator().manual_seed(config.seed)
    batch = min(config.batch_size, len(captions))
    result = {}
    for step in range(1, config.steps + 1):
        i = torch.randperm(len(captions), generator=generator)[:batch]
        text = F.normalize(text_head(caption_features(conditioner, ids_l[i], ids_g[i])), dim=-1)
        image = F.normalize(image_head(latents[i].float()), dim=-1)
        logits = log_scale.exp() * text @ image.T                      # (B, B): caption x scene
        target = torch.arange(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result = {"loss": round(loss.item(), 4), "retrieval": round((logits.argmax(1) == target).float().mean().item(), 3)}
        if step % every == 0 or step == config.steps:
            log(f"text encoders step {step}/{config.steps}: contrastive loss {result['loss']:.3f}, "
                f"caption -> own scene {result['retrieval']:.0%} of {batch} (chance {1 / batch:.1%})")
    for clip in clips:
        clip.eval().requires_grad_(False)
    return result


def save_text_encoders(conditioner, root) -> None:
    """text_encoders/clip_{l,g}.safetensors under `root`, fp16, official names (save_safetensors writes each
    whole or not at all)."""
    from pathlib import Path

    from mmditx.checkpoint import save_safetensors

    for name, clip in (("clip_l", conditioner.clip_l), ("clip_g", conditioner.clip_g)):
        save_safetensors({k: v.detach().half() for k, v in clip.state_dict().items()},
                         Path(root) / "text_encoders" / f"{name}.safetensors")


# -- what the encoders carry -------------------------------------------------------------------------------
def _fit_and_score(features: torch.Tensor, labels: list[str], train_share: float = 0.75) -> float:
    """Multinomial logistic regression (L-BFGS, a little L2) on the first `train_share` of the rows;
    the held-back rows' accuracy."""
    classes = sorted(set(labels))
    target = torch.tensor([classes.index(v) for v in labels])
    n = int(len(labels) * train_share)
    mean, std = features[:n].mean(0), features[:n].std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x[:n] @ weight + bias, target[:n]) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    with torch.no_grad():
        return ((x[n:] @ weight + bias).argmax(1) == target[n:]).float().mean().item()


@torch.no_grad()
def attribute_probe(conditioner, count: int = 4000, seed: int = 1) -> dict[str, dict[str, float]]:
    """How readable is each attribute a one-object caption names from what the transformer receives?
    A linear probe (logistic regression) on `count` training-style captions of dataset `seed`, scored on a
    quarter held back: {features: {attribute: accuracy}} for the pooled vector (adaLN) and the mean of the
    padding tokens 40-76 of CLIP-L ++ CLIP-G (attention; captions end well before token 40)."""
    from .evaluate import ATTRIBUTES
    from .shapes import one_object_samples

    samples = one_object_samples(count, seed)
    captions = [caption for _, _, caption in samples]
    labels = {a: [named.background if a == "background" else getattr(named.objects[0], a)
                  for _, named, _ in samples] for a in ATTRIBUTES}
    pooled, padding = [], []
    for start in range(0, count, 256):
        context, pool = conditioner.encode(captions[start:start + 256])
        pooled.append(pool.float())
        padding.append(context[:, 40:77, :pool.shape[-1]].float().mean(1))   # CLIP channels only
    result = {}
    for name, features in (("pooled", torch.cat(pooled)), ("padding tokens", torch.cat(padding))):
        result[name] = {}
        for a in ATTRIBUTES:
            named = [k for k, v in enumerate(labels[a]) if v is not None]      # captions may leave it out
            result[name][a] = round(_fit_and_score(features[named], [labels[a][k] for k in named]), 3)
    result["chance"] = {a: round(1 / len({v for v in labels[a] if v is not None}), 3) for a in ATTRIBUTES}
    return result
