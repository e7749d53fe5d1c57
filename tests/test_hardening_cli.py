"""Hostile but realistic input to the scripts: every bad value, file, device or place ends as a one-line error
(no traceback, no PNG, nothing overwritten), non-finite numbers never become a black image, and --reproduce
checks what it reads and restores what changes pixels.

Most cases call the scripts' `main` (the same code, error boundary included, as `python scripts/X.py`) in this
process, which is fast; the cases about the process itself (argv bytes, tracebacks) run the real script."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmditx.checkpoint import SafetensorsFile, save_safetensors
from sampling.io import read_png_params, save_png
from sampling.samplers import SAMPLERS
from tests.test_generate_cli import random_weights

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--steps", "2", "--width", "64", "--height", "64", "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from sampling import embedded

    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MMDITX_CACHE")
    os.environ["MMDITX_CACHE"] = str(root)
    embedded.embedded_model_dir()
    yield root
    if old is None:
        del os.environ["MMDITX_CACHE"]
    else:
        os.environ["MMDITX_CACHE"] = old


def generate(capsys, *args):
    from scripts.generate import main

    try:
        rc = main(random_weights(args))
    except SystemExit as e:   # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc, err, message):
    assert rc not in (0, None), err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert message in last, err
    return last


def model_copy(cache, tmp_path, edit_model=None, edit_tokenizer=None):
    """A model directory sharing the embedded set's files, with the main checkpoint or a tokenizer changed."""
    from sampling.embedded import cache_dir

    src = cache_dir()
    dst = tmp_path / "models"
    dst.mkdir()
    for name in ("text_encoders", "tokenizer_2", "tokenizer_3"):
        (dst / name).symlink_to(src / name)
    tok = dst / "tokenizer"
    tok.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tok / name).write_bytes((src / "tokenizer" / name).read_bytes())
    if edit_tokenizer:
        edit_tokenizer(tok)
    if edit_model is None:
        (dst / "sd3.5_medium.safetensors").symlink_to(src / "sd3.5_medium.safetensors")
    else:
        f = SafetensorsFile(src / "sd3.5_medium.safetensors")
        state = {k: f.tensor(k).clone() for k in f.keys()}
        edit_model(state)
        save_safetensors(state, dst / "sd3.5_medium.safetensors")
    return dst


# -- values checked where they are read, before anything loads ------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--cfg", "nan"], "cfg is NaN; expected a finite number"),
    (["--cfg", "1e30"], "cfg is 1e+30; it must be >= 0.0 and <= 100.0"),
    (["--shift", "inf"], "shift is Infinity; expected a finite number"),
    (["--shift", "1e-30"], "shift is 1e-30; it must be >= 0.01"),
    (["--steps", "1000000000"], "steps is 1000000000; it must be >= 1 and <= 1000"),
    (["--steps", "0"], "steps is 0; it must be >= 1"),
    (["--seed", "-1"], "seed is -1; it must be >= 0"),
    (["--width", "0"], "width is 0; it must be >= 16"),
    (["--num-images", "1000000"], "--num-images must be between 1 and 10000"),
    (["--num-images", "0"], "--num-images must be between 1 and 10000"),
    (["--batch-size", "0"], "--batch-size must be between 1 and 64"),
    (["--denoise", "0", "--init-image", "x.png"], "denoise is 0.0; it must be > 0.0"),
    (["--device", "banana"], "unknown device 'banana'"),
    (["--device", "cuda"], "device 'cuda' is not available on this machine"),
    (["--width", "100"], "width 100 is not a positive multiple of 16"),
    (["--height", "2048"], "height 2048 is larger than the positional table allows: at most 1024"),
    (["--slg", "--prompt", "y", "--cfg", "2"], None),   # control: valid values pass these checks (see below)
])
def test_bad_values_fail_before_loading(cache, capsys, tmp_path, monkeypatch, args, message):
    if message is None:   # a valid command reaches loading: the checks above are not just refusing everything
        from sampling import pipeline
        monkeypatch.setattr(pipeline.Pipeline, "__init__", lambda *a, **k: (_ for _ in ()).throw(
            RuntimeError("reached loading")))
        rc, _, err = generate(capsys, "--out", tmp_path / "o", *args)
        assert rc == 1 and "reached loading" in err
        return
    rc, _, err = generate(capsys, "--prompt", "x", "--out", tmp_path / "o", *args)
    one_line_error(rc, err, message)
    assert "model sd3.5_medium" not in err          # nothing was loaded
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# -- non-finite numbers: a clear error naming the stage, never a black PNG -----------------------------------

def _poison(key):
    def edit(state):
        state[key].view(-1)[0] = float("nan")
    return edit


@pytest.mark.parametrize("key,stage", [
    ("model.diffusion_model.joint_blocks.3.x_block.mlp.fc2.weight", "sampling step 1/2"),
    ("first_stage_model.decoder.conv_out.weight", "decoding image 1 (seed 0) with the VAE"),
])
def test_nan_weight_names_stage_and_writes_nothing(cache, capsys, tmp_path, key, stage):
    models = model_copy(cache, tmp_path, edit_model=_poison(key))
    out = tmp_path / "o"
    rc, _, err = generate(capsys, "--model-dir", models, "--prompt", "x", "--out", out, *SMALL)
    one_line_error(rc, err, f"{stage}")
    assert "non-finite value(s)" in err and "--check-weights" in err
    assert list(out.iterdir()) == []                  # no black image, no partial file
    rc, _, err = generate(capsys, "--model-dir", models, "--prompt", "x", "--out", out, "--check-weights", *SMALL)
    one_line_error(rc, err, f"tensor '{key}' holds 1 NaN/inf value(s)")


# -- --out: checked before loading; PNGs appear whole or not at all -------------------------------------------

def test_out_under_a_file_or_nowhere_fails_first(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file" / "sub", "is a file, not a directory"),
                         ("/proc/no/such/dir", "cannot write in /proc/no/such/dir"),
                         (tmp_path, "directory named like a .png"),):
        if out == tmp_path:
            (tmp_path / "d.png").mkdir()
            out = tmp_path / "d.png"
        rc, _, err = generate(capsys, "--prompt", "x", "--out", out, *SMALL)
        one_line_error(rc, err, message)
        assert "model sd3.5_medium" not in err


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    image = Image.new("RGB", (64, 64))
    real_save = Image.Image.save

    def full_disk(self, fp, *a, **k):
        fp.write(b"\x89PNG half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_png(image, tmp_path / "000000.png", {"prompt": "x"})
    assert list(tmp_path.iterdir()) == []             # neither the name nor the temporary file remains
    monkeypatch.setattr(Image.Image, "save", real_save)
    (tmp_path / ".000000.png.999.partial").write_bytes(b"stale")   # a killed run's temporary file
    assert save_png(image, tmp_path / "000000.png", {"prompt": "x"}) == tmp_path / "000000.png"
    assert save_png(image, tmp_path / "000000.png", {"prompt": "x"}) == tmp_path / "000000_1.png"


@pytest.mark.parametrize("error,message,expected", [
    (OSError(28, "No space left on device", "/x/000000.png"),
     "/x/000000.png: No space left on device: free some space or write elsewhere (--out)", True),
    (PermissionError(13, "Permission denied", "/x"), "/x: Permission denied: check the permissions", True),
    (torch.OutOfMemoryError("CUDA out of memory"), "out of memory: use a smaller size, --batch-size 1", True),
    (RuntimeError("CUDA error: an illegal memory access"), "device error: CUDA error", True),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
     "a file is not valid UTF-8 text at byte 0 (invalid start byte)", True),
    (KeyError("x"), "KeyError: 'x'", False),              # a bug of ours: reported as internal, asking for a report
])
def test_error_boundary_messages(error, message, expected):
    from scripts.errors import describe

    got, is_expected = describe(error)
    assert got.startswith(message) and is_expected == expected


# -- --reproduce: checked metadata, everything that changes pixels restored -----------------------------------

def _png_with(tmp_path, text):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("mmditx", text)
    path = tmp_path / "meta.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


GOOD = {"prompt": "p", "negative_prompt": "", "width": 64, "height": 64, "steps": 2, "cfg": 5.0, "shift": 3.0,
        "sampler": "euler", "seed": 1, "slg": False}


@pytest.mark.parametrize("meta,message", [
    ("{not json", "the mmditx metadata is not valid JSON"),
    ("[1, 2]", "the mmditx metadata is not a JSON object"),
    ({**GOOD, "width": "64"}, 'width is "64"; expected an integer'),
    ({**GOOD, "seed": "abc"}, 'seed is "abc"; expected an integer'),
    ({**GOOD, "slg": "false"}, 'slg is "false"; expected true or false'),
    ({**GOOD, "steps": 2.5}, "steps is 2.5; expected an integer"),
    ({**GOOD, "cfg": 1e300}, "cfg is 1e+300; it must be"),
    ({**GOOD, "slg_layers": [7, "8"]}, "slg_layers is"),
    ({**GOOD, "sampler": "ddim"}, f"sampler is 'ddim'; it must be one of {', '.join(sorted(SAMPLERS))}"),
    ({**GOOD, "t5": "fp4"}, "t5 is 'fp4'; it must be one of fp16, fp8, off"),
    ({k: v for k, v in GOOD.items() if k != "sampler"}, "required parameter(s) sampler missing"),
    ({**GOOD, "init_image": "/dev/stdin", "denoise": 0.5}, "was made image-to-image from '/dev/stdin'"),
])
def test_reproduce_rejects_bad_metadata(capsys, tmp_path, meta, message):
    png = _png_with(tmp_path, meta if isinstance(meta, str) else json.dumps(meta))
    rc, _, err = generate(capsys, "--reproduce", png, "--out", tmp_path / "o")
    line = one_line_error(rc, err, message)
    assert "meta.png" in line


def test_reproduce_not_an_image(capsys, tmp_path):
    (tmp_path / "x.png").write_bytes(b"GIF89a nonsense")
    rc, _, err = generate(capsys, "--reproduce", tmp_path / "x.png", "--out", tmp_path / "o")
    one_line_error(rc, err, "not a readable image")
    rc, _, err = generate(capsys, "--reproduce", tmp_path / "missing.png", "--out", tmp_path / "o")
    one_line_error(rc, err, "not a file")


def test_reproduce_restores_t5_mode_and_dtype(cache, capsys, tmp_path):
    out = tmp_path / "o"
    rc, stdout, _ = generate(capsys, "--prompt", "a red cube", "--t5", "fp8", "--sampler", "euler_ancestral",
                             "--seed", "3", "--out", out, *SMALL)
    first = Path(stdout.split()[-1])
    meta = read_png_params(first)
    assert rc == 0 and meta["t5"] == "fp8" and meta["dtype"] == "fp32" and meta["device"] == "cpu"
    rc, stdout, err = generate(capsys, "--reproduce", first, "--out", out, "--quiet")
    second = Path(stdout.split()[-1])
    assert rc == 0 and "T5 fp8" in err and second != first
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    assert read_png_params(second) == meta


# -- prompts, init images, tokenizers, cache: OS and decoding errors as one line ------------------------------

@pytest.mark.parametrize("content,message", [
    (None, "prompt file"),                                            # missing
    ("dir", "is not a regular file"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "is a binary file"),
    ("a red cube\n".encode("utf-16"), "is UTF-16 text: save it as UTF-8"),
    (b"a red cube \xff\xfe\xfa\n", "is not valid UTF-8 (byte 11)"),
    (b"\n  \n", "no prompts"),
])
def test_prompt_files(capsys, tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    rc, _, err = generate(capsys, "--prompt-file", path, "--out", tmp_path / "o", *SMALL)
    one_line_error(rc, err, message)


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(_png_header(100000, 100000)), "too large"),    # a decompression bomb
    (lambda p: p.write_bytes(_png_header(12000, 12000)), "too large"),      # over the limit, under PIL's error
    (lambda p: p.write_bytes(b"not an image"), "cannot read the init image"),
    (lambda p: os.mkfifo(p), "not found or not a regular file"),             # would hang if opened
])
def test_bad_init_images(cache, capsys, tmp_path, make, message):
    path = tmp_path / "init.png"
    make(path)
    rc, _, err = generate(capsys, "--prompt", "x", "--init-image", path, "--out", tmp_path / "o", *SMALL)
    one_line_error(rc, err, message)
    assert "model sd3.5_medium" not in err          # checked from the header, before loading


def _vocab_edit(change):
    def edit(folder):
        vocab = json.loads((folder / "vocab.json").read_text())
        result = change(vocab, folder)
        if result is not None:
            (folder / "vocab.json").write_text(json.dumps(result))
    return edit


@pytest.mark.parametrize("edit,message", [
    (_vocab_edit(lambda v, f: list(v)), "not a CLIP vocabulary (ValueError: a JSON list, not an object)"),
    (_vocab_edit(lambda v, f: {k: str(i) for k, i in v.items()}), "has id '0', not a non-negative integer"),
    (lambda f: (f / "merges.txt").write_text("#version: 0.2\nzz qq\n"), "cannot read the BPE merges"),
    (_vocab_edit(lambda v, f: {**v, "<|endoftext|>": 60000}), "has token ids up to 60000, but the CLIP-L text "
                                                               "encoder embeds only 514"),
])
def test_broken_tokenizer_files(cache, capsys, tmp_path, edit, message):
    models = model_copy(cache, tmp_path, edit_tokenizer=edit)
    rc, _, err = generate(capsys, "--model-dir", models, "--prompt", "x", "--out", tmp_path / "o", *SMALL)
    one_line_error(rc, err, message)


def test_unwritable_cache(capsys, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MMDITX_CACHE", str(tmp_path / "file" / "cache"))
    rc, _, err = generate(capsys, "--prompt", "x", "--out", tmp_path / "o", *SMALL)
    one_line_error(rc, err, "cannot create the model cache")
    assert "set MMDITX_CACHE to a writable directory" in err


# -- the real scripts, as processes: argv bytes, --debug, inspect and compare --------------------------------

def run(script, *args, env_cache=None):
    env = {"PATH": "/usr/bin:/bin", "MMDITX_CACHE": str(env_cache or "/nonexistent")}
    if script == "generate.py":
        args = random_weights(args)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, env=env,
                          cwd=ROOT)


def test_prompt_with_invalid_utf8_bytes(cache, tmp_path):
    out = run("generate.py", b"--prompt", b"a cat \xff\xfe", "--out", str(tmp_path), env_cache=cache)
    err = out.stderr.decode()
    one_line_error(out.returncode, err, "--prompt is not valid UTF-8 text")


def test_debug_shows_the_traceback(cache, tmp_path):
    out = run("generate.py", "--device", "banana", "--debug", "--out", str(tmp_path), env_cache=cache)
    err = out.stderr.decode()
    assert out.returncode == 1 and "Traceback" in err and err.strip().endswith("use cpu, cuda, cuda:N or mps")


def in_process(module, args, capsys):
    """scripts/MODULE.py's main inside the same error boundary as `python scripts/MODULE.py`: (status, stderr)."""
    import importlib

    from scripts.errors import run_cli

    main = importlib.import_module(f"scripts.{module}").main
    try:
        rc = run_cli(main, args)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["tiny", "--resolution", "0"], "each side must be a multiple of 16"),
    (["tiny", "--batch", "-2"], "-2 is out of range: it must be >= 1"),
    (["tiny", "--steps", "x"], "'x' is not an integer"),
])
def test_inspect_bad_arguments(capsys, args, message):
    rc, err = in_process("inspect_model", args, capsys)
    assert rc == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["dtype", "--random", "tiny", "--size", "0"], "0 is out of range: it must be >= 16"),
    (["dtype", "--random", "tiny", "--size", "72"], "is not a multiple of 16"),
    (["dtype", "--checkpoint", "/no/such.safetensors"], "/no/such.safetensors: no such file"),
    (["dtype", "--random", "tiny", "--b", "fp12"], "unknown dtype 'fp12'"),
])
def test_compare_bad_arguments(capsys, args, message):
    rc, err = in_process("compare", args, capsys)
    assert rc in (1, 2) and message in err and "Traceback" not in err
