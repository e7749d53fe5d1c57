"""The safetensors reader against hostile files: spec violations are CheckpointErrors naming file and key, a fuzzed
header never raises anything else, and NaN/inf weights are found by check_finite."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmditx import load_mmditx
from mmditx.checkpoint import CheckpointError, SafetensorsFile, parse_header, save_safetensors
from mmditx.config import MMDiTXConfig
from mmditx.model import MMDiTX

VALID = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
         "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
         "__metadata__": {"format": "pt"}}
DATA = 32


def write(path, header, data: bytes = bytes(DATA)):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(dtype="F32", shape=(2, 3), offsets=(0, 24)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header,message", [
    ({"a": entry(offsets=(-8, 16))}, "'a' has data_offsets"),                  # negative: would read the header
    ({"a": entry(shape=(2.0, 3))}, "'a' has shape"),                            # float dimension
    ({"a": entry(shape=(2, -3), offsets=(0, 0))}, "'a' has shape"),             # negative dimension
    ({"a": entry(shape=(True, 3), offsets=(0, 12))}, "'a' has shape"),          # bool is not a dimension
    ({"a": entry(offsets=(24, 0))}, "begin after end"),
    ({"a": entry(), "b": entry(offsets=(8, 32))}, "overlap"),
    ({"a": entry(offsets=(0, 20))}, "'a' has 20 bytes of data but its shape"),
    ({"a": entry(dtype="F31")}, "'a' has dtype 'F31'"),
    ({"a": entry(dtype=7)}, "'a' has dtype"),
    ({"a": {"dtype": "F32", "shape": [6]}}, "'a' is not {dtype, shape, data_offsets}"),
    ({"a": [1, 2]}, "'a' is not {dtype, shape, data_offsets}"),
    ({"a": entry(offsets=(0, 48), shape=(12,))}, "truncated file: tensor 'a'"),
    ({"__metadata__": {"x": 1}}, "__metadata__ is not an object of strings"),
    ([1, 2], "not a JSON object"),
])
def test_spec_violations_name_file_and_key(tmp_path, header, message):
    path = write(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match="bad.safetensors") as e:
        SafetensorsFile(path)
    assert message in str(e.value)


def test_deeply_nested_header(tmp_path):
    path = write(tmp_path / "deep.safetensors", b"[" * 100000 + b"]" * 100000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        SafetensorsFile(path)


def test_valid_header_reads(tmp_path):
    f = SafetensorsFile(write(tmp_path / "ok.safetensors", VALID))
    assert f.shape("a") == (2, 3) and f.dtype("b") == torch.float16 and f.metadata == {"format": "pt"}
    assert f.tensor("a").shape == (2, 3)


def _json_values():
    return st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                        max_leaves=12)


def _check_parsed(raw: bytes, data_size: int):
    """parse_header may only raise CheckpointError; what it accepts stays inside the data and never overlaps."""
    try:
        _, entries = parse_header(raw, data_size, "fuzz.safetensors")
    except CheckpointError:
        return
    spans = sorted((b, e) for _, _, b, e in entries.values() if e > b)
    for (b0, e0), (b1, e1) in zip(spans, spans[1:]):
        assert e0 <= b1
    assert all(0 <= b <= e <= data_size for b, e in spans)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(0, 64))
def test_fuzz_random_bytes(raw, data_size):
    _check_parsed(raw, data_size)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["a", "b", "__metadata__", "new"]), st.sampled_from([None, "dtype", "shape", "data_offsets"]),
       _json_values(), st.integers(0, 64))
def test_fuzz_mutated_header(key, field, value, data_size):
    header = json.loads(json.dumps(VALID))
    if field is None or not isinstance(header.get(key), dict):
        header[key] = value
    else:
        header[key][field] = value
    try:
        raw = json.dumps(header).encode()
    except ValueError:
        return
    _check_parsed(raw, data_size)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255))
def test_fuzz_byte_flips(position, byte):
    raw = bytearray(json.dumps(VALID).encode())
    raw[position % len(raw)] = byte
    _check_parsed(bytes(raw), DATA)


def test_fuzzed_file_tensors_stay_in_bounds(tmp_path):
    """What the reader accepts, it can also read: every accepted tensor comes from the data section."""
    header = {"a": entry(dtype="F32", shape=(0, 5), offsets=(0, 0)), "b": entry(dtype="U8", shape=(32,),
                                                                                offsets=(0, 32))}
    f = SafetensorsFile(write(tmp_path / "ok.safetensors", header, data=bytes(range(32))))
    assert f.tensor("a").shape == (0, 5)
    assert f.tensor("b").tolist() == list(range(32))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = MMDiTXConfig(hidden_size=64, depth=2, pos_embed_max_size=8, context_dim=32, pooled_dim=16)
    state = {"model.diffusion_model." + k: v for k, v in MMDiTX(config).state_dict().items()}
    return tmp_path_factory.mktemp("ckpt"), state


def test_float_weight_labelled_integer(tiny_checkpoint):
    tmp, state = tiny_checkpoint
    key = "model.diffusion_model.final_layer.linear.bias"
    bad = {**state, key: state[key].view(torch.int32)}
    save_safetensors(bad, tmp / "int.safetensors")
    with pytest.raises(CheckpointError, match=rf"int\.safetensors: tensor '{key}' is stored as I32 but this weight "
                                              "must be floating-point"):
        load_mmditx(tmp / "int.safetensors")


def test_wrong_rank_names_key(tiny_checkpoint):
    tmp, state = tiny_checkpoint
    key = "model.diffusion_model.x_embedder.proj.weight"
    save_safetensors({**state, key: state[key].reshape(state[key].shape[0], -1)}, tmp / "rank.safetensors")
    with pytest.raises(CheckpointError, match=r"rank\.safetensors: 'x_embedder.proj.weight' has shape \[64, 64\]; an "
                                              "MMDiT-X transformer has 4 positive dimensions"):
        load_mmditx(tmp / "rank.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_names_the_tensor(tiny_checkpoint, bad):
    tmp, state = tiny_checkpoint
    key = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"
    broken = state[key].clone()
    broken[0, 3] = bad
    save_safetensors({**state, key: broken.half()}, tmp / "nan.safetensors")
    load_mmditx(tmp / "nan.safetensors")  # not scanned: loads (the pipeline's finite checks catch it later)
    with pytest.raises(CheckpointError, match=rf"nan\.safetensors: tensor '{key}' holds 1 NaN/inf value"):
        load_mmditx(tmp / "nan.safetensors", check_finite=True)
