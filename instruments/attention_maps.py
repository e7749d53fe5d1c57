"""Where does the image look for each prompt word? Cross-attention heatmaps from MMDiT-X's joint attention.

    pipe = Pipeline.from_model_dir("models/sd3.5_medium")
    result = attention_maps(pipe, GenerationParams(prompt="a photo of a cat", seed=1), blocks=range(24))
    panels = [overlay(result.image, m, w.text) for w, m in zip(result.words, result.maps)]

Three steps:
  1. words -> context positions. The joint context is [CLIP (77) ; T5 (>= 77)] tokens: position 0 is CLIP's
     start token, 1..75 the CLIP BPE tokens of the prompt (CLIP-L and CLIP-G features sit side by side on the
     same positions), then 77 + i is T5 token i. A word is a whitespace-separated chunk of the prompt with
     leading/trailing punctuation stripped; it gets every token its chunk was split into (several for long or
     rare words), minus pure-punctuation tokens at its edges. Words past CLIP's 75 tokens keep only their T5
     positions; words past T5's 226 characters only their CLIP positions.
  2. accumulate. During sampling, `instruments.tracing.Trace` records the joint-attention probabilities of the
     chosen blocks (mean over heads); we keep a running sum of the image->text part for the conditional prompt
     (row 0 of the CFG batch: the pipeline batches [cond ; uncond]) over chosen blocks and steps, skipping the
     extra skip-layer-guidance pass. Nothing per step is kept.
  3. per word: sum the averaged probabilities over its positions -> (H/16, W/16) map on the patch grid (latent
     is image/8, patches 2x2), the share of each image patch's attention that goes to that word.
Rendering (upsample, colormap, blend, label, contact sheet) is plain numpy + PIL.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from encoders.tokenizers import _UNICODE_SPACE, CLIP_LENGTH, CLIPTokenizer, T5Tokenizer
from .tracing import Trace

T5_OFFSET = CLIP_LENGTH  # T5 token i sits at context position 77 + i


# -- 1. words -> context positions ------------------------------------------------------------------------

@dataclass
class Word:
    text: str                                        # the word as written, edge punctuation stripped (the label)
    start: int                                       # character span of the whole chunk in the prompt
    end: int
    clip: list[int] = field(default_factory=list)    # context positions 1..75 (CLIP-L and CLIP-G tokens)
    t5: list[int] = field(default_factory=list)      # context positions 77.. (T5 tokens)

    @property
    def positions(self) -> list[int]:
        return self.clip + self.t5


def _is_punctuation(text: str) -> bool:
    """True for '', ',', ')!', '...' (every character a Unicode punctuation mark); False for 'cat', '🐱', "'s"."""
    return all(unicodedata.category(ch).startswith("P") for ch in text)


def split_words(prompt: str) -> list[Word]:
    """Whitespace-separated chunks (split on Unicode spaces, as the T5 tokenizer does), keeping those with
    something besides punctuation. Positions are filled in by `map_words`."""
    words, pos = [], 0
    for space in [*_UNICODE_SPACE.finditer(prompt), None]:
        end = space.start() if space else len(prompt)
        chunk = prompt[pos:end]
        core = chunk.strip("".join(ch for ch in set(chunk) if _is_punctuation(ch)))
        if core:
            words.append(Word(core, pos, end))
        pos = space.end() if space else end
    return words


def _strip_edges(tokens: list[tuple[int, str]]) -> list[int]:
    """(position, text) tokens of one chunk -> positions without pure-punctuation tokens at either edge
    (all of them if nothing else would be left)."""
    lo, hi = 0, len(tokens)
    while lo < hi and _is_punctuation(tokens[lo][1]):
        lo += 1
    while hi > lo and _is_punctuation(tokens[hi - 1][1]):
        hi -= 1
    kept = tokens[lo:hi] or tokens
    return [p for p, _ in kept]


def clip_positions(tokenizer: CLIPTokenizer, prompt: str, words: list[Word]) -> list[list[int]]:
    """Context positions of each word's CLIP tokens. The tokenizer's character offsets (into the prompt as
    written, before lowercasing) say which chunk each BPE token came from; token j of the prompt sits at
    position 1 + j (0 is the start token) when j < 75, and is cut off otherwise."""
    enc = tokenizer.tokenizer.encode(prompt, add_special_tokens=False)
    room = tokenizer.length - 2
    per_word: list[list[tuple[int, str]]] = [[] for _ in words]
    for j, (a, b) in enumerate(enc.offsets[:room]):
        for k, w in enumerate(words):
            if w.start <= a < w.end:
                per_word[k].append((1 + j, prompt[a:b]))
                break
    return [_strip_edges(toks) for toks in per_word]


def t5_positions(tokenizer: T5Tokenizer, prompt: str, words: list[Word]) -> list[list[int]]:
    """Context positions (77 + i) of each word's T5 tokens. T5 is tokenized word by word (after cutting the
    prompt to its first 226 characters), so tokenizing the prompt up to the start and up to the end of a chunk
    gives the chunk's token range. A chunk cut by the 226-character limit keeps the pieces T5 saw; chunks past
    it get none."""
    def ids_upto(n_chars: int) -> list[int]:
        return tokenizer.tokenize(prompt[:n_chars])[:-1]  # without the end token

    limit = len(prompt) if tokenizer.max_chars is None else tokenizer.max_chars
    out = []
    for w in words:
        first, ids = len(ids_upto(w.start)), ids_upto(w.end)
        ids = ids[first:]
        # The pieces' text, to recognise punctuation: sentencepiece's pieces as strings give the original text
        # for unknown pieces too (the id says only <unk>). Same split as the tokenizer's, checked by the ids.
        chunk = _UNICODE_SPACE.split(tokenizer.sp.normalize(prompt[w.start:min(w.end, limit)]).replace("\u2581", " "))
        chunk = [c for c in chunk if c]
        texts = [s for piece in tokenizer.sp.encode(chunk, out_type=str) for s in piece]
        if [i for piece in tokenizer.sp.encode(chunk) for i in piece] != ids:
            texts = [tokenizer.sp.id_to_piece(i) for i in ids]
        out.append(_strip_edges([(T5_OFFSET + first + k, t.replace("\u2581", "")) for k, t in enumerate(texts)]))
    return out


def map_words(prompt: str, clip_tokenizers: Iterable[CLIPTokenizer], t5_tokenizer: T5Tokenizer | None) -> list[Word]:
    """The prompt's words with their context positions. CLIP-L and CLIP-G share positions (their features are
    concatenated per token); with two tokenizers their positions are merged (identical for the official
    files, which share one vocabulary). `t5_tokenizer=None` (running without T5): CLIP positions only."""
    words = split_words(prompt)
    for tok in clip_tokenizers:
        for w, pos in zip(words, clip_positions(tok, prompt, words)):
            w.clip = sorted(set(w.clip) | set(pos))
    if t5_tokenizer is not None:
        for w, pos in zip(words, t5_positions(t5_tokenizer, prompt, words)):
            w.t5 = pos
    return words


# -- 2. accumulate image -> text attention during sampling ----------------------------------------------------

class AttentionAccumulator:
    """Running mean of the conditional prompt's image->text attention (L_img, L_ctx) over chosen blocks and
    steps, collected while the pipeline samples. Use as a context manager around `Pipeline.generate`, passing
    `callback=acc.callback` (it numbers the sampling steps).

        with AttentionAccumulator(pipe.transformer(), blocks=[5, 6], steps=range(10)) as acc:
            images = pipe.generate(params, callback=acc.callback)
        acc.mean()   # (L_img, L_ctx)
    """

    def __init__(self, model, blocks: Iterable[int], steps: Iterable[int]):
        self.steps = set(steps)
        self.trace = Trace(model, blocks=blocks, steps=self.steps, modulation=False, attention=True)
        self.model = model
        self.step = 0
        self.total: torch.Tensor | None = None    # (L_img, L_ctx) float64 running sum
        self.count = 0                            # (block, step) pairs summed
        self.used_steps: set[int] = set()
        self._handles = []

    def callback(self, step: int, total: int, denoised) -> None:
        self.step = step + 1                       # called after step `step`: the next calls belong to step+1

    def _on_model(self, module, args, kwargs):
        skip_layers = kwargs.get("skip_layers", args[4] if len(args) > 4 else ())
        # The skip-layer-guidance pass is another forward (some blocks left out) of the same step: not traced.
        self.trace.set_step(-1 if len(skip_layers) else self.step)

    def _on_block(self, i):
        def hook(module, args, output):
            rec = self.trace.records.get((self.trace.step, i))
            if rec is None or "attention" not in rec:
                return
            p = rec.pop("attention")["image_to_text"][0].double()     # (L_img, L_ctx), row 0: the prompt
            self.total = p if self.total is None else self.total.add_(p)
            self.count += 1
            self.used_steps.add(self.trace.step)
        return hook

    def __enter__(self) -> "AttentionAccumulator":
        self.trace.__enter__()                     # Trace's hooks first: ours run after them
        self._handles.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for i in sorted(self.trace.blocks):
            self._handles.append(self.model.joint_blocks[i].register_forward_hook(self._on_block(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.trace.__exit__(*exc)

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no attention was recorded: were the chosen steps ever sampled?")
        return (self.total / self.count).float().cpu()


@dataclass
class AttentionMaps:
    image: Image.Image
    words: list[Word]
    maps: torch.Tensor            # (n_words, h, w) attention probability mass on each word, per image patch
    mean: torch.Tensor            # (L_img, L_ctx) the averaged image->text probabilities
    blocks: list[int]
    steps: list[int]


def word_maps(mean: torch.Tensor, words: list[Word], grid: tuple[int, int]) -> torch.Tensor:
    """(L_img, L_ctx) averaged probabilities -> (n_words, h, w): per image patch, the probability mass on the
    word's tokens (image tokens are the patch grid in row-major order)."""
    h, w = grid
    maps = torch.zeros(len(words), h, w)
    for k, word in enumerate(words):
        if word.positions:
            maps[k] = mean[:, word.positions].sum(-1).view(h, w)
    return maps


def attention_maps(pipe, params, blocks: Iterable[int] | None = None, steps: Iterable[int] | None = None,
                   callback=None) -> AttentionMaps:
    """Generate one image for `params` and the per-word attention maps, averaged over `blocks` (default: all)
    and sampling `steps` (default: all). `callback(step, total, denoised)` as for `Pipeline.generate`."""
    depth = pipe.config.depth
    blocks = sorted(range(depth) if blocks is None else set(blocks))
    steps = sorted(range(params.steps) if steps is None else set(steps))
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"blocks {bad} outside the model's joint blocks 0..{depth - 1}")
    bad = [s for s in steps if not 0 <= s < params.steps]
    if bad:
        raise ValueError(f"steps {bad} outside the sampling steps 0..{params.steps - 1}")
    f = pipe.files
    tokenizers = [CLIPTokenizer(f.tokenizer_l), CLIPTokenizer(f.tokenizer_g, pad_with_end=False)]
    t5 = T5Tokenizer(f.tokenizer_t5) if f.tokenizer_t5 is not None else None
    words = map_words(params.prompt, tokenizers, t5)

    # Hooks go on once sampling begins (callback step -1): the transformer is loaded by then, after the text
    # encoders (which memory="sequential" has already freed).
    accs: list[AttentionAccumulator] = []

    def on_step(i, total, denoised):
        if i < 0:
            accs.append(AttentionAccumulator(pipe.transformer(), blocks, steps).__enter__())
        accs[-1].callback(i, total, denoised)
        if callback:
            callback(i, total, denoised)

    try:
        image = pipe.generate(params, num_images=1, callback=on_step)[0]
    finally:
        for acc in accs:
            acc.__exit__(None, None, None)
    acc = accs[-1]
    grid = (params.height // (8 * pipe.config.patch_size), params.width // (8 * pipe.config.patch_size))
    mean = acc.mean()
    return AttentionMaps(image, words, word_maps(mean, words, grid), mean, blocks, sorted(acc.used_steps))


# -- 3. rendering ------------------------------------------------------------------------------------------

# A perceptually ordered dark-to-bright map (black, indigo, crimson, orange, pale yellow), interpolated.
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)), linear between the anchor colors."""
    v = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(v.astype(np.int64), len(_ANCHORS) - 2)
    t = (v - i)[..., None]
    return np.round(_ANCHORS[i] * (1 - t) + _ANCHORS[i + 1] * t).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _label(image: Image.Image, text: str, size: int | None = None) -> Image.Image:
    """Write `text` at the top left on a dark box (shortened with '...' to fit the width)."""
    draw = ImageDraw.Draw(image)
    font = _font(size or max(10, min(24, image.width // 12)))
    shown = text
    while shown and draw.textlength(shown, font=font) > image.width - 6:
        shown = shown[:-1]
    if shown != text:
        shown = shown[:-3] + "..." if len(shown) > 3 else shown
    x0, y0, x1, y1 = draw.textbbox((3, 2), shown, font=font)
    draw.rectangle((0, 0, x1 + 3, y1 + 3), fill=(0, 0, 0))
    draw.text((3, 2), shown, fill=(255, 255, 255), font=font)
    return image


def overlay(image: Image.Image, heat: torch.Tensor, label: str, alpha: float = 0.6) -> Image.Image:
    """One panel: the (h, w) map upsampled (bilinear) to the image size, normalized to its own min..max,
    colored and blended over the image (in grayscale, so the colors read as the map), labelled."""
    m = heat.detach().float().cpu().numpy()
    up = np.asarray(Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).resize(image.size, Image.BILINEAR))
    lo, hi = float(up.min()), float(up.max())
    norm = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    base = np.asarray(image.convert("L").convert("RGB"), dtype=np.float64)
    blended = (1 - alpha) * base + alpha * colormap(norm)
    return _label(Image.fromarray(np.round(blended).astype(np.uint8)), label)


def contact_sheet(image: Image.Image, panels: list[Image.Image], title: str = "",
                  columns: int | None = None) -> Image.Image:
    """The image first, then every panel, in a grid with 4-pixel gaps under an optional title strip."""
    cells = [_label(image.convert("RGB").copy(), "image")] + panels
    cols = columns or math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    W, H, gap = image.width, image.height, 4
    strip = 0
    if title:
        strip = max(14, min(24, (cols * W) // 40)) + 8
    sheet = Image.new("RGB", (cols * W + (cols + 1) * gap, rows * H + (rows + 1) * gap + strip), (24, 24, 24))
    if title:
        header = Image.new("RGB", (sheet.width, strip), (24, 24, 24))
        sheet.paste(_label(header, title, size=strip - 8), (0, 0))
    for k, cell in enumerate(cells):
        r, c = divmod(k, cols)
        sheet.paste(cell, (gap + c * (W + gap), strip + gap + r * (H + gap)))
    return sheet


def slug(word: str, n: int = 40) -> str:
    """A file-name-safe ASCII form of a word ('word' when nothing is left)."""
    plain = "".join(ch for ch in unicodedata.normalize("NFKD", word) if not unicodedata.combining(ch))
    s = re.sub(r"[^A-Za-z0-9]+", "_", plain).strip("_").lower()
    return s[:n] or "word"
