"""SentencePiece's precompiled normalization (`tokenizer.ggml.precompiled_charsmap`), applied as llama.cpp applies it.

The charsmap is a little-endian u32 size, that many bytes of XOR-compressed double-array trie (each u32 entry
packs BASE, LCHECK and LEAF), then NUL-terminated replacement strings. llama.cpp scans the UTF-8 text left to
right and replaces the longest key starting at each position by its replacement (`llm_tokenizer_ugm`'s
`normalize_prefix`). `tokenizers`' own `normalizers.Precompiled` looks keys up per grapheme instead, which
drops combining marks after a mapped character ("Ａ\u0301" becomes "A") and leaves decomposed kana apart, so
ember applies the table itself:

- keys of one character (NFKC's mappings: full-width forms, ligatures, tabs and newlines to spaces, ...) go
  through `str.translate`;
- keys of several characters (a base character plus combining marks, composed as NFC does) all continue with
  one of a small set of characters (the marks): a text without any of those takes the fast path above, one
  with them is scanned key by key exactly as llama.cpp scans it.

The whole trie is walked once when the vocabulary is loaded (about 0.8 s for XLM-R's), so a malformed table
(an index outside the array, which llama.cpp stops on when a text reaches it; a replacement outside the
strings or without its NUL) is refused then, with a TokenizerError.
"""

from __future__ import annotations

import re

import numpy as np

from ember.errors import TokenizerError

_KEY = "tokenizer.ggml.precompiled_charsmap"
_MAX_KEY_BYTES = 64  # the XLM-R table's longest key is 4 characters; deeper paths mean a corrupt table
_BLOCK = 4096  # trie nodes expanded at once (x 255 possible bytes each)


class CharsMap:
    def __init__(self, charsmap: bytes):
        if len(charsmap) < 4:
            raise TokenizerError(f"{_KEY} is too short to hold its size header")
        trie_size = int.from_bytes(charsmap[:4], "little")
        if trie_size % 4 or trie_size + 4 >= len(charsmap):
            raise TokenizerError(f"{_KEY}: its trie size {trie_size} does not fit the {len(charsmap)} bytes given")
        packed = np.frombuffer(charsmap, dtype="<u4", count=trie_size // 4, offset=4).astype(np.int64)
        self._replacements = charsmap[4 + trie_size:]
        self._base = (packed >> 10) << ((packed & (1 << 9)) >> 6)
        self._lcheck = packed & ((1 << 31) | 0xFF)
        self._leaf = ((packed >> 8) & 1).astype(bool)
        self._value = packed & ((1 << 31) - 1)
        self._cache: dict[int, bytes] = {}
        self._always_scan = False
        singles, followers = self._walk_all()
        self._translation = str.maketrans(singles)
        # Characters that continue a key of several characters: only texts holding one need the full scan.
        self._needs_scan = re.compile("[" + "".join(re.escape(c) for c in sorted(followers)) + "]") if followers \
            else None

    def _replacement(self, offset: int) -> bytes:
        if offset not in self._cache:
            end = self._replacements.find(b"\0", offset)
            if offset >= len(self._replacements) or end < 0:
                raise TokenizerError(f"{_KEY}: a replacement string lies outside the table or has no end")
            self._cache[offset] = self._replacements[offset:end]
        return self._cache[offset]

    def _walk_all(self) -> tuple[dict[str, str], set[str]]:
        """Every key the trie holds, walked breadth-first the way llama.cpp walks one: the one-character keys
        with their replacements, and the characters that follow the first one in longer keys."""
        size = len(self._base)
        nodes, keys = np.array([self._base[0]], dtype=np.int64), np.zeros((1, 0), dtype=np.uint8)
        singles: dict[str, str] = {}
        followers: set[str] = set()
        for _ in range(_MAX_KEY_BYTES):
            children, labels, parents = self._children(nodes)
            if not len(children):
                return singles, followers
            keys = np.concatenate([keys[parents], labels[:, None].astype(np.uint8)], axis=1)
            nodes = children ^ self._base[children]
            leaves = self._leaf[children]
            if (nodes >= size).any():
                raise TokenizerError(f"{_KEY}: a trie entry points outside the array")
            for row in np.flatnonzero(leaves):
                try:
                    key = keys[row].tobytes().decode("utf-8")
                except UnicodeDecodeError:  # a key ending inside a character: only the byte scan is exact
                    self._always_scan = True
                    continue
                replacement = self._replacement(int(self._value[nodes[row]]))
                if len(key) == 1:
                    singles[key] = replacement.decode("utf-8", errors="replace")
                else:
                    followers.update(key[1:])
        raise TokenizerError(f"{_KEY}: the trie holds keys longer than {_MAX_KEY_BYTES} bytes (a cycle?)")

    def _children(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(child index, byte, parent row) of every edge out of `nodes`, a block of nodes at a time."""
        size = len(self._base)
        byte_values = np.arange(1, 256, dtype=np.int64)
        found = []
        for first in range(0, len(nodes), _BLOCK):
            block = nodes[first:first + _BLOCK]
            children = (block[:, None] ^ byte_values[None, :]).ravel()
            labels = np.tile(byte_values, len(block))
            parents = np.repeat(np.arange(first, first + len(block)), len(byte_values))
            if (children >= size).any():  # llama.cpp stops with an error on reaching such an entry
                raise TokenizerError(f"{_KEY}: a trie entry points outside the array")
            keep = self._lcheck[children] == labels
            found.append((children[keep], labels[keep], parents[keep]))
        return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))

    def normalize(self, text: str) -> str:
        if not self._always_scan and (self._needs_scan is None or not self._needs_scan.search(text)):
            return text.translate(self._translation)
        return self._scan(text.encode("utf-8")).decode("utf-8", errors="replace")

    def _scan(self, data: bytes) -> bytes:
        """llama.cpp's normalize loop: the longest key at each position, else one character unchanged."""
        out = bytearray()
        position = 0
        while position < len(data):
            length, replacement = self._longest_key(data, position)
            if length:
                out += replacement
                position += length
            else:
                step = _utf8_length(data[position])
                out += data[position:position + step]
                position += step
        return bytes(out)

    def _longest_key(self, data: bytes, start: int) -> tuple[int, bytes]:
        # Every index this walk can reach was checked by _walk_all.
        node = int(self._base[0])
        length, offset = 0, -1
        for position in range(start, len(data)):
            byte = data[position]
            node ^= byte
            if byte == 0 or self._lcheck[node] != byte:
                break
            leaf = self._leaf[node]
            node ^= int(self._base[node])
            if leaf:
                length, offset = position - start + 1, int(self._value[node])
        return (length, self._replacement(offset)) if length else (0, b"")


def _utf8_length(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
