"""Seeded mutation fuzzer for the model files ember loads: GGUF (models and vocabulary-only files),
safetensors, config.json and tokenizer.json.

Every mutant must either load and run one token (a GGUF vocabulary: encode and decode) or be refused with an
`EmberError` whose message is one line. Anything else is a finding: another exception type, a crash of the
process (a signal from native code), more than LIMIT_S seconds, or a peak RSS growth above
2 x the mutated file's size (plus a fixed allowance for the tokenizer and engine, see RSS_SLACK). A mutant
over LIMIT_S is slow only if it also takes twice as long as the unmutated file (measured then, in the same
worker): building a 128k-token vocabulary takes seconds on a busy machine whether mutated or not. Likewise
a mutant over the RSS limit is an over-allocation only if it also grows RSS twice as much as the unmutated
file does (a 128k-token vocabulary becomes ~20x its file size in tokenizer structures, mutated or not).

Mutants are made in worker subprocesses, a batch each (one process per mutant would spend its time importing
torch): the worker resets its peak-RSS counter before each mutant (/proc/self/clear_refs), the parent watches
the clock and restarts a worker that crashed or hung, attributing the failure to the mutant it was on.

    python scripts/fuzz_model_files.py --count 2000 --seed 1 [--workers 2] [--json results.json]

tests/test_fuzz_model_files.py runs 200 mutants of the small sources in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTDATA = next((p for p in (ROOT.parent / "shared" / "testdata", ROOT / "shared" / "testdata",
                             Path("/work/shared/testdata")) if p.exists()), ROOT.parent / "shared" / "testdata")
LIMIT_S = 5.0
RSS_RATIO = 2.0
# Building a tokenizer and an engine costs memory that does not scale with the file (Python objects for a
# 32k vocabulary, torch's first matmul workspaces, the KV cache): allowed on top of 2 x the file size.
RSS_SLACK = 96 * 2**20
ADDRESS_SPACE_LIMIT = 8 * 2**30  # per worker


@dataclass(frozen=True)
class Source:
    kind: str  # "gguf-model" | "gguf-vocab" | "safetensors" | "config" | "tokenizer"
    path: Path  # the file mutated (for the last three: inside a checkpoint folder)


def sources(small: bool = False) -> list[Source]:
    """The fixtures mutated; `small` keeps the quick ones (CI)."""
    gguf, vocab, hf = TESTDATA / "gguf", TESTDATA / "vocab", TESTDATA / "gguf" / "tiny-llama-hf"
    out = [Source("gguf-model", ROOT / "ember" / "assets" / "ember-default-bf16.gguf"),
           Source("gguf-model", gguf / "tiny-llama-Q4_0.gguf"),
           Source("gguf-vocab", vocab / "ggml-vocab-llama-spm.gguf"),
           Source("gguf-vocab", vocab / "ggml-vocab-bert-bge.gguf"),
           Source("safetensors", hf / "model.safetensors"),
           Source("config", hf / "config.json"),
           Source("tokenizer", hf / "tokenizer.json")]
    if not small:
        out += [Source("gguf-model", gguf / name) for name in
                ("tiny-llama-Q8_0.gguf", "tiny-llama-Q4_K_M.gguf", "tiny-llama-Q6_K.gguf", "tiny-llama-bf16.gguf")]
        out += [Source("gguf-vocab", p) for p in sorted(vocab.glob("*.gguf"))
                if p.name not in ("ggml-vocab-llama-spm.gguf", "ggml-vocab-bert-bge.gguf")]
    return out


# ---------------------------------------------------------------------------------------------------------
# GGUF layout: where each count, length, type and offset sits, so mutations can aim at them.

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Layout:
    fields: dict[str, list[int]] = field(default_factory=dict)  # kind -> positions of its values
    header_end: int = 0  # end of the tensor infos
    alignment_pos: int | None = None  # position of general.alignment's uint32 value
    kv_end: int = 0  # where the metadata ends (the tensor infos start)


_FIELD_SIZES = {"tensor_count": 8, "kv_count": 8, "key_len": 8, "value_type": 4, "string_len": 8, "array_type": 4,
                "array_len": 8, "name_len": 8, "n_dims": 4, "dim": 8, "ggml_type": 4, "offset": 8,
                "scalar4": 4, "scalar8": 8}


def gguf_layout(data: bytes) -> Layout:
    out = Layout()

    def mark(kind: str, pos: int) -> None:
        out.fields.setdefault(kind, []).append(pos)

    def u32(pos: int) -> int:
        return struct.unpack_from("<I", data, pos)[0]

    def u64(pos: int) -> int:
        return struct.unpack_from("<Q", data, pos)[0]

    def value(vtype: int, pos: int, top: bool = False) -> int:
        if vtype in _SCALAR_SIZES:
            if top and _SCALAR_SIZES[vtype] in (4, 8):  # a count, size or id of the model's metadata
                mark(f"scalar{_SCALAR_SIZES[vtype]}", pos)
            return pos + _SCALAR_SIZES[vtype]
        if vtype == 8:
            mark("string_len", pos)
            return pos + 8 + u64(pos)
        mark("array_type", pos)
        mark("array_len", pos + 4)
        etype, count, pos = u32(pos), u64(pos + 4), pos + 12
        if etype in _SCALAR_SIZES:
            return pos + count * _SCALAR_SIZES[etype]
        for _ in range(count):
            pos = value(etype, pos)
        return pos

    mark("tensor_count", 8)
    mark("kv_count", 16)
    n_tensors, n_kv, pos = u64(8), u64(16), 24
    for _ in range(n_kv):
        mark("key_len", pos)
        key = data[pos + 8:pos + 8 + u64(pos)].decode()
        pos += 8 + u64(pos)
        mark("value_type", pos)
        vtype = u32(pos)
        if key == "general.alignment":
            out.alignment_pos = pos + 4
        pos = value(vtype, pos + 4, top=True)
    out.kv_end = pos
    for _ in range(n_tensors):
        mark("name_len", pos)
        pos += 8 + u64(pos)
        mark("n_dims", pos)
        n_dims, pos = u32(pos), pos + 4
        for _ in range(n_dims):
            mark("dim", pos)
            pos += 8
        mark("ggml_type", pos)
        mark("offset", pos + 4)
        pos += 12
    out.header_end = pos
    return out


def _extreme(rng: random.Random, old: int, size: int, file_size: int) -> int:
    top = 2 ** (8 * size)
    choices = [0, 1, top - 1, top // 2, top // 2 - 1, 2**32 - 1, 2**32, 2**31, old + 1, old - 1, old * 2,
               old // 2, file_size, file_size + 1, 2**40, rng.getrandbits(8 * size)]
    return rng.choice(choices) % top


def _put(data: bytearray, pos: int, size: int, value: int) -> None:
    data[pos:pos + size] = value.to_bytes(size, "little")


def _flip_bits(rng: random.Random, data: bytearray, end: int) -> str:
    flips = []
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(max(end, 1))
        bit = rng.randrange(8)
        data[pos] ^= 1 << bit
        flips.append(f"{pos}.{bit}")
    return "bitflip " + ",".join(flips)


def mutate_gguf(rng: random.Random, original: bytes, layout: Layout) -> tuple[str, bytes]:
    data = bytearray(original)
    roll = rng.random()
    if "offset" not in layout.fields and roll >= 0.75:  # a vocabulary file: no tensors to move or retype
        roll = rng.uniform(0.28, 0.75)
    if roll < 0.18:
        end = layout.header_end if rng.random() < 0.8 else len(data)
        return _flip_bits(rng, data, end), bytes(data)
    if roll < 0.28:
        cut = rng.randrange(layout.header_end) if rng.random() < 0.6 else rng.randrange(len(data))
        return f"truncate at {cut}", bytes(data[:cut])
    if roll < 0.75:
        kind = rng.choice(sorted(layout.fields))
        pos = rng.choice(layout.fields[kind])
        size = _FIELD_SIZES[kind]
        old = int.from_bytes(data[pos:pos + size], "little")
        new = _extreme(rng, old, size, len(data))
        _put(data, pos, size, new)
        return f"{kind} at {pos}: {old} -> {new}", bytes(data)
    if roll < 0.87:
        offsets = layout.fields["offset"]
        pos = rng.choice(offsets)
        old = int.from_bytes(data[pos:pos + 8], "little")
        other = int.from_bytes(data[(p := rng.choice(offsets)):p + 8], "little")
        how, new = rng.choice([("overlap", other), ("overlap+32", other + 32), ("past end", len(data)),
                               ("unaligned", old + 1), ("last byte", len(data) - layout.header_end - 32),
                               ("huge", 2**63 - 32)])
        _put(data, pos, 8, new)
        return f"tensor offset at {pos} {how}: {old} -> {new}", bytes(data)
    if roll < 0.95:
        pos = rng.choice(layout.fields["ggml_type"])
        old = int.from_bytes(data[pos:pos + 4], "little")
        new = rng.choice([0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 24, 25, 26, 27, 28, 29, 30, 31,
                          34, 35, 36, 39, 40, 41, 4, 5, 99, 2**31, 2**32 - 1])
        _put(data, pos, 4, new)
        return f"ggml type at {pos}: {old} -> {new}", bytes(data)
    return _alignment(rng, data, layout)


def _alignment(rng: random.Random, data: bytearray, layout: Layout) -> tuple[str, bytes]:
    """Set general.alignment (inserting the key when the file has none, the data moved to the new alignment)."""
    new = rng.choice([0, 1, 2, 3, 8, 16, 24, 64, 4096, 2**31, 2**32 - 1])
    if layout.alignment_pos is not None:
        _put(data, layout.alignment_pos, 4, new)
        return f"general.alignment -> {new}", bytes(data)
    key = b"general.alignment"
    entry = len(key).to_bytes(8, "little") + key + (4).to_bytes(4, "little") + new.to_bytes(4, "little")
    n_kv = int.from_bytes(data[16:24], "little")
    _put(data, 16, 8, n_kv + 1)
    old_start = -(-layout.header_end // 32) * 32
    header = bytes(data[:layout.kv_end]) + entry + bytes(data[layout.kv_end:layout.header_end])
    pad_to = new if 0 < new <= 4096 and not new & (new - 1) else 32
    header += b"\0" * (-len(header) % pad_to)
    return f"general.alignment inserted = {new}", header + bytes(data[old_start:])


# ---------------------------------------------------------------------------------------------------------
# safetensors and JSON


def mutate_safetensors(rng: random.Random, original: bytes) -> tuple[str, bytes]:
    n = int.from_bytes(original[:8], "little")
    header = json.loads(original[8:8 + n])
    body = original[8 + n:]
    roll = rng.random()
    if roll < 0.15:
        new = _extreme(rng, n, 8, len(original))
        return f"header length {n} -> {new}", new.to_bytes(8, "little") + original[8:]
    if roll < 0.25:
        data = bytearray(original)
        return _flip_bits(rng, data, 8 + n), bytes(data)
    if roll < 0.33:
        cut = rng.randrange(len(original))
        return f"truncate at {cut}", original[:cut]
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    what = rng.choice(["shape", "shape", "offsets", "offsets", "dtype", "entry"])
    if what == "shape":
        axis = rng.randrange(len(entry["shape"]))
        entry["shape"][axis] = rng.choice([0, -1, -(2**40), 2**31, 2**32, 2**62, 2**64 + 5, 10**12,
                                           entry["shape"][axis] + 1])
        if rng.random() < 0.2:
            entry["shape"] = entry["shape"] * rng.choice([2, 5])
    elif what == "offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, len(body) + 1], [-1, end], [begin, 2**64 + 1],
                                            [0, end - begin], [begin + 1, end + 1], [begin, begin]])
    elif what == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "F64", "I64", "BOOL", "U8", "F8_E4M3", "XX", 7])
    else:
        header[name] = rng.choice([None, [], "x", 1, {"dtype": "BF16"}])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return f"{name}.{what} -> {json.dumps(header[name])[:120]}", len(text).to_bytes(8, "little") + text + body


_WRONG_TYPES = [None, True, "12", [], {}, -1, 0, 2**63, 10**12, -(10**12), 1.5e300, float("nan")]
CONFIG_ATTACKS = {  # field -> hostile values tried often (the rest of config.json gets random mutations)
    "hidden_size": [10**12, -256, 0, 2**20 + 1], "num_hidden_layers": [-1, 0, 10**6, 2**31],
    "vocab_size": [5_000_000, 10**9, -1], "intermediate_size": [10**12, 0], "num_attention_heads": [0, 7, -8],
    "num_key_value_heads": [0, 3, 10**9], "head_dim": [0, 10**9, -32], "max_position_embeddings": [10**15, -1, 0],
    "rms_norm_eps": ["x", None], "rope_parameters": [{"rope_theta": -1.0, "rope_type": "yarn"}, "nope", 5],
    "tie_word_embeddings": ["maybe"], "architectures": [["GPT9000"], "LlamaForCausalLM", 3],
}


def _json_paths(value, prefix=()):
    """Every (path, value) of a JSON document; lists longer than 64 contribute a sample of their items."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        indices = range(len(value)) if len(value) <= 64 else random.Random(len(value)).sample(range(len(value)), 64)
        for i in indices:
            yield from _json_paths(value[i], (*prefix, i))


def _set_path(doc, path, value):
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def mutate_json(rng: random.Random, original: bytes, kind: str) -> tuple[str, bytes]:
    roll = rng.random()
    if roll < 0.1:
        cut = rng.randrange(len(original))
        return f"truncate at {cut}", original[:cut]
    if roll < 0.18:
        data = bytearray(original)
        return _flip_bits(rng, data, len(data)), bytes(data)
    doc = json.loads(original)
    if kind == "config" and roll < 0.6:
        key = rng.choice(sorted(CONFIG_ATTACKS))
        value = rng.choice(CONFIG_ATTACKS[key])
        doc[key] = value
        return f"{key} = {json.dumps(value)[:80]}", json.dumps(doc).encode()
    if kind == "tokenizer" and roll < 0.35:
        model = doc["model"]
        how = rng.choice(["vocab huge id", "vocab negative id", "merges garbage", "vocab wrong type",
                          "added token huge id", "unknown model type"])
        if how == "vocab huge id":
            model["vocab"][next(iter(model["vocab"]))] = 10**12
        elif how == "vocab negative id":
            model["vocab"][next(iter(model["vocab"]))] = -5
        elif how == "merges garbage":
            model["merges"] = [[1, 2]] * 3 if rng.random() < 0.5 else "x"
        elif how == "vocab wrong type":
            model["vocab"] = rng.choice([None, "abc", 5, [["a", "b"]]])
        elif how == "added token huge id":
            doc["added_tokens"].append({"id": 2**40, "content": "<x>", "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": True})
        else:
            model["type"] = "GPT9000"
        return how, json.dumps(doc).encode()
    paths = [p for p, _ in _json_paths(doc) if p]
    path = rng.choice(paths)
    if rng.random() < 0.15:
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        return f"delete {'.'.join(map(str, path))[:100]}", json.dumps(doc).encode()
    value = rng.choice(_WRONG_TYPES)
    _set_path(doc, path, value)
    return f"{'.'.join(map(str, path))[:100]} = {value!r}", json.dumps(doc).encode()


# ---------------------------------------------------------------------------------------------------------
# Mutants


@dataclass
class Mutant:
    index: int
    source: Source
    description: str
    data: bytes


_CACHE: dict[Path, tuple[bytes, Layout | None]] = {}


def _original(source: Source) -> tuple[bytes, Layout | None]:
    if source.path not in _CACHE:
        data = source.path.read_bytes()
        _CACHE[source.path] = (data, gguf_layout(data) if source.kind.startswith("gguf") else None)
    return _CACHE[source.path]


def make_mutant(seed: int, index: int, small: bool) -> Mutant:
    """Mutant `index` of campaign `seed`: the same bytes every time."""
    rng = random.Random(f"{seed}:{index}")
    source = rng.choice(sources(small))
    data, layout = _original(source)
    if source.kind.startswith("gguf"):
        description, mutated = mutate_gguf(rng, data, layout)
    elif source.kind == "safetensors":
        description, mutated = mutate_safetensors(rng, data)
    else:
        description, mutated = mutate_json(rng, data, source.kind)
    return Mutant(index, source, description, mutated)


# ---------------------------------------------------------------------------------------------------------
# The worker: loads mutants one by one and reports a JSON line each


def _rss_kib(field_name: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", status).group(1))


def _load_and_run(source: Source, path: Path) -> str:
    """What the mutant did when it loaded: a short note; raises what the loader raised."""
    if source.kind == "gguf-vocab":
        from ember.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
        ids = tokenizer.encode("Hello world, 123!")
        return f"encoded {len(ids)} tokens: {tokenizer.decode(ids)[:20]!r}"
    from ember.llm import LLM
    from ember.sampling_params import SamplingParams

    llm = LLM(str(path), max_model_len=16, max_num_seqs=1, max_batched_tokens=16, block_size=16)
    out = llm.generate([0], SamplingParams(max_tokens=1, temperature=0.0))
    return f"token {out[0].token_ids}"


def _stage(source: Source, data: bytes, work: Path) -> tuple[Path, int]:
    """Write the mutant where the loader reads it: (what to load, size of the mutated file)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if source.kind.startswith("gguf"):
        target = work / "mutant.gguf"
        target.write_bytes(data)
        return target, len(data)
    for sibling in source.path.parent.iterdir():
        if sibling.name != source.path.name:
            os.symlink(sibling, work / sibling.name)
    (work / source.path.name).write_bytes(data)
    return work, len(data) + (source.path.parent / "model.safetensors").stat().st_size * (
        source.kind != "safetensors")


def _baseline(source: Source) -> dict:
    """Time and peak RSS growth of loading the unmutated source, for mutants over a limit to be compared with."""
    Path("/proc/self/clear_refs").write_text("5")
    before, started = _rss_kib("VmRSS"), time.perf_counter()
    _load_and_run(source, source.path if source.kind.startswith("gguf") else source.path.parent)
    return {"seconds": round(time.perf_counter() - started, 3), "rss_grown": (_rss_kib("VmHWM") - before) * 1024}


def worker(seed: int, small: bool, work: Path) -> None:
    """Read mutant indices from stdin; for each print {"index", "outcome", "seconds", "rss_ratio", "detail"}."""
    import faulthandler
    import resource

    # A mutant that makes the loader allocate without bound fails with MemoryError (a finding) instead of
    # taking the machine down.
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))

    from ember.errors import EmberError

    faulthandler.enable()
    self_test = os.environ.get("EMBER_FUZZ_SELF_TEST") == "1"  # the harness's own test: crash, hang, go on
    # Warm up on an unmutated model, so imports and first-call costs are not charged to the first mutant.
    if not self_test:
        _load_and_run(Source("gguf-model", ROOT / "ember" / "assets" / "ember-default-bf16.gguf"),
                      ROOT / "ember" / "assets" / "ember-default-bf16.gguf")
        _load_and_run(Source("gguf-vocab", TESTDATA / "vocab" / "ggml-vocab-llama-spm.gguf"),
                      TESTDATA / "vocab" / "ggml-vocab-llama-spm.gguf")
    baselines: dict[Source, dict] = {}  # the unmutated source's cost, measured when a mutant is over a limit
    for line in sys.stdin:
        index = int(line)
        mutant = make_mutant(seed, index, small)
        path, size = _stage(mutant.source, mutant.data, work)
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS starts again from the current RSS
        before = _rss_kib("VmRSS")
        print(json.dumps({"index": index, "started": True}), flush=True)
        if self_test and index == 0:
            os.kill(os.getpid(), signal.SIGSEGV)
        if self_test and index == 1:
            time.sleep(3600)
        started = time.perf_counter()
        try:
            detail = _load_and_run(mutant.source, path)
            outcome = "ran"
        except EmberError as err:
            text = str(err)
            outcome = "refused" if text and "\n" not in text else "bad-message"
            detail = f"{type(err).__name__}: {text}"
        except Exception as err:  # noqa: BLE001 - every other exception is a finding
            outcome, detail = "wrong-exception", f"{type(err).__name__}: {str(err)[:300]}"
        seconds = time.perf_counter() - started
        grown = (_rss_kib("VmHWM") - before) * 1024
        over_limit = grown > RSS_RATIO * size + RSS_SLACK
        if (seconds > LIMIT_S or over_limit) and mutant.source not in baselines:
            baselines[mutant.source] = _baseline(mutant.source)
        baseline = baselines.get(mutant.source)
        ratio = grown / max(size, 1)
        if outcome in ("ran", "refused") and over_limit and grown > RSS_RATIO * baseline["rss_grown"]:
            outcome = "over-allocation"
        print(json.dumps({"index": index, "outcome": outcome, "seconds": round(seconds, 3),
                          "rss_ratio": round(ratio, 3), "rss_grown": grown, "size": size,
                          "baseline": baseline, "detail": detail[:400]}), flush=True)


# ---------------------------------------------------------------------------------------------------------
# The parent: hands out mutants, watches the clock, restarts dead workers


class _Worker:
    """A worker process and a thread that moves its output lines to the shared queue (None: it exited)."""

    def __init__(self, slot: int, seed: int, small: bool, work: Path, threads: int, lines: queue.Queue):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
               "EMBER_HOME": str(work / "home"), "PYTHONFAULTHANDLER": "1"}
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--seed", str(seed), "--work", str(work)]
            + (["--small"] if small else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env, bufsize=1)
        self.current: int | None = None
        self.started_at = 0.0
        self.warming = True  # importing torch and loading a model once, before its first "started" line

        def pump() -> None:
            for line in self.proc.stdout:
                lines.put((slot, self, line))
            lines.put((slot, self, None))

        threading.Thread(target=pump, daemon=True).start()

    def give(self, index: int | None) -> None:
        self.current, self.started_at = index, time.monotonic()
        if index is not None:
            self.proc.stdin.write(f"{index}\n")
            self.proc.stdin.flush()

    def kill(self) -> str:
        self.proc.kill()
        self.proc.wait()
        self.stderr.seek(0)
        text = self.stderr.read()[-2000:]
        self.stderr.close()
        return text


def run_campaign(count: int, seed: int, *, small: bool = False, workers: int = 2, start: int = 0,
                 limit_s: float = LIMIT_S, threads: int = 1, log=None, hang_after: float | None = None,
                 indices: list[int] | None = None) -> list[dict]:
    """Run mutants start..start+count-1 (or `indices`) of campaign `seed`; one result dict per mutant, in index
    order. A mutant with no answer after `hang_after` seconds is run again alone with 120 s (a 128k-token
    vocabulary can take 15 s to build on a machine this busy); a hang is one that runs out of those too."""
    pending = list(indices if indices is not None else range(start, start + count))
    count = len(pending)
    retry = hang_after is None
    hang_after = hang_after or 2 * limit_s + 5
    results: dict[int, dict] = {}
    base = Path(tempfile.mkdtemp(prefix="ember-fuzz-"))
    lines: queue.Queue = queue.Queue()
    pool: list[_Worker] = []

    def spawn(slot: int) -> _Worker:
        w = _Worker(slot, seed, small, base / f"w{slot}", threads, lines)
        w.give(pending.pop(0) if pending else None)
        return w

    def record(result: dict) -> None:
        results[result["index"]] = result
        if log:
            log(result)

    def replace(slot: int, w: _Worker, outcome: str, detail: str) -> None:
        stderr = w.kill()
        if w.current is not None:
            record({"index": w.current, "outcome": outcome, "seconds": round(time.monotonic() - w.started_at, 3),
                    "rss_ratio": None, "detail": (detail + " " + stderr[-600:]).strip()})
        pool[slot] = spawn(slot)

    try:
        for slot in range(min(workers, count)):
            pool.append(spawn(slot))
        # A worker's clock starts at its "started" line, so its warm-up (importing torch) is not charged.
        while len(results) < count:
            try:
                slot, w, line = lines.get(timeout=0.2)
            except queue.Empty:
                slot = w = line = None
            if w is not None and w is pool[slot]:  # not a late line from a worker already replaced
                if line is None:  # the worker died: a crash on its current mutant
                    replace(slot, w, "crash", f"worker exited with {w.proc.wait()}")
                else:
                    message = json.loads(line)
                    if message.get("started"):
                        w.started_at, w.warming = time.monotonic(), False
                    else:
                        record(message)
                        w.give(pending.pop(0) if pending else None)
            now = time.monotonic()
            for slot, w in enumerate(pool):
                if w.current is not None and now - w.started_at > hang_after + 120 * w.warming:
                    replace(slot, w, "hang", f"no answer after {now - w.started_at:.0f} s")
        for r in results.values():
            # Slow: over the limit, and over twice the time the unmutated file takes on this machine (a
            # 128k-token vocabulary takes seconds to build on a busy CPU, mutated or not).
            if (r["outcome"] in ("ran", "refused") and r["seconds"] > limit_s
                    and r["seconds"] > 2 * (r.get("baseline") or {}).get("seconds", 0)):
                r["outcome"] = "slow"
    finally:
        for w in pool:
            w.kill()
        shutil.rmtree(base, ignore_errors=True)
    hung = [i for i, r in results.items() if r["outcome"] == "hang"]
    if retry and hung:
        for r in run_campaign(0, seed, small=small, workers=1, limit_s=limit_s, threads=threads, log=log,
                              hang_after=120, indices=hung):
            results[r["index"]] = r
    return [results[i] for i in sorted(results)]


def summary(results: list[dict], seed: int, small: bool = False) -> dict:
    outcomes = Counter(r["outcome"] for r in results)
    findings = [r for r in results if r["outcome"] not in ("ran", "refused")]
    timed = [r for r in results if r.get("seconds") is not None]
    ratios = [r["rss_ratio"] for r in results if r.get("rss_ratio") is not None]
    slowest = max(timed, key=lambda r: r["seconds"]) if timed else None
    return {"count": len(results), "outcomes": dict(outcomes),
            "max_seconds": slowest["seconds"] if slowest else None,
            "slowest": {"index": slowest["index"], **_describe(seed, slowest["index"], small)} if slowest else None,
            "max_rss_ratio": max(ratios) if ratios else None,
            "findings": [{**r, **_describe(seed, r["index"], small)} for r in findings]}


def _describe(seed: int, index: int, small: bool) -> dict:
    """The source and mutation of a mutant, remade from its seed and index."""
    mutant = make_mutant(seed, index, small)
    return {"source": mutant.source.path.name, "mutation": mutant.description}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="first mutant index (replay one: --start N --count 1)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="only the quick sources (what CI mutates)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--verbose", action="store_true", help="print each result as it comes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.seed, args.small, args.work)
        return 0
    started = time.perf_counter()
    results = run_campaign(args.count, args.seed, small=args.small, workers=args.workers, start=args.start,
                           log=(lambda r: print(json.dumps(r), flush=True)) if args.verbose else None)
    report = summary(results, args.seed, args.small)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        args.json.write_text(json.dumps({"summary": report, "results": results}, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "findings"}, indent=1))
    for finding in report["findings"]:
        print(json.dumps(finding))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
