"""A validating, mmap-based reader for GGUF v2/v3 files.

GGUF files come from anywhere, so every count, length, type id, dimension and offset is checked against
the file's size and against sane limits *before* it is used: a hostile or truncated file fails at once with
a one-line `GGUFError` instead of an allocation of 2**63 elements, a `struct.error` or a crash later on.
That is why this is not `gguf.GGUFReader`, which trusts the counts it reads and builds numpy views of
everything up front. Metadata becomes plain Python values; tensor data is never copied: `raw()` returns a
zero-copy uint8 view on the memory map.

`GGUFFile(path, arrays="skip")` is the fast header read for `ember ls`/`show` and the memory estimator: arrays
longer than SMALL_ARRAY (a 150 000-token vocabulary) are walked and bounds-checked but not decoded, and
become `ArrayInfo(item_type, count)`. This module never imports torch itself (only `raw()` does), so listing
models stays fast.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from gguf import GGML_QUANT_SIZES

from ember.errors import GGUFError
from ember.formats.ggml_types import GGMLType  # re-exported: TensorInfo.ggml_type is one of these

if TYPE_CHECKING:
    import torch

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_KEY_BYTES = 65535  # metadata keys and tensor names
MAX_STRING_BYTES = 16 * 2**20  # one string value
MAX_ARRAY_LEN = 16 * 2**20  # elements of one array (a 256k-token vocabulary fits easily)
MAX_ARRAY_DEPTH = 2  # an array of arrays, no deeper
MAX_DIMS = 4
MAX_ELEMENTS = 2**40  # per tensor
SMALL_ARRAY = 64  # with arrays="skip", arrays up to this length are still decoded

# (elements per block, bytes per block), keyed by plain int type id.
_BLOCK_SIZES: dict[int, tuple[int, int]] = {int(k): v for k, v in GGML_QUANT_SIZES.items()}

# GGUF metadata value type ids.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALAR_FORMATS = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i", _FLOAT32: "<f",
    _BOOL: "<B", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}
_SCALARS = {t: struct.Struct(f) for t, f in _SCALAR_FORMATS.items()}
_DTYPES = {t: np.dtype(f) for t, f in _SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata kv count

# The fewest bytes one entry can take, to bound counts by the file size before looping.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset
_MIN_ELEMENT_BYTES = {**{t: s.size for t, s in _SCALARS.items()}, _STRING: 8, _ARRAY: 4 + 8}



def has_gguf_magic(path: str | Path) -> bool:
    """Whether a file starts like a GGUF file (by content, not name: Ollama's blobs are named by digest)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False

@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array read with arrays="skip": its element type id and length, not its values."""

    item_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF's ne reversed
    ggml_type: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Parser:
    """A bounds-checked cursor over the mapped file; every failure is a GGUFError naming the file."""

    def __init__(self, buf: mmap.mmap, size: int, pos: int, filename: str, skip_arrays: bool = False):
        self.buf, self.size, self.pos, self.filename = buf, size, pos, filename
        self.skip_arrays = skip_arrays

    def error(self, reason: str) -> GGUFError:
        return GGUFError(f"{self.filename}: {reason}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.error(f"truncated file: {what} runs past the end of the file")

    def u32(self, what: str) -> int:
        self.need(4, what)
        value = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        value = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def string(self, what: str, limit: int) -> str:
        n = self.u64(f"{what} length")
        if n > limit:
            raise self.error(f"{what} is {n} bytes long, over the limit of {limit}")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> object:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            self.need(scalar.size, f"value of {key!r}")
            value = scalar.unpack_from(self.buf, self.pos)[0]
            self.pos += scalar.size
            if vtype == _BOOL:
                if value > 1:
                    raise self.error(f"metadata {key!r}: bool value {value} is neither 0 nor 1")
                return bool(value)
            return value
        if vtype == _STRING:
            return self.string(f"string value of {key!r}", MAX_STRING_BYTES)
        if vtype == _ARRAY:
            return self.array(key, 1)
        raise self.error(f"metadata {key!r}: unknown value type {vtype}")

    def array(self, key: str, depth: int) -> list | ArrayInfo:
        if depth > MAX_ARRAY_DEPTH:
            raise self.error(f"metadata {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
        etype = self.u32(f"array type of {key!r}")
        count = self.u64(f"array length of {key!r}")
        if etype not in _MIN_ELEMENT_BYTES:
            raise self.error(f"metadata {key!r}: unknown array element type {etype}")
        if count > MAX_ARRAY_LEN:
            raise self.error(f"metadata {key!r}: array of {count} elements, over the limit of {MAX_ARRAY_LEN}")
        self.need(count * _MIN_ELEMENT_BYTES[etype], f"array {key!r}")
        if count == 0:
            return []
        if self.skip_arrays and count > SMALL_ARRAY:
            return self._skip(key, etype, count, depth)
        if etype == _STRING:
            return self._strings(key, count)
        if etype == _ARRAY:
            return [self.array(key, depth + 1) for _ in range(count)]
        dtype = _DTYPES[etype]
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        if etype == _BOOL:
            if values.max() > 1:
                raise self.error(f"metadata {key!r}: bool array holds a value other than 0 or 1")
            values = values.astype(bool)
        return values.tolist()

    def _skip(self, key: str, etype: int, count: int, depth: int) -> ArrayInfo:
        """Step over an array with the same bounds checks as decoding it (strings are not UTF-8-checked)."""
        if etype == _STRING:
            buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
            for _ in range(count):
                if pos + 8 > size:
                    raise self.error(f"truncated file: array {key!r} runs past the end of the file")
                n = unpack(buf, pos)[0]
                if n > MAX_STRING_BYTES:
                    raise self.error(f"metadata {key!r}: a string of {n} bytes, over the limit of {MAX_STRING_BYTES}")
                pos += 8 + n
                if pos > size:
                    raise self.error(f"truncated file: array {key!r} runs past the end of the file")
            self.pos = pos
        elif etype == _ARRAY:
            for _ in range(count):
                self.array(key, depth + 1)
        else:
            itemsize = _DTYPES[etype].itemsize
            if etype == _BOOL and np.frombuffer(self.buf, dtype=np.uint8, count=count, offset=self.pos).max() > 1:
                raise self.error(f"metadata {key!r}: bool array holds a value other than 0 or 1")
            self.pos += count * itemsize  # in bounds: checked by the caller's need()
        return ArrayInfo(etype, count)

    def _strings(self, key: str, count: int) -> list[str]:
        # The hot loop for vocabularies (150k+ tokens): locals only, one unpack and one decode per string.
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > size:
                    raise self.error(f"truncated file: array {key!r} runs past the end of the file")
                n = unpack(buf, pos)[0]
                pos += 8
                if n > MAX_STRING_BYTES:
                    raise self.error(f"metadata {key!r}: a string of {n} bytes, over the limit of {MAX_STRING_BYTES}")
                if pos + n > size:
                    raise self.error(f"truncated file: array {key!r} runs past the end of the file")
                append(buf[pos:pos + n].decode("utf-8"))
                pos += n
        except UnicodeDecodeError:
            raise self.error(f"metadata {key!r}: string {len(out)} is not valid UTF-8") from None
        self.pos = pos
        return out


class GGUFFile:
    """An open GGUF file: `version`, `metadata`, `tensors` (file order) and zero-copy `raw(name)`.

    arrays="decode" (loading a model) turns every metadata array into a list; arrays="skip" (listing and
    estimating) leaves arrays longer than SMALL_ARRAY as `ArrayInfo`. Every other check is the same.
    """

    def __init__(self, path: str | Path, arrays: Literal["decode", "skip"] = "decode"):
        if arrays not in ("decode", "skip"):
            raise ValueError(f"arrays must be 'decode' or 'skip', not {arrays!r}")
        self.path = Path(path)
        self._skip_arrays = arrays == "skip"
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        try:
            with open(self.path, "rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(0)
                head = fh.read(_HEADER.size)
                if len(head) >= 4 and head[:4] != MAGIC:
                    raise self._error(f"not a GGUF file (magic {head[:4]!r}, expected {MAGIC!r})")
                if len(head) < _HEADER.size:
                    raise self._error(f"file is {size} bytes, shorter than the {_HEADER.size}-byte GGUF header")
                _, version, n_tensors, n_kv = _HEADER.unpack(head)
                if version not in SUPPORTED_VERSIONS:
                    if int.from_bytes(head[4:8], "big") in SUPPORTED_VERSIONS:
                        raise self._error("big-endian GGUF files are not supported")
                    raise self._error(f"unsupported GGUF version {version} (ember reads versions 2 and 3)")
                # ACCESS_COPY (a private mapping) so torch.frombuffer gets a writable buffer without a
                # warning; nothing ever writes to it, and a stray write could never reach the file.
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise self._error(f"cannot read the file ({e.strerror or e})") from None
        self.version = version
        try:
            self._parse(size, n_tensors, n_kv)
        except GGUFError:
            self.close()
            raise
        except (struct.error, ValueError, OverflowError, IndexError, MemoryError) as e:  # a missed check
            self.close()
            raise self._error(f"malformed file ({type(e).__name__}: {e})") from None
        self._view = memoryview(self._mm)

    def _error(self, reason: str) -> GGUFError:
        return GGUFError(f"{self.path.name}: {reason}")

    def _parse(self, size: int, n_tensors: int, n_kv: int) -> None:
        p = _Parser(self._mm, size, _HEADER.size, self.path.name, self._skip_arrays)
        remaining = size - _HEADER.size
        if n_kv * _MIN_KV_BYTES > remaining:
            raise self._error(f"metadata kv count {n_kv} cannot fit in a file of {size} bytes")
        if n_tensors * _MIN_TENSOR_BYTES > remaining - n_kv * _MIN_KV_BYTES:
            raise self._error(f"tensor count {n_tensors} cannot fit in a file of {size} bytes")

        self.metadata: dict[str, object] = {}
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = p.string("metadata key", MAX_KEY_BYTES)
            if not key:
                raise self._error("empty metadata key")
            if key in self.metadata:
                raise self._error(f"duplicate metadata key {key!r}")
            vtype = p.u32(f"value type of {key!r}")
            self.metadata[key] = value = p.value(vtype, key)
            if key == "general.alignment":
                if vtype != _UINT32:
                    raise self._error("general.alignment must be a uint32")
                if value == 0 or value & (value - 1):
                    raise self._error(f"general.alignment {value} is not a power of two")
                alignment = value

        self.tensors: dict[str, TensorInfo] = {}
        relative: list[int] = []
        for _ in range(n_tensors):
            name = p.string("tensor name", MAX_KEY_BYTES)
            if not name:
                raise self._error("empty tensor name")
            if name in self.tensors:
                raise self._error(f"duplicate tensor name {name!r}")
            n_dims = p.u32(f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._error(f"tensor {name!r} has {n_dims} dimensions (expected 1 to {MAX_DIMS})")
            ne = [p.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
            n_elements = 1
            for d in ne:
                if d == 0 or d >= 2**63:
                    raise self._error(f"tensor {name!r} has an invalid dimension {d}")
                n_elements *= d
                if n_elements > MAX_ELEMENTS:
                    raise self._error(f"tensor {name!r} has more than {MAX_ELEMENTS} elements")
            type_id = p.u32(f"type of tensor {name!r}")
            try:
                ggml_type = GGMLType(type_id)
            except ValueError:
                raise self._error(f"tensor {name!r} has unknown ggml type {type_id}") from None
            if type_id not in _BLOCK_SIZES:
                raise self._error(f"tensor {name!r} has type {ggml_type.name} with no known block size")
            block, block_bytes = _BLOCK_SIZES[type_id]
            if ne[0] % block:
                raise self._error(f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                                  f"{ggml_type.name} block size {block}")
            offset = p.u64(f"data offset of tensor {name!r}")
            if offset % alignment:
                raise self._error(f"tensor {name!r}: data offset {offset} is not a multiple of the alignment {alignment}")
            relative.append(offset)
            self.tensors[name] = TensorInfo(name, tuple(reversed(ne)), ggml_type, offset,
                                            n_elements // block * block_bytes)

        data_start = -(-p.pos // alignment) * alignment
        self.data_offset = data_start
        for info, offset in zip(list(self.tensors.values()), relative, strict=True):
            start = data_start + offset
            if start + info.nbytes > size:
                raise self._error(f"tensor {info.name!r}: data ({info.nbytes} bytes at {start}) runs past the "
                                  f"end of the file ({size} bytes)")
            self.tensors[info.name] = TensorInfo(info.name, info.shape, info.ggml_type, start, info.nbytes)
        end, previous = 0, None
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            if info.offset < end:
                raise self._error(f"tensors {previous!r} and {info.name!r} have overlapping data")
            end, previous = info.offset + info.nbytes, info.name

    # ---- what `ember ls`/`show` and the memory estimator read ----

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_key(self, name: str, default: Any = None) -> Any:
        """`{architecture}.{name}` from the metadata (e.g. "context_length")."""
        return self.metadata.get(f"{self.architecture}.{name}", default)

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def quant(self) -> str:
        """The declared file type (Q4_K_M, ...), else the most common type among matrices."""
        import gguf

        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int) and not isinstance(file_type, bool):
            try:
                return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
            except ValueError:
                pass
        types = Counter(t.type_name for t in self.tensors.values() if len(t.shape) > 1)
        return types.most_common(1)[0][0] if types else "unknown"

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a 1-D uint8 tensor: a zero-copy view on the map.

        Read-only by contract: never write to it (the mapping is private, so a write would not reach the
        file, but it would corrupt what every other view of these bytes sees).
        """
        info = self.tensors.get(name)
        if info is None:
            raise self._error(f"no tensor named {name!r}")
        if self._view is None:
            raise self._error("file is closed")
        import torch

        return torch.frombuffer(self._view[info.offset:info.offset + info.nbytes], dtype=torch.uint8)

    def release(self, name: str) -> None:
        """Tell the kernel a tensor's pages are not needed now (after they were copied or repacked).

        Safe even if a view is still used: the mapping is private and never written, so a later read just
        pages the bytes in from the file again.
        """
        info = self.tensors[name]
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = -(-info.offset // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside this tensor only
        end = (info.offset + info.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Release the map; tensors from `raw()` that are still alive keep their pages until they are freed."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views from raw() still exist: the map goes when the last one does
                pass
            self._mm = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, tensors={len(self.tensors)})"


def read_header(path: str | Path) -> GGUFFile:
    """A GGUF file's header only (arrays="skip"), closed again: metadata, tensor infos and the summary
    properties, for `ember ls`/`show` and the memory estimator. GGUFError when the file is not a valid GGUF."""
    with GGUFFile(path, arrays="skip") as f:
        return f
