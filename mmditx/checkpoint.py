"""Reading checkpoints: everything every component needs, written once.

`encoders` and `vae` import this module (and nothing else of `mmditx`).

The safetensors format is tiny: 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw data.
We parse the header ourselves so that every failure names the file and the key, and we map the data with
`mmap` so a tensor is a zero-copy view of the file. Models are built on the meta device and the tensors are
assigned into them, so loading never holds two copies of the weights:
  - stored dtype == wanted dtype on CPU: the parameter *is* the memory-mapped view (no copy at all);
  - otherwise each tensor is converted on its own and its file pages are dropped right after
    (madvise DONTNEED), so the mapping never accumulates in resident memory.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says which file, which key and what to do."""


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a job computes in when none is asked for, decided once where the job enters (the pipeline, the
    text conditioner): fp32 on CPU (no fast half precision there), bf16 on GPU (the model was trained in it)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept torch dtypes or their short names ('fp32', 'fp16', 'bf16', 'fp8'); "stored" (or None): keep each
    weight in the dtype of the file (a loader then copies nothing it need not)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "stored": None, "as_stored": None,
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(names)}") from None


def parse_device(device: torch.device | str | None) -> torch.device:
    """A torch device that exists on this machine ('cpu', 'cuda', 'cuda:1', 'mps'), else a ValueError saying
    what there is. None is the CPU."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = "cpu" if device is None else str(device)
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                 "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}
    if not available.get(dev.type, False):
        raise ValueError(f"device {name!r} is not available on this machine (this torch build or machine has no "
                         f"{dev.type}): use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. `tensor(key)` returns a zero-copy CPU view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file. Check the path (expected a .safetensors checkpoint).")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes). "
                                      "Re-download it or point to the .safetensors file.")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n + 8 > size:
                raise CheckpointError(
                    f"{self.path}: not a safetensors file (header length {n} does not fit a {size}-byte file). "
                    "A .ckpt/.pt/.bin pickle is not supported: convert it to .safetensors, or re-download a truncated file.")
            raw = f.read(n)
        self.metadata, self.entries = parse_header(raw, size - 8 - n, self.path)
        self.data_start = 8 + n
        self._mmap: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][0]

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        """{key without prefix: shape} for the keys under `prefix`: enough to infer a configuration."""
        return {k[len(prefix):]: v[1] for k, v in self.entries.items() if k.startswith(prefix)}

    def _data(self) -> torch.Tensor:
        if self._bytes is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: a private mapping, so torch may hold a writable view without touching the file.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)
        return self._bytes

    def tensor(self, key: str) -> torch.Tensor:
        """The stored tensor as a zero-copy view of the mapped file (CPU, stored dtype)."""
        if key not in self.entries:
            raise CheckpointError(f"{self.path}: key {key!r} not found.")
        dtype, shape, begin, end = self.entries[key]
        raw = self._data()[self.data_start + begin: self.data_start + end]
        if (self.data_start + begin) % _itemsize(dtype):
            raw = raw.clone()  # unaligned data (never written by the safetensors library): copy to align
        return raw.view(dtype).reshape(shape)

    def release(self, key: str) -> None:
        """Drop the resident file pages of `key` (after it was copied/converted), keeping peak RSS down."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self.entries[key]
        page = mmap.PAGESIZE
        start = (self.data_start + begin + page - 1) // page * page  # only whole pages inside the tensor
        stop = (self.data_start + end) // page * page
        if stop > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)


def parse_header(raw: bytes, data_size: int, path: str | os.PathLike = "<header>"
                 ) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """(metadata, {key: (dtype, shape, begin, end)}) from a safetensors header, validated as the format's
    specification requires: a JSON object of entries {"dtype": one of _DTYPES, "shape": [non-negative ints],
    "data_offsets": [begin, end]} and an optional "__metadata__" of strings; every tensor's bytes inside the data
    section (`data_size` bytes), of exactly dtype size x shape, and no two tensors overlapping. Anything else is a
    CheckpointError naming the file and the key (never a tensor that could read the header or another tensor)."""
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file: {what}. Re-download or re-export it.")

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"the header is not valid JSON ({e})") from None
    except RecursionError:   # the format's header is at most 3 levels deep
        raise fail("the header is nested too deeply") from None
    if not isinstance(header, dict):
        raise fail("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("__metadata__ is not an object of strings")
    entries = {}
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"entry {key!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise fail(f"tensor {key!r} has dtype {str(dtype)[:40]!r}; supported: {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape) or len(shape) > 16:
            raise fail(f"tensor {key!r} has shape {str(shape)[:80]}; a shape is a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise fail(f"tensor {key!r} has data_offsets {str(offsets)[:80]}; expected [begin, end], non-negative "
                       "integers")
        begin, end = offsets
        if begin > end:
            raise fail(f"tensor {key!r} has data_offsets [{begin}, {end}]: begin after end")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {key!r} ends at byte {end} of the data section, which has "
                f"{data_size} bytes. The download or copy did not finish: fetch the file again.")
        numel = 1
        for s in shape:
            numel *= s
        need = numel * _itemsize(_DTYPES[dtype])
        if end - begin != need:
            raise fail(f"tensor {key!r} has {end - begin} bytes of data but its shape {shape} and dtype {dtype} "
                       f"need {need}")
        entries[key] = (_DTYPES[dtype], tuple(shape), begin, end)
    previous = None
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin == end:
            continue   # an empty tensor occupies no bytes
        if previous is not None and begin < entries[previous][3]:
            raise fail(f"tensors {previous!r} and {key!r} overlap in the data section")
        previous = key
    return metadata, entries


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# Below one 2 MiB huge page the ordinary allocator is as good.
_HUGE_PAGE = 2 << 20


def empty_cpu(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor; one of 2 MiB or more gets its own anonymous mapping advised for transparent
    huge pages (Linux; elsewhere, or where THP is off, this is plain `torch.empty`).

    Why: the first write to freshly allocated memory faults in one 4 KiB page at a time. Converting the
    transformer + VAE to fp32 (10 GB) took 2.6 million page faults, most of the load time on this machine;
    with 2 MiB pages it takes ~0.2 million and the load 3.69 s instead of 5.85 s (`benchmark.py load`).
    Each tensor has its own mapping (own storage), returned to the OS when the tensor is freed.
    """
    shape = torch.Size(shape)
    nbytes = shape.numel() * _itemsize(dtype)
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP not offered by this kernel: ordinary pages, still correct
        pass
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps `buf` alive


def convert(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu",
            non_blocking: bool = False) -> torch.Tensor:
    """A converted copy of `t` (same values as `t.to(device, dtype, copy=True)`); on CPU into `empty_cpu`."""
    device = torch.device(device)
    if device.type != "cpu":
        return t.to(device=device, dtype=dtype, copy=True, non_blocking=non_blocking)
    return empty_cpu(t.shape, dtype).copy_(t)


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    return SafetensorsFile(path)


def find_prefix(f: SafetensorsFile, candidates: Iterable[str], probe: str, what: str) -> str:
    """Return the first prefix in `candidates` under which `probe` exists, else a clear error."""
    for prefix in candidates:
        if prefix + probe in f:
            return prefix
    found = sorted({k.split(".")[0] for k in f.keys()})
    raise CheckpointError(
        f"{f.path}: no {what} weights found (looked for {[p + probe for p in candidates]}). "
        f"The file's top-level names are {found[:12]}: is this the right file?")


def check_keys(
    f: SafetensorsFile,
    prefix: str,
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    ignore_unexpected: Callable[[str], bool] = lambda k: False,
) -> None:
    """Compare the file's keys under `prefix` with `expected` {name: shape}; raise naming file and keys."""
    present = {k[len(prefix):]: f.shape(k) for k in f.keys() if k.startswith(prefix)}
    missing = [k for k in expected if k not in present]
    unexpected = [k for k in present if k not in expected and not ignore_unexpected(k)]
    wrong = [(k, present[k], expected[k]) for k in expected if k in present and tuple(present[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(prefix + k for k in missing[:8])
                        + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(prefix + k for k in unexpected[:8])
                        + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        problems.append("shape mismatch: " + "; ".join(
            f"{prefix + k} is {list(got)} but the {what} expects {list(want)}" for k, got, want in wrong[:8]))
    if problems:
        raise CheckpointError(f"{f.path}: not a valid {what} checkpoint: " + " | ".join(problems)
                              + ". Is this the right file for this model, and complete?")


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a module's parameters and persistent buffers (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def assign_from_file(
    module: nn.Module,
    f: SafetensorsFile,
    prefix: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    dtype_of: Callable[[str, torch.dtype], torch.dtype] | None = None,
    rename: Callable[[str], str] = lambda k: k,
    check_finite: bool = False,
) -> nn.Module:
    """Assign every parameter/buffer of `module` (usually built on the meta device) from `f`.

    The file key of a module name `k` is `prefix + rename(k)`. Floating-point tensors become `dtype`
    (`None` keeps the stored dtype), or `dtype_of(k, stored_dtype)` when given (per-tensor choices, e.g. T5's
    matrices kept in fp8 while its norms are upcast); other tensors keep their dtype. A converted tensor's file
    pages are dropped, so only one copy is ever resident.
    check_finite: scan every floating-point tensor for NaN/inf first (CheckpointError naming the tensor).
    Call `check_keys` first for user-facing errors; this assumes the keys are right.
    """
    device = torch.device(device)
    state = {}
    for name, slot in module.state_dict().items():
        key = prefix + rename(name)
        t = f.tensor(key)
        if t.dtype.is_floating_point != slot.dtype.is_floating_point:
            kind = "floating-point" if slot.dtype.is_floating_point else f"{_DTYPE_NAMES.get(slot.dtype, slot.dtype)}"
            raise CheckpointError(f"{f.path}: tensor {key!r} is stored as {_DTYPE_NAMES[t.dtype]} but this weight "
                                  f"must be {kind}: the file is damaged or not this model's checkpoint.")
        if check_finite:
            check_tensor_finite(f, key, t)
        if not t.dtype.is_floating_point:
            want = t.dtype
        elif dtype_of is not None:
            want = dtype_of(name, t.dtype)
        else:
            want = t.dtype if dtype is None else dtype
        if want != t.dtype or device.type != "cpu":
            t = convert(t, want, device)
            f.release(key)
        state[name] = t
    module.load_state_dict(state, assign=True, strict=True)
    module.requires_grad_(False)
    return module.eval()


def check_tensor_finite(f: SafetensorsFile, key: str, t: torch.Tensor | None = None) -> None:
    """CheckpointError naming file and tensor if `key` holds NaN or inf (integer tensors always pass)."""
    t = f.tensor(key) if t is None else t
    if not t.dtype.is_floating_point or t.numel() == 0:
        return
    flat = t.reshape(-1)
    bad = 0
    for chunk in flat.split(1 << 22):   # bounded memory: fp8 has no isfinite kernel, so chunks go via fp32
        bad += int((~torch.isfinite(chunk.float() if chunk.element_size() == 1 else chunk)).sum())
    if bad:
        raise CheckpointError(f"{f.path}: tensor {key!r} holds {bad} NaN/inf value(s) of {t.numel()}: the file is "
                              "corrupt or was saved from a diverged training run; re-download or re-export it.")


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without allocating its weights (they are assigned from the file afterwards)."""
    with torch.device("meta"):
        return factory()


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors in the safetensors format."""
    specs = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    write_safetensors_streaming(specs, tensors.__getitem__, path, metadata)


@contextmanager
def written_whole(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file whole or not at all: yields a temporary path beside `path` (`.NAME.PID.partial.EXT`, in the
    same folder so the rename is atomic), renamed over `path` when the block ends without error and removed
    otherwise. A reader never sees a partial file, a failed write leaves the old file as it was, and a model
    memory-mapped from the old file keeps its (old) data instead of crashing with SIGBUS."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors_streaming(
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    path: str | os.PathLike,
    metadata: dict | None = None,
) -> None:
    """Write a safetensors file tensor by tensor: `produce(key)` is called once per key, in file order, so a
    full-size checkpoint (tests, benchmarks) never has to exist in memory at once."""
    # Largest elements first keeps every tensor aligned to its element size.
    order = sorted(specs, key=lambda k: -_itemsize(specs[k][1]))
    header, offset = {}, 0
    for k in order:
        shape, dtype = specs[k]
        numel = 1
        for s in shape:
            numel *= s
        header[k] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + numel * _itemsize(dtype)]}
        offset += numel * _itemsize(dtype)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the safetensors library does
    with written_whole(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for k in order:
            t = produce(k)
            shape, dtype = specs[k]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{k}: produced {tuple(t.shape)} {t.dtype}, declared {tuple(shape)} {dtype}")
            out.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


# -- checkpoints in several files, and under other names ----------------------------------------------------
#
# A diffusers-format folder stores each component in its own subfolder (transformer/, vae/, text_encoder*/),
# possibly split into shards listed by an index (`*.safetensors.index.json`: {"weight_map": {key: shard}}),
# and names the transformer's and the VAE's tensors its own way. The classes below present such a checkpoint
# through the same interface as `SafetensorsFile` (keys, shape, dtype, tensor, release, path), so every loader
# reads it unchanged: still memory-mapped, tensor by tensor.


class ShardedSafetensors:
    """The shards listed by a `*.safetensors.index.json`, seen as one file (each shard memory-mapped)."""

    def __init__(self, index: str | os.PathLike):
        self.path = Path(index)
        try:
            weight_map = json.loads(self.path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("'weight_map' is not an object of file names")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file.") from None
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.path}: not a valid shard index ({type(e).__name__}: {e}); expected JSON "
                                  "with a 'weight_map' {tensor name: shard file}. Re-download the folder.") from None
        self.metadata: dict = {}
        self.shards: dict[str, SafetensorsFile] = {}
        for name in sorted(set(weight_map.values())):
            shard = self.path.parent / name
            if not shard.is_file():
                raise CheckpointError(f"{self.path}: lists shard {name}, which is missing from {self.path.parent}. "
                                      "The download is incomplete: fetch the missing shard.")
            self.shards[name] = SafetensorsFile(shard)
        self._file_of: dict[str, SafetensorsFile] = {}
        for key, name in weight_map.items():
            if key not in self.shards[name]:
                raise CheckpointError(f"{self.path}: says {key!r} is in {name}, but that shard does not hold it. "
                                      "The index and the shards come from different versions: re-download both.")
            self._file_of[key] = self.shards[name]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file_of[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._file_of[key].dtype(key)

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        return {k[len(prefix):]: f.shape(k) for k, f in self._file_of.items() if k.startswith(prefix)}

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self._file_of:
            raise CheckpointError(f"{self.path}: key {key!r} not found.")
        return self._file_of[key].tensor(key)

    def release(self, key: str) -> None:
        self._file_of[key].release(key)


# What a diffusers folder holds for Stable Diffusion 3 (model_index.json's pipeline classes).
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
                 "StableDiffusion3ControlNetPipeline", "StableDiffusion3PAGPipeline")


def read_model_index(root: str | os.PathLike) -> dict:
    """`root/model_index.json` of a diffusers folder, checked to describe a Stable Diffusion 3 pipeline."""
    path = Path(root) / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}). Re-download the folder.") from None
    cls = index.get("_class_name")
    if cls not in SD3_PIPELINES:
        kind = next((n for k, n in (("Flux", "Flux"), ("XL", "SDXL"), ("StableDiffusionPipeline", "SD 1.x/2.x"),
                                    ("Sana", "Sana"), ("PixArt", "PixArt")) if k in str(cls)), None)
        raise CheckpointError(f"{path}: a {cls} folder{f' ({kind})' if kind else ''}, not Stable Diffusion 3 "
                              f"(expected one of {', '.join(SD3_PIPELINES)}). This project runs SD3/SD3.5 models only.")
    return index


def open_checkpoint(path: str | os.PathLike, component: str | None = None,
                    classes: tuple[str, ...] = ()) -> "SafetensorsFile | ShardedSafetensors":
    """A checkpoint given as a `.safetensors` file, a shard index `*.safetensors.index.json`, a folder holding
    either (a diffusers component folder), or a whole diffusers folder (with model_index.json) from which the
    subfolder `component` is taken; model_index.json must list it with one of `classes`."""
    path = Path(path)
    if not path.is_dir():
        return ShardedSafetensors(path) if path.name.endswith(".index.json") else SafetensorsFile(path)
    if component is not None and (path / "model_index.json").is_file():
        index = read_model_index(path)
        entry = index.get(component)
        cls = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if cls is None:
            raise CheckpointError(f"{path / 'model_index.json'}: lists no '{component}' component (it lists "
                                  f"{sorted(k for k in index if not k.startswith('_'))}). Is the folder complete?")
        if classes and cls not in classes:
            raise CheckpointError(f"{path / 'model_index.json'}: component '{component}' is a {cls}; expected "
                                  f"{' or '.join(classes)}. This folder is not a Stable Diffusion 3 model.")
        if not (path / component).is_dir():
            raise CheckpointError(f"{path / component}: missing subfolder (model_index.json lists '{component}' "
                                  f"as {cls}). The download is incomplete: fetch {component}/.")
        path = path / component
    return _open_folder(path)


def _open_folder(folder: Path) -> "SafetensorsFile | ShardedSafetensors":
    """The weights in a diffusers/transformers component folder: its shard index, else its one .safetensors file
    (the unsuffixed `diffusion_pytorch_model`/`model` name preferred over variants such as `.fp16`)."""
    for base in ("diffusion_pytorch_model", "model"):
        if (folder / f"{base}.safetensors.index.json").is_file():
            return ShardedSafetensors(folder / f"{base}.safetensors.index.json")
        if (folder / f"{base}.safetensors").is_file():
            return SafetensorsFile(folder / f"{base}.safetensors")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    files = sorted(folder.glob("*.safetensors"))
    if len(indexes) == 1:
        return ShardedSafetensors(indexes[0])
    if not indexes and len(files) == 1:
        return SafetensorsFile(files[0])
    found = [p.name for p in indexes + files]
    if not found:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (it holds {bins}: pickled .bin weights are not supported, use the .safetensors ones)" if bins else ""
        raise CheckpointError(f"{folder}: no .safetensors weights in this folder{hint}; expected "
                              "diffusion_pytorch_model.safetensors, model.safetensors or a *.safetensors.index.json.")
    raise CheckpointError(f"{folder}: several checkpoints {found}: pass the one to use (a file or its index).")


class Rename:
    """One naming rule between our (the official) layout and another one, say diffusers'.

    `ours` and `theirs` are name templates whose fields ({b}, {j}, ...) stand for numbers, except {w}: 'weight' or
    'bias'. Our tensor is their tensors concatenated along dim 0 (diffusers' separate q, k, v -> our fused qkv).
    swap_halves: their one tensor holds our two halves in the other order (diffusers' AdaLayerNormContinuous
    is (scale, shift), the official final layer (shift, scale)). conv1x1: ours is a 1x1 convolution (out, in, 1, 1)
    where theirs is a linear layer (out, in).
    """

    def __init__(self, ours: str, *theirs: str, swap_halves: bool = False, conv1x1: bool = False):
        self.ours, self.theirs, self.swap_halves, self.conv1x1 = ours, theirs, swap_halves, conv1x1
        self._ours_re = _template_regex(ours)
        self._theirs_re = [_template_regex(t) for t in theirs]

    def match_ours(self, name: str) -> dict | None:
        m = self._ours_re.fullmatch(name)
        return m.groupdict() if m else None

    def match_theirs(self, name: str) -> dict | None:
        for r in self._theirs_re:
            m = r.fullmatch(name)
            if m:
                return m.groupdict()
        return None

    def pieces(self, fields: dict) -> list[tuple[str, int, int]]:
        """Our tensor as [(their name, chunk index, chunks in it)], concatenated in this order."""
        names = [t.format(**fields) for t in self.theirs]
        if self.swap_halves:
            return [(names[0], 1, 2), (names[0], 0, 2)]
        return [(n, 0, 1) for n in names]


def _template_regex(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        field = m.group(1)
        out += re.escape(template[pos:m.start()]) + (f"(?P<{field}>weight|bias)" if field == "w" else f"(?P<{field}>\\d+)")
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]))


class RenamedCheckpoint:
    """A checkpoint seen under other names, built by `to_ours`/`to_theirs`: each name is one source tensor or
    a row range of one (a zero-copy view, reshaped where a rule says so) or the concatenation of row ranges of several (a copy,
    made when the tensor is asked for, after which the source's pages are dropped)."""

    def __init__(self, source, parts: dict[str, list[tuple[str, int, int]]], shapes: dict[str, tuple[int, ...]],
                 what: str):
        self.source, self.path, self.what = source, source.path, what
        self.metadata = getattr(source, "metadata", {})
        self._parts, self._shapes = parts, shapes

    def keys(self) -> list[str]:
        return list(self._parts)

    def __contains__(self, key: str) -> bool:
        return key in self._parts

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(self._parts[key][0][0])

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        return {k[len(prefix):]: s for k, s in self._shapes.items() if k.startswith(prefix)}

    def source_names(self, key: str) -> list[str]:
        return list(dict.fromkeys(name for name, _, _ in self._parts[key]))

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self._parts:
            raise CheckpointError(f"{self.path}: key {key!r} not found.")
        shape, parts = self._shapes[key], self._parts[key]
        views = [self.source.tensor(name) if start is None else self.source.tensor(name)[start:stop]
                 for name, start, stop in parts]
        if len(views) == 1:
            return views[0].reshape(shape)                              # a view of the mapped file
        # The one copy renaming needs: q, k, v stored apart become one fused tensor (and halves are swapped).
        out = empty_cpu(shape, views[0].dtype)
        row = 0
        for v in views:
            out[row: row + v.shape[0]].copy_(v.reshape(v.shape[0], *shape[1:]))
            row += v.shape[0]
        for name in self.source_names(key):
            self.source.release(name)
        return out

    def release(self, key: str) -> None:
        for name in self.source_names(key):
            self.source.release(name)


def to_ours(source, rules: list[Rename], what: str) -> RenamedCheckpoint:
    """`source` (named as the rules' `theirs`) seen under our names. Source names no rule knows keep their name
    (check_keys then reports them as unexpected); a tensor whose pieces are not all there is an error."""
    parts, shapes, pending = {}, {}, {}
    for name in source.keys():
        for rule in rules:
            fields = rule.match_theirs(name)
            if fields is not None:
                pending.setdefault(rule.ours.format(**fields), (rule, fields))
                break
        else:
            parts[name], shapes[name] = [(name, None, None)], source.shape(name)
    for ours, (rule, fields) in pending.items():
        pieces = rule.pieces(fields)
        missing = [n for n, _, _ in pieces if n not in source]
        if missing:
            raise CheckpointError(f"{source.path}: {', '.join(missing)} missing ({what}: "
                                  f"{' + '.join(dict.fromkeys(n for n, _, _ in pieces))} make our {ours}). "
                                  "The file is incomplete or not this model.")
        ranges = []
        for n, chunk, chunks in pieces:
            rows = source.shape(n)[0] // chunks
            ranges.append((n, chunk * rows, (chunk + 1) * rows))
        first = source.shape(pieces[0][0])
        rest = tuple(first[1:]) + ((1, 1) if rule.conv1x1 else ())
        if any(tuple(source.shape(n)[1:]) != tuple(first[1:]) for n, _, _ in pieces):
            raise CheckpointError(f"{source.path}: {', '.join(n for n, _, _ in pieces)} differ in shape beyond "
                                  f"dim 0: they cannot form our {ours} ({what}).")
        parts[ours] = ranges
        shapes[ours] = (sum(stop - start for _, start, stop in ranges), *rest)
    return RenamedCheckpoint(source, parts, shapes, what)


def count_indexed(names, pattern: str, prefix: str = "") -> int:
    """1 + the largest N that `pattern` (one group, the index) captures at the start of a name under `prefix`,
    or 0: how many blocks or levels another layout's names say a model has."""
    found = {int(m.group(1)) for n in names if n.startswith(prefix) and (m := re.match(pattern, n[len(prefix):]))}
    return max(found) + 1 if found else 0


def to_theirs(source, rules: list[Rename], what: str, prefix: str = "") -> RenamedCheckpoint:
    """The inverse of `to_ours`: our tensors (keys `prefix + name` in `source`) under the rules' `theirs` names
    (for writing a diffusers folder). A name no rule knows is an error: writing must be complete."""
    parts: dict[str, list] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key in source.keys():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        rule, fields = next(((r, f) for r in rules if (f := r.match_ours(name)) is not None), (None, None))
        if rule is None:
            raise CheckpointError(f"{source.path}: no {what} name for {key!r}: is this the right file?")
        shape = source.shape(key)
        pieces = rule.pieces(fields)
        rows = shape[0] // len(pieces)
        rest = tuple(shape[1:-2]) if rule.conv1x1 else tuple(shape[1:])
        for i, (theirs, chunk, chunks) in enumerate(pieces):
            parts.setdefault(theirs, [None] * chunks)[chunk] = (key, i * rows, (i + 1) * rows)
            shapes[theirs] = (rows * chunks, *rest)
    return RenamedCheckpoint(source, parts, shapes, what)


def write_safetensors_sharded(
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    folder: str | os.PathLike,
    base: str = "diffusion_pytorch_model",
    max_shard_bytes: int = 10 * 10**9,
) -> list[Path]:
    """Write tensors as diffusers/transformers do: `base.safetensors` when they fit in one shard of
    `max_shard_bytes`, else `base-0000i-of-0000n.safetensors` plus `base.safetensors.index.json`
    ({"metadata": {"total_size"}, "weight_map": {key: shard}}). Keys go to shards in sorted order."""
    folder = Path(folder)
    shards: list[list[str]] = [[]]
    size = total = 0
    for key in sorted(specs):
        shape, dtype = specs[key]
        n = _itemsize(dtype) * int(torch.Size(shape).numel())
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
        total += n
    if len(shards) == 1:
        write_safetensors_streaming(specs, produce, folder / f"{base}.safetensors", {"format": "pt"})
        return [folder / f"{base}.safetensors"]
    names = [f"{base}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        write_safetensors_streaming({k: specs[k] for k in keys}, produce, folder / name, {"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
    (folder / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names] + [folder / f"{base}.safetensors.index.json"]
