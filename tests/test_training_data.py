"""Image folders, buckets, problem reports and the latent/text caches."""

import json

import pytest
import torch
from PIL import Image

import encoders
import vae as vae_lib
from sampling.embedded import embedded_model_dir
from sampling.pipeline import ModelFiles
from training.cache import CacheOptions, CachedDataset, build_cache
from training.data import DataError, closest_bucket, load_crop, make_buckets, scan_folder
from training.example import make_example_data


def test_buckets_are_multiples_of_64_around_the_area():
    buckets = make_buckets(512 * 512, max_ratio=2.0)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 0.5 <= w / h <= 2
        assert (w + 64) * h > 512 * 512 or w * (h + 64) > 512 * 512  # as large as the area allows
    b = closest_bucket((1000, 500), buckets)
    assert abs(b[0] / b[1] - 2) == min(abs(w / h - 2) for w, h in buckets)
    assert closest_bucket((300, 300), buckets) == (512, 512)


def test_kohya_folder_and_problem_report(tmp_path):
    make_example_data(tmp_path, count=4, size=96)
    (tmp_path / "000.txt").unlink()                                   # missing caption
    (tmp_path / "broken.png").write_bytes(b"not a png")               # unreadable
    (tmp_path / "broken.txt").write_text("x")
    Image.new("RGB", (32, 32)).save(tmp_path / "tiny.png")             # smaller than every bucket
    (tmp_path / "tiny.txt").write_text("x")
    examples, report = scan_folder(tmp_path, resolution=64, on_error="skip")
    assert [e.image.name for e in examples] == ["001.png", "002.png", "003.png"]
    assert examples[0].caption.startswith("a ") and examples[0].bucket == (64, 64)
    summary = report.summary()
    assert "1 images without a caption" in summary and "000.png" in summary
    assert "1 unreadable images: broken.png" in summary and "tiny.png" in summary
    with pytest.raises(DataError, match="unreadable images: broken.png"):
        scan_folder(tmp_path, resolution=64, on_error="stop")


def test_metadata_jsonl(tmp_path):
    make_example_data(tmp_path, count=2, size=64)
    for p in tmp_path.glob("*.txt"):
        p.unlink()
    rows = [{"file_name": "000.png", "text": "first"}, {"file_name": "001.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    examples, report = scan_folder(tmp_path, resolution=64)
    assert [e.caption for e in examples] == ["first", "second"] and not report


def test_crop_and_flip(tmp_path):
    im = Image.new("RGB", (128, 64))
    im.putpixel((0, 0), (255, 0, 0))
    im.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("c")
    (ex,), _ = scan_folder(tmp_path, resolution=64, max_ratio=1.0)
    assert ex.bucket == (64, 64)
    center = load_crop(ex)                      # the middle 64 columns: the red pixel is cut off
    assert center.size == (64, 64) and center.getpixel((0, 0)) == (0, 0, 0)
    flipped = load_crop(ex, flip=True)
    assert flipped.tobytes() == center.transpose(Image.FLIP_LEFT_RIGHT).tobytes()


def test_cache_matches_encoders_is_reused_and_invalidated(tmp_path):
    data = make_example_data(tmp_path / "data", count=3, size=64)
    (data / "002.txt").write_text((data / "000.txt").read_text())     # two images share a caption
    examples, _ = scan_folder(data, resolution=64)
    files = ModelFiles.from_dir(embedded_model_dir())
    messages = []
    folder = build_cache(examples, files, tmp_path / "run", CacheOptions(flip=True), log=messages.append)
    ds = CachedDataset(folder)
    assert len(ds) == 3 and len(ds.index["captions"]) == 3            # once per unique caption, and ""
    x0, context, pooled = ds.batch([0, 2], [False, True])
    assert x0.dtype == torch.float16 and x0.shape == (2, 16, 8, 8)
    # the cached values are the encoders' outputs (within fp16 rounding)
    text = encoders.TextConditioner.from_model_dir(embedded_model_dir())
    ref_context, ref_pooled = text.encode([examples[0].caption])
    assert torch.allclose(context[0].float(), ref_context[0], rtol=1e-2, atol=1e-2)
    assert torch.equal(context[0], context[1]) and torch.allclose(pooled[0].float(), ref_pooled[0], rtol=1e-2, atol=1e-2)
    ae = vae_lib.load_vae(files.model)
    ref_latent = ae.encode(vae_lib.image_to_tensor(load_crop(examples[2], flip=True)), sample=False)
    assert torch.allclose(x0[1].float(), ref_latent[0], rtol=1e-2, atol=1e-2)
    # same inputs: reused; a changed caption: a new cache
    assert build_cache(examples, files, tmp_path / "run", CacheOptions(flip=True), log=messages.append) == folder
    assert "reusing" in messages[-1]
    (data / "001.txt").write_text("something else")
    examples2, _ = scan_folder(data, resolution=64)
    assert build_cache(examples2, files, tmp_path / "run", CacheOptions(flip=True), log=messages.append) != folder
