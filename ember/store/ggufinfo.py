"""A fast, bounded read of a GGUF file's header: metadata (long arrays only counted) and tensor infos.

`ember ls`/`show` and the memory estimator need a GGUF's architecture, quantization, tensor types and
sizes, never its weights nor its 150 000-entry vocabulary, so this skips over arrays instead of decoding them
(gguf.GGUFReader decodes them all: seconds per file). Every length is checked against the file's size.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import GGUFError

MAX_KV = 1 << 20
MAX_TENSORS = 1 << 20
MAX_DIMS = 8
MAX_ARRAY_DEPTH = 2  # an array of arrays, no deeper
SMALL_ARRAY = 64  # arrays up to this length are kept; longer ones become ArrayInfo
# GGUF value types: fixed-size scalars by id
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array, not decoded: its element type id and length."""

    item_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first)
    type_name: str  # "Q4_K", "F16", ...
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFSummary:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_key(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{name}", default)

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def quant(self) -> str:
        """The declared file type (Q4_K_M, ...), else the most common type among matrices."""
        import gguf

        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int):
            try:
                return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
            except ValueError:
                pass
        types = Counter(t.type_name for t in self.tensors if len(t.shape) > 1)
        return types.most_common(1)[0][0] if types else "unknown"


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated or malformed GGUF header")

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, limit: int = 1 << 26) -> str:
        n = self.unpack("<Q")
        if n > limit:
            raise GGUFError(f"{self.path}: string of {n} bytes in the GGUF header")
        self.need(n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q")
        self.need(n)
        self.pos += n

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(f"{self.path}: arrays nested too deeply in the GGUF header")
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            if count > len(self.buf):
                raise GGUFError(f"{self.path}: array of {count} items in the GGUF header")
            if count <= SMALL_ARRAY and item_type != _ARRAY:
                return [self.value(item_type, depth + 1) for _ in range(count)]
            if item_type in _SCALARS:
                size = struct.calcsize(_SCALARS[item_type]) * count
                self.need(size)
                self.pos += size
            elif item_type == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(item_type, depth + 1)
            return ArrayInfo(item_type, count)
        raise GGUFError(f"{self.path}: unknown GGUF value type {vtype}")


def read_gguf_summary(path: str | Path) -> GGUFSummary:
    """Header of a GGUF file; GGUFError for anything that is not a well-formed GGUF (v2/v3) header."""
    import gguf

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < 24:
                raise GGUFError(f"{path}: not a GGUF file (too short)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, gguf)
    except OSError as err:
        raise GGUFError(f"{path}: cannot read ({err.strerror or err})") from None


def _parse(buf, path: Path, gguf) -> GGUFSummary:
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version}")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise GGUFError(f"{path}: implausible GGUF counts ({n_tensors} tensors, {n_kv} keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string(limit=1 << 16)
        metadata[key] = cur.value(cur.unpack("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = cur.string(limit=1 << 16)
        n_dims = cur.unpack("<I")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        type_id = cur.unpack("<I")
        cur.unpack("<Q")  # offset
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {name!r} has unknown type {type_id}") from None
        n = 1
        for d in dims:
            n *= d
        tensors.append(TensorInfo(name, tuple(reversed(dims)), qtype.name, n // block * type_size))
    return GGUFSummary(path, version, metadata, tensors)
