"""Prompt -> token ids for SD3's three text encoders.

CLIP (CLIP-L and CLIP-G share one vocabulary): byte-level BPE from `vocab.json` + `merges.txt`, run by the
`tokenizers` library with CLIP's preprocessing: NFC, whitespace runs -> one space, lowercase, CLIP's word regex,
`</w>` marking the end of a word. Always 77 ids: start 49406, at most 75 prompt tokens, end 49407, then padding
(CLIP-L pads with the end token 49407, CLIP-G with 0, as the official code does).

T5: sentencepiece from `spiece.model`. No start token; end token 1; padded with 0 to at least 77 ids (longer
prompts keep all their tokens). Like the official code, T5 sees only the prompt's first 226 characters; with
a longer T5 length (`max_length`, up to 512, as diffusers' `max_sequence_length`) it reads the whole prompt,
cut to that many tokens (the last being the end token) and padded with 0 to exactly that many.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

CLIP_LENGTH = 77
T5_MIN_LENGTH = 77
T5_MAX_CHARS = 226      # the official sd3 code hands T5 text[:226]
T5_WARN_TOKENS = 256    # the model card reports artifacts at the image edges beyond 256 T5 tokens
T5_MAX_LENGTH = 512     # diffusers' limit for max_sequence_length
# Unicode's White_Space characters (str.split() would also split on \x1c-\x1f, which T5's tokenizer keeps)
_UNICODE_SPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def _as_list(prompts: str | list[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {bad[0]}")
    return prompts


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found. The official release has it in tokenizer/ (CLIP-L), "
                                "tokenizer_2/ (CLIP-G) and tokenizer_3/ (T5, spiece.model).")
    return path


class CLIPTokenizer:
    """CLIP BPE with SD3's rules: `tokenizer(prompts)` -> LongTensor (B, 77).

    folder: a directory with vocab.json and merges.txt (the release's tokenizer/ or tokenizer_2/).
    pad_with_end: True for CLIP-L (pads with 49407), False for CLIP-G (pads with 0).
    A prompt over 75 tokens is truncated with a warning that says how many tokens (and which text) were dropped.
    """

    def __init__(self, folder: str | os.PathLike, pad_with_end: bool = True, length: int = CLIP_LENGTH):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        folder = Path(folder)
        merges = None
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer.json").is_file():
            # A folder saved by transformers 5 holds only tokenizer.json: the same vocabulary and merges inside.
            vocab_path = merges_path = folder / "tokenizer.json"
            vocab, merges = _clip_bpe_from_tokenizer_json(vocab_path)
        else:
            vocab_path = _require(folder / "vocab.json", "CLIP vocabulary vocab.json")
            merges_path = _require(folder / "merges.txt", "CLIP BPE merges merges.txt")
        try:
            if merges is None:
                vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            if not isinstance(vocab, dict):
                raise ValueError(f"a JSON {type(vocab).__name__}, not an object")
            bad = [k for k, v in vocab.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
            if bad:
                raise ValueError(f"token {bad[0]!r} has id {vocab[bad[0]]!r}, not a non-negative integer")
            self.start_id, self.end_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        except (ValueError, KeyError, RecursionError) as e:
            raise ValueError(f"{vocab_path}: not a CLIP vocabulary ({type(e).__name__}: {e}); expected a JSON "
                             "object {token: id} holding '<|startoftext|>' and '<|endoftext|>'.") from None
        self.max_id = max(vocab.values())
        try:
            if merges is None:
                _, merges = BPE.read_file(str(vocab_path), str(merges_path))
            bpe = BPE(vocab, merges, unk_token="<|endoftext|>", continuing_subword_prefix="",
                      end_of_word_suffix="</w>", fuse_unk=False)
        except Exception as e:  # the tokenizers library raises a bare Exception for malformed files
            raise ValueError(f"{merges_path}: cannot read the BPE merges with this vocabulary ({e}).") from None
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # CLIP's word regex (contractions, letter runs, single digits, runs of other symbols), then the
        # byte-level mapping that makes every string representable with the 256 byte tokens.
        words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # Typed into a prompt, the two markers are the special tokens (as with transformers' CLIPTokenizer).
        tok.add_special_tokens([AddedToken("<|startoftext|>", special=True, normalized=False),
                                AddedToken("<|endoftext|>", special=True, normalized=False)])
        self.tokenizer = tok
        self.length = length
        self.pad_id = self.end_id if pad_with_end else 0

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        prompts = _as_list(prompts)
        room = self.length - 2  # start and end tokens
        rows = []
        for prompt, enc in zip(prompts, self.tokenizer.encode_batch(prompts, add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > room:
                dropped = prompt[enc.offsets[room][0]:]
                warnings.warn(f"CLIP takes {room} prompt tokens; this prompt has {len(ids)}: dropped the last "
                              f"{len(ids) - room} token(s): {_ellipsis(dropped)!r}", stacklevel=2)
                ids = ids[:room]
            row = [self.start_id, *ids, self.end_id]
            rows.append(row + [self.pad_id] * (self.length - len(row)))
        return torch.tensor(rows, dtype=torch.long)


def _clip_bpe_from_tokenizer_json(path: Path) -> tuple[dict, list[tuple[str, str]]]:
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"a {model.get('type')} model, not BPE")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return model["vocab"], merges
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a CLIP BPE tokenizer ({type(e).__name__}: {e}).") from None


def _ellipsis(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


class T5Tokenizer:
    """sentencepiece with SD3's rules: `tokenizer(prompts)` -> LongTensor (B, max(77, longest)).

    path: spiece.model or the folder holding it (the release's tokenizer_3/). Each prompt is cut to its first
    `max_chars` characters (226, as the official code does: None keeps it whole), split on spaces and
    newlines, each word encoded by sentencepiece (as the official code feeds words one by one), then end
    token 1 is appended and every row padded with 0 to `min_length` (77) or the batch's longest row.
    `max_length` (78..512) reads whole prompts instead, see the module's docstring.
    Rows over 256 tokens get a warning: the SD3.5 model card reports edge artifacts beyond 256 T5 tokens.
    """

    def __init__(self, path: str | os.PathLike, min_length: int = T5_MIN_LENGTH, max_chars: int | None = T5_MAX_CHARS):
        import sentencepiece

        path = Path(path)
        if path.is_dir() or path.suffix != ".model":
            path = path / "spiece.model"
        _require(path, "T5 sentencepiece model spiece.model")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e}).") from None
        self.end_id, self.pad_id = self.sp.eos_id(), self.sp.pad_id()
        if (self.end_id, self.pad_id) != (1, 0):
            raise ValueError(f"{path}: T5 uses end id 1 and pad id 0; this sentencepiece model has end "
                             f"{self.end_id} and pad {self.pad_id}. Is it T5's spiece.model?")
        self.min_length, self.max_chars = min_length, max_chars

    def tokenize(self, prompt: str, max_length: int | None = None) -> list[int]:
        """One prompt -> ids with the end token, unpadded. max_length None: the prompt's first `max_chars`
        characters; otherwise the whole prompt, its ids cut to max_length (the end token kept last)."""
        if self.max_chars is not None and max_length is None:
            prompt = prompt[: self.max_chars]
        # Words as T5TokenizerFast (the official code's tokenizer) finds them: sentencepiece's own normalization
        # first (it drops some control characters and maps odd spaces to ' '), then a split on Unicode spaces.
        words = _UNICODE_SPACE.split(self.sp.normalize(prompt).replace("\u2581", " "))
        words = [w for w in words if w]
        ids = [i for word in self.sp.encode(words) for i in word] + [self.end_id]
        if max_length is not None and len(ids) > max_length:
            warnings.warn(f"the prompt has {len(ids)} T5 tokens; T5 reads the first {max_length}: dropped the "
                          f"rest (raise the T5 length, up to {T5_MAX_LENGTH}, to keep them)", stacklevel=3)
            ids = ids[: max_length - 1] + [self.end_id]
        if len(ids) > T5_WARN_TOKENS:
            warnings.warn(f"the prompt has {len(ids)} T5 tokens; SD3.5 was trained with at most {T5_WARN_TOKENS} "
                          "and its model card warns of artifacts at the image edges beyond that.", stacklevel=3)
        return ids

    def __call__(self, prompts: str | list[str], min_length: int | None = None,
                 max_length: int | None = None) -> torch.Tensor:
        """(B, T) ids. max_length None: the official rule (first 226 characters, T = max(77, longest));
        otherwise the whole prompt, T = max_length (the ids cut to it, the end token kept last)."""
        if max_length is not None and not T5_MIN_LENGTH <= max_length <= T5_MAX_LENGTH:
            raise ValueError(f"the T5 length must be between {T5_MIN_LENGTH} and {T5_MAX_LENGTH}, not {max_length}")
        rows = [self.tokenize(p, max_length) for p in _as_list(prompts)]
        length = max_length or max([min_length or self.min_length, *map(len, rows)])
        return torch.tensor([r + [self.pad_id] * (length - len(r)) for r in rows], dtype=torch.long)
