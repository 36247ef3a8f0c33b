"""ember.formats.gguf: a validating GGUF reader, checked on hand-corrupted files, on files written by the
PyPI `gguf` writer, and against `gguf.GGUFReader` on every shared test file."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ember.errors import GGUFError
from ember.formats import gguf as reader_module
from ember.formats.gguf import GGMLType, GGUFFile
from ember.quant.ggml import GGMLType as QuantGGMLType

# GGUF metadata value type ids.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
        U64: "<Q", I64: "<q", F64: "<d"}


# ---- a small struct-based GGUF writer, so each test can corrupt exactly one field ----

def gstr(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def value_bytes(vtype: int, value) -> bytes:
    """`value` for ARR is (element_type, list); nested arrays are (ARR, [(etype, list), ...])."""
    if vtype in _FMT:
        return struct.pack(_FMT[vtype], value)
    if vtype == STR:
        return gstr(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(value_bytes(etype, v) for v in items)
    raise AssertionError(vtype)


def kv(key: str | bytes, vtype: int, value) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + value_bytes(vtype, value)


def tensor_info(name: str | bytes, ne, ggml_type: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack(
        "<IQ", ggml_type, offset)


def nbytes_of(ne, ggml_type: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return int(np.prod(ne)) // block * size


def write_gguf(path: Path, kvs=(), tensors=(), *, version=3, alignment=None, magic=b"GGUF", n_kv=None,
               n_tensors=None, data: bytes | None = None, truncate: int | None = None) -> Path:
    """kvs: encoded kv entries (see `kv`); tensors: (name, ne, type, offset) tuples or raw bytes.

    alignment adds a uint32 `general.alignment`; the data section (zeros unless `data`) follows the header
    padded to the alignment. n_kv / n_tensors override the header counts; truncate cuts the file.
    """
    kvs = list(kvs)
    if alignment is not None:
        kvs.append(kv("general.alignment", U32, alignment))
    infos = [t if isinstance(t, bytes) else tensor_info(*t) for t in tensors]
    header = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head = header + b"".join(kvs) + b"".join(infos)
    align = alignment or 32
    head += b"\0" * (-len(head) % align)
    if data is None:
        end = max((t[3] + nbytes_of(t[1], t[2]) for t in tensors if not isinstance(t, bytes)), default=0)
        data = bytes(end)
    blob = head + data
    path.write_bytes(blob if truncate is None else blob[:truncate])
    return path


def expect_error(path: Path, match: str) -> GGUFError:
    with pytest.raises(GGUFError, match=match) as err:
        GGUFFile(path)
    assert str(err.value).startswith(f"{path.name}: ")
    return err.value


# ---- header ----

def test_bad_magic(tmp_path):
    expect_error(write_gguf(tmp_path / "m.gguf", magic=b"GGML"), "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 2**31])
def test_unsupported_version(tmp_path, version):
    expect_error(write_gguf(tmp_path / "v.gguf", version=version), f"unsupported GGUF version {version}")


def test_big_endian_rejected(tmp_path):
    path = tmp_path / "be.gguf"
    path.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    expect_error(path, "big-endian")


@pytest.mark.parametrize("size", [0, 3, 4, 23])
def test_shorter_than_header(tmp_path, size):
    path = tmp_path / "short.gguf"
    path.write_bytes((b"GGUF" + struct.pack("<IQQ", 3, 0, 0))[:size])
    expect_error(path, "shorter than the 24-byte GGUF header")


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="cannot read the file"):
        GGUFFile(tmp_path / "absent.gguf")


@pytest.mark.parametrize("count", [2**63, 2**64 - 1, 10**6])
def test_huge_kv_count_fails_at_once(tmp_path, count):
    expect_error(write_gguf(tmp_path / "kv.gguf", [kv("a", U8, 1)], n_kv=count), "kv count .* cannot fit")


@pytest.mark.parametrize("count", [2**63, 2**64 - 1, 10**6])
def test_huge_tensor_count_fails_at_once(tmp_path, count):
    expect_error(write_gguf(tmp_path / "t.gguf", n_tensors=count), "tensor count .* cannot fit")


# ---- truncation ----

def test_string_length_past_eof(tmp_path):
    path = write_gguf(tmp_path / "s.gguf", [gstr("k") + struct.pack("<IQ", STR, 1000) + b"x" * 20])
    expect_error(path, "truncated file: string value of 'k'")


def test_key_length_past_eof(tmp_path):
    path = write_gguf(tmp_path / "k.gguf", [struct.pack("<Q", 5000) + b"key" * 5])
    expect_error(path, "truncated file: metadata key")


def test_array_past_eof(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", [gstr("arr") + struct.pack("<IIQ", ARR, U32, 1000) + bytes(40)])
    expect_error(path, "truncated file: array 'arr'")


def test_string_array_past_eof(tmp_path):
    body = kv("toks", ARR, (STR, ["a", "b", "c"]))
    path = write_gguf(tmp_path / "a.gguf", [body], truncate=24 + len(body) - 1)
    expect_error(path, "truncated file: array 'toks'")


def test_tensor_infos_past_eof(tmp_path):
    info = tensor_info("w", [32, 4], GGMLType.F32, 0)
    path = write_gguf(tmp_path / "t.gguf", [kv("general.name", STR, "x" * 40)], [info], truncate=24 + 72 + 9 + 4 + 12)
    expect_error(path, "truncated file: .*tensor 'w'")


def test_every_truncation_is_a_gguf_error(tmp_path):
    path = write_gguf(tmp_path / "full.gguf", [kv("general.name", STR, "tiny"), kv("v", ARR, (F32, [1.0, 2.0]))],
                      [("a", [32], GGMLType.F32, 0), ("b", [64, 2], GGMLType.Q8_0, 128)])
    GGUFFile(path).close()
    blob = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in range(len(blob)):
        cut.write_bytes(blob[:size])
        with pytest.raises(GGUFError):
            GGUFFile(cut)


def test_skipped_arrays_are_checked_too(tmp_path):
    """arrays="skip" (ember ls/show, the estimator) steps over long arrays with the same bounds checks."""
    long = [kv("tokenizer.ggml.tokens", ARR, (STR, [f"t{i}" for i in range(100)])),
            kv("scores", ARR, (F32, [0.5] * 100)), kv("flags", ARR, (BOOL, [1] * 100)),
            kv("nested", ARR, (ARR, [(U8, [1] * 70)] * 70)), kv("short", ARR, (U16, [7] * 64))]
    path = write_gguf(tmp_path / "full.gguf", long, [("a", [32], GGMLType.F32, 0)])
    with GGUFFile(path, arrays="skip") as f:
        assert f.metadata["tokenizer.ggml.tokens"] == reader_module.ArrayInfo(STR, 100)
        assert f.metadata["scores"] == reader_module.ArrayInfo(F32, 100)
        assert f.metadata["nested"] == reader_module.ArrayInfo(ARR, 70)
        assert f.metadata["short"] == [7] * 64 and f.tensors["a"].nbytes == 128
    blob = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in range(0, len(blob), 7):
        cut.write_bytes(blob[:size])
        with pytest.raises(GGUFError):
            GGUFFile(cut, arrays="skip")
    bad_bool = write_gguf(tmp_path / "b.gguf", [kv("flags", ARR, (BOOL, [1] * 99 + [2]))])
    with pytest.raises(GGUFError, match="bool array holds a value other than 0 or 1"):
        GGUFFile(bad_bool, arrays="skip")
    long_string = write_gguf(tmp_path / "s.gguf", [gstr("k") + struct.pack("<IIQ", ARR, STR, 100)
                                                    + struct.pack("<Q", 2**24 + 1) + bytes(2**24 + 1)])
    with pytest.raises(GGUFError, match="a string of 16777217 bytes, over the limit"):
        GGUFFile(long_string, arrays="skip")


def test_random_corruption_never_escapes(tmp_path):
    path = write_gguf(tmp_path / "full.gguf",
                      [kv("general.name", STR, "tiny"), kv("toks", ARR, (STR, ["a", "bb"])), kv("f", BOOL, 1)],
                      [("a", [32], GGMLType.F32, 0), ("b", [64, 2], GGMLType.Q8_0, 128)])
    blob = bytearray(path.read_bytes())
    rng = random.Random(0)
    bad = tmp_path / "bad.gguf"
    for _ in range(400):
        mutated = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(4, 200)] = rng.randrange(256)
        bad.write_bytes(mutated)
        try:
            GGUFFile(bad).close()
        except GGUFError:
            pass


# ---- limits and metadata validation ----

def test_key_too_long(tmp_path):
    expect_error(write_gguf(tmp_path / "k.gguf", [kv("k" * 65536, U8, 1)]), "metadata key is 65536 bytes long")
    with GGUFFile(write_gguf(tmp_path / "ok.gguf", [kv("k" * 65535, U8, 1)])) as f:
        assert f.metadata["k" * 65535] == 1


def test_empty_key(tmp_path):
    expect_error(write_gguf(tmp_path / "k.gguf", [kv("", U8, 1)]), "empty metadata key")


def test_string_value_too_long(tmp_path):
    path = write_gguf(tmp_path / "s.gguf", [gstr("k") + struct.pack("<IQ", STR, 16 * 2**20 + 1) + b"x"])
    expect_error(path, "string value of 'k' is 16777217 bytes long")


def test_string_in_array_too_long(tmp_path):
    path = write_gguf(tmp_path / "s.gguf", [gstr("k") + struct.pack("<IIQQ", ARR, STR, 1, 2**63) + b"x" * 8])
    expect_error(path, "string of .* bytes, over the limit")


def test_array_too_long(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", [gstr("k") + struct.pack("<IIQ", ARR, U8, 2**24 + 1) + b"x"])
    expect_error(path, "array of 16777217 elements, over the limit")


def test_vocabulary_of_256k_tokens_passes(tmp_path):
    tokens = [f"tok{i}" for i in range(256_000)]
    with GGUFFile(write_gguf(tmp_path / "v.gguf", [kv("tokenizer.ggml.tokens", ARR, (STR, tokens))])) as f:
        assert f.metadata["tokenizer.ggml.tokens"] == tokens


@pytest.mark.parametrize("kind", ["key", "value", "array"])
def test_invalid_utf8(tmp_path, kind):
    bad = b"ok\xff\xfe"
    entry = {"key": kv(bad, U8, 1), "value": kv("k", STR, bad), "array": kv("k", ARR, (STR, ["a", bad]))}[kind]
    expect_error(write_gguf(tmp_path / "u.gguf", [entry]), "not valid UTF-8")


@pytest.mark.parametrize("vtype", [13, 255, 2**32 - 1])
def test_unknown_value_type(tmp_path, vtype):
    path = write_gguf(tmp_path / "t.gguf", [gstr("k") + struct.pack("<I", vtype) + bytes(16)])
    expect_error(path, f"unknown value type {vtype}")


def test_unknown_array_element_type(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", [gstr("k") + struct.pack("<IIQ", ARR, 13, 1) + bytes(16)])
    expect_error(path, "unknown array element type 13")


def test_array_nesting_depth(tmp_path):
    ok = kv("k", ARR, (ARR, [(U8, [1, 2]), (STR, ["x"]), (U8, [])]))
    with GGUFFile(write_gguf(tmp_path / "ok.gguf", [ok])) as f:
        assert f.metadata["k"] == [[1, 2], ["x"], []]
    deep = kv("k", ARR, (ARR, [(ARR, [(U8, [1])])]))
    expect_error(write_gguf(tmp_path / "deep.gguf", [deep]), "nested deeper than 2")


def test_bool_must_be_0_or_1(tmp_path):
    expect_error(write_gguf(tmp_path / "b.gguf", [kv("k", BOOL, 2)]), "bool value 2 is neither 0 nor 1")
    expect_error(write_gguf(tmp_path / "ba.gguf", [kv("k", ARR, (BOOL, [0, 1, 7]))]), "bool array")


def test_duplicate_key(tmp_path):
    expect_error(write_gguf(tmp_path / "d.gguf", [kv("a", U8, 1), kv("a", U32, 2)]), "duplicate metadata key 'a'")


def test_all_value_types_round_trip(tmp_path):
    scalars = {"u8": (U8, 255), "i8": (I8, -128), "u16": (U16, 65535), "i16": (I16, -32768), "u32": (U32, 2**32 - 1),
               "i32": (I32, -(2**31)), "f32": (F32, 0.5), "bool": (BOOL, 1), "str": (STR, "héllo ✓"),
               "u64": (U64, 2**64 - 1), "i64": (I64, -(2**63)), "f64": (F64, 1e300)}
    arrays = {f"arr.{k}": (ARR, (t, [v, v])) for k, (t, v) in scalars.items()}
    entries = {**scalars, **arrays, "arr.nested": (ARR, (ARR, [(I32, [1, -2]), (F64, [0.25])]))}
    with GGUFFile(write_gguf(tmp_path / "all.gguf", [kv(k, t, v) for k, (t, v) in entries.items()])) as f:
        assert f.version == 3 and f.tensors == {}
        expected = {k: bool(v) if t == BOOL else v for k, (t, v) in scalars.items()}
        expected |= {f"arr.{k}": [v, v] for k, v in expected.items()}
        expected["arr.nested"] = [[1, -2], [0.25]]
        assert f.metadata == expected
        assert list(f.metadata) == list(entries)
        assert type(f.metadata["bool"]) is bool and type(f.metadata["arr.bool"][0]) is bool
        assert all(type(v) is int for v in f.metadata["arr.u64"])


def test_version_2_reads(tmp_path):
    with GGUFFile(write_gguf(tmp_path / "v2.gguf", [kv("a", U8, 1)], [("w", [32], 0, 0)], version=2)) as f:
        assert f.version == 2 and f.metadata == {"a": 1} and f.tensors["w"].shape == (32,)


# ---- tensor infos ----

def test_duplicate_tensor_name(tmp_path):
    path = write_gguf(tmp_path / "d.gguf", tensors=[("w", [32], 0, 0), ("w", [32], 0, 128)])
    expect_error(path, "duplicate tensor name 'w'")


@pytest.mark.parametrize("name, match", [("", "empty tensor name"), ("n" * 65536, "tensor name is 65536 bytes")])
def test_bad_tensor_name(tmp_path, name, match):
    expect_error(write_gguf(tmp_path / "n.gguf", tensors=[(name, [32], 0, 0)]), match)


@pytest.mark.parametrize("ne", [[], [1, 1, 1, 1, 1]])
def test_bad_dimension_count(tmp_path, ne):
    expect_error(write_gguf(tmp_path / "n.gguf", tensors=[tensor_info("w", ne, 0, 0)], data=bytes(64)),
                 f"has {len(ne)} dimensions")


@pytest.mark.parametrize("ne, match", [
    ([32, 0], "invalid dimension 0"),
    ([2**64 - 32], "invalid dimension"),  # -32 as a signed int64
    ([2**63], "invalid dimension"),
    ([2**20, 2**21], "more than 1099511627776 elements"),
    ([2**32, 2**32, 2**32, 2**32], "more than 1099511627776 elements"),  # wraps to 0 in uint64
])
def test_bad_dimensions(tmp_path, ne, match):
    expect_error(write_gguf(tmp_path / "d.gguf", tensors=[tensor_info("w", ne, 0, 0)], data=bytes(64)), match)


def test_row_not_a_multiple_of_block(tmp_path):
    path = write_gguf(tmp_path / "b.gguf", tensors=[tensor_info("w", [33, 2], GGMLType.Q8_0, 0)], data=bytes(128))
    expect_error(path, "row length 33 is not a multiple of the Q8_0 block size 32")


@pytest.mark.parametrize("type_id", [4, 5, 31, 99, 2**32 - 1])
def test_unknown_ggml_type(tmp_path, type_id):
    path = write_gguf(tmp_path / "t.gguf", tensors=[tensor_info("w", [32], type_id, 0)], data=bytes(128))
    expect_error(path, f"unknown ggml type {type_id}")


def test_type_without_block_size(tmp_path, monkeypatch):
    monkeypatch.delitem(reader_module._BLOCK_SIZES, int(GGMLType.IQ1_M))
    path = write_gguf(tmp_path / "t.gguf", tensors=[tensor_info("w", [256], GGMLType.IQ1_M, 0)], data=bytes(256))
    expect_error(path, "type IQ1_M with no known block size")


# ---- alignment, offsets, data ranges ----

@pytest.mark.parametrize("alignment", [0, 3, 48, 2**31 + 1])
def test_bad_alignment(tmp_path, alignment):
    expect_error(write_gguf(tmp_path / "a.gguf", [kv("general.alignment", U32, alignment)]),
                 f"general.alignment {alignment} is not a power of two")


def test_alignment_must_be_uint32(tmp_path):
    expect_error(write_gguf(tmp_path / "a.gguf", [kv("general.alignment", U64, 32)]), "must be a uint32")


def test_custom_alignment_sets_data_start(tmp_path):
    data = bytes(range(256)) * 2
    path = write_gguf(tmp_path / "a.gguf", [kv("general.name", STR, "x")],
                      [("a", [4], GGMLType.F32, 0), ("b", [8], GGMLType.I8, 256)], alignment=256, data=data)
    with GGUFFile(path) as f:
        assert f.data_offset == 256  # header is < 256 bytes
        assert f.tensors["a"].offset == 256 and f.tensors["b"].offset == 512
        assert f.raw("a").tolist() == list(data[:16]) and f.raw("b").tolist() == list(data[256:264])


def test_offset_not_aligned(tmp_path):
    path = write_gguf(tmp_path / "o.gguf", tensors=[("w", [4], GGMLType.F32, 16)])
    expect_error(path, "data offset 16 is not a multiple of the alignment 32")


def test_data_past_end_of_file(tmp_path):
    path = write_gguf(tmp_path / "e.gguf", tensors=[("w", [64], GGMLType.F32, 0)], data=bytes(255))
    expect_error(path, "tensor 'w': data .* runs past the end of the file")
    path = write_gguf(tmp_path / "far.gguf", tensors=[("w", [64], GGMLType.F32, 2**64 - 32)], data=bytes(256))
    expect_error(path, "runs past the end of the file")


def test_overlapping_tensors(tmp_path):
    path = write_gguf(tmp_path / "o.gguf", tensors=[("a", [32], 0, 0), ("b", [8], 0, 256), ("c", [32], 0, 224)])
    expect_error(path, "tensors 'c' and 'b' have overlapping data")


def test_shapes_offsets_nbytes(tmp_path):
    tensors = [("tok", [64, 3], GGMLType.Q8_0, 0), ("norm", [5], GGMLType.F16, 224), ("k", [256, 2], GGMLType.Q4_K, 256)]
    path = write_gguf(tmp_path / "s.gguf", [kv("a", U8, 1)], tensors)
    with GGUFFile(path) as f:
        assert list(f.tensors) == ["tok", "norm", "k"]
        tok, norm, k = f.tensors.values()
        assert (tok.shape, tok.ggml_type, tok.nbytes) == ((3, 64), GGMLType.Q8_0, 3 * 2 * 34)
        assert (norm.shape, norm.nbytes) == ((5,), 10) and k.nbytes == 2 * 144 and k.shape == (2, 256)
        assert tok.offset == f.data_offset and k.offset == f.data_offset + 256
        assert f.data_offset % 32 == 0 and tok.ggml_type is QuantGGMLType.Q8_0  # the one enum ember uses


# ---- raw() and lifetime ----

def test_raw_is_a_zero_copy_view_and_close(tmp_path):
    data = np.arange(64, dtype=np.float32).tobytes()
    path = write_gguf(tmp_path / "r.gguf", tensors=[("w", [4, 4], GGMLType.F32, 0), ("v", [32], 0, 64)], data=data + bytes(128))
    f = GGUFFile(path)
    w = f.raw("w")
    assert w.dtype == torch.uint8 and w.shape == (64,) and w.view(torch.float32).tolist() == list(range(16))
    assert f.raw("w").data_ptr() == w.data_ptr()
    assert f.raw("v").data_ptr() == w.data_ptr() + 64
    with pytest.raises(GGUFError, match="no tensor named 'x'"):
        f.raw("x")
    f.close()
    assert w.view(torch.float32)[3].item() == 3.0  # a live view keeps its pages
    with pytest.raises(GGUFError, match="closed"):
        f.raw("w")
    f.close()
    with GGUFFile(path) as g:
        g.raw("w")
    with pytest.raises(GGUFError, match="closed"):
        g.raw("w")


# ---- files written by the PyPI gguf writer, and real files, against gguf.GGUFReader ----

def test_gguf_writer_round_trip(tmp_path):
    path = tmp_path / "w.gguf"
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 8), dtype=np.float32)
    q8 = rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8)  # 4 rows of 64 Q8_0 values
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_string("general.name", "round trip")
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "héllo", "✓", ""])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0, 0.0])
    writer.add_array("nested", [[1, 2, 3], [4]])
    writer.add_tensor("a.weight", f32)
    writer.add_tensor("b.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ref = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        assert f.metadata == {"general.architecture": "llama", "general.name": "round trip", "llama.block_count": 2,
                              "llama.rope.freq_base": 10000.0, "tokenizer.ggml.add_bos_token": True,
                              "tokenizer.ggml.tokens": ["<s>", "héllo", "✓", ""],
                              "tokenizer.ggml.scores": [0.5, -1.25, 3.0, 0.0], "nested": [[1, 2, 3], [4]]}
        a, b = f.tensors["a.weight"], f.tensors["b.weight"]
        assert (a.shape, a.ggml_type, b.shape, b.ggml_type) == ((3, 8), GGMLType.F32, (4, 64), GGMLType.Q8_0)
        assert np.array_equal(f.raw("a.weight").view(torch.float32).view(3, 8).numpy(), f32)
        for t in ref.tensors:
            assert t.data_offset == f.tensors[t.name].offset
            assert f.raw(t.name).numpy().tobytes() == np.asarray(t.data).tobytes()


def _shared_files(testdata: Path) -> list[Path]:
    # gguf.GGUFReader takes seconds per large vocabulary, so compare the models and two small vocabularies.
    files = sorted((testdata / "gguf").glob("*.gguf")) + [
        testdata / "vocab" / "ggml-vocab-llama-spm.gguf", testdata / "vocab" / "ggml-vocab-bert-bge.gguf"]
    assert files
    return files


def test_real_files_match_gguf_reader(testdata):
    for path in _shared_files(testdata):
        ref = gguf.GGUFReader(path)
        with GGUFFile(path) as f:
            assert f.version == ref.fields["GGUF.version"].contents()
            assert list(f.tensors) == [t.name for t in ref.tensors]
            for t in ref.tensors:
                info = f.tensors[t.name]
                assert info.shape == tuple(int(d) for d in reversed(t.shape))
                assert info.ggml_type == int(t.tensor_type) and info.offset == t.data_offset
                assert info.nbytes == t.n_bytes
            assert f.tensors or not ref.tensors
            if f.tensors:  # spot-check data of the first and last tensors
                for t in (ref.tensors[0], ref.tensors[-1]):
                    assert f.raw(t.name).numpy().tobytes() == np.asarray(t.data).tobytes()
            keys = [k for k in ref.fields if not k.startswith("GGUF.")]
            assert list(f.metadata) == keys
            for key in keys:
                field = ref.fields[key]
                if field.types[0] != gguf.GGUFValueType.ARRAY:
                    assert f.metadata[key] == field.contents(), (path.name, key)
            assert f.metadata["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()


def test_real_152k_vocab_reads(testdata):
    with GGUFFile(testdata / "vocab" / "ggml-vocab-qwen2.gguf") as f:
        assert len(f.metadata["tokenizer.ggml.tokens"]) > 150_000


def test_150k_vocab_metadata_reads(tmp_path):
    n = 150_000
    tokens = [f"▁token{i}" for i in range(n)]
    entries = [
        kv("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        gstr("tokenizer.ggml.scores") + struct.pack("<IIQ", ARR, F32, n) + np.arange(n, dtype="<f4").tobytes(),
        gstr("tokenizer.ggml.token_type") + struct.pack("<IIQ", ARR, I32, n) + np.ones(n, dtype="<i4").tobytes(),
    ]
    path = write_gguf(tmp_path / "vocab.gguf", entries)
    with GGUFFile(path) as f:
        meta = f.metadata
    assert meta["tokenizer.ggml.tokens"] == tokens
    assert meta["tokenizer.ggml.scores"][-1] == n - 1 and meta["tokenizer.ggml.token_type"][:2] == [1, 1]
