"""Model references: what a user (CLI) or a client (HTTP) may name, parsed and validated before any file is touched.

Kinds of reference:

- ``default``: None or "" (the bundled model);
- ``path``: a GGUF file or a checkpoint folder, only where ``allow_paths`` (the CLI), never from HTTP;
- ``store``: ``family[:tag]`` in ember's own store (tag defaults to ``latest``; both lower-cased);
- ``hf``: a Hugging Face repo id ``org/repo`` with an optional ``:QUANT`` or ``:file.gguf``
  (also written ``hf.co/org/repo[:...]``);
- ``discovered``: a name given to a model found in another tool's folder (``ollama/...``, ``lmstudio/...``,
  ``local/...``), matched exactly against what discovery finds, never turned into a path;
- ``digest``: ``sha256:<hex>`` (a store blob), only where ``allow_digest``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ModelLoadError, ProtectedModel

STORE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(:[a-zA-Z0-9._-]{1,64})?$")
STORE_TAG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Hugging Face's own rule (huggingface_hub.utils.validate_repo_id): 1-96 chars, no leading/trailing - or .
HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HF_SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a quantization tag or a file name
DISCOVERED_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")
DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
HF_HOSTS = ("hf.co", "huggingface.co")
DISCOVERY_PREFIXES = ("ollama", "lmstudio", "local")
MAX_REF = 300
MAX_PATH = 4096
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class ModelRef:
    kind: str  # default | path | store | hf | discovered | digest
    text: str  # the canonical reference ("family:tag", "org/repo:Q4_K_M", ...)
    path: Path | None = None  # kind "path"
    family: str | None = None  # kind "store"
    tag: str | None = None  # kind "store"
    repo: str | None = None  # kind "hf": "org/repo"
    variant: str | None = None  # kind "hf": the quantization tag or GGUF file name after ':'
    digest: str | None = None  # kind "digest": the hex digest

    @property
    def store_name(self) -> str:
        return f"{self.family}:{self.tag}"


def _fail(ref: str, problem: str) -> ModelLoadError:
    shown = ref if len(ref) <= 80 else ref[:77] + "..."
    return ModelLoadError(f"invalid model name {shown!r}: {problem}")


def _looks_like_path(ref: str) -> bool:
    return (ref.startswith(("/", "~", "./", "../", ".\\", "..\\")) or ref in (".", "..") or "\\" in ref
            or bool(re.match(r"^[A-Za-z]:[\\/]", ref)))


def _odd_characters(text: str, allowed: str) -> str:
    odd = sorted({c for c in text if not re.match(allowed, c)})
    return " ".join(repr(c) for c in odd[:8])


def parse_store_name(name: str) -> ModelRef:
    """`family[:tag]` → a store reference (lower-cased, tag `latest` by default); anything else is an error."""
    if not isinstance(name, str) or not name:
        raise _fail(str(name), "empty")
    if len(name) > 129:
        raise _fail(name, "longer than 129 characters")
    if "\x00" in name:
        raise _fail(name, "contains a NUL character")
    if DIGEST.match(name.lower()) or name.lower().startswith(("sha256:", "sha256-")):
        raise _fail(name, "digests cannot be store names")
    lowered = name.lower()
    if "/" in name or "\\" in name:
        raise _fail(name, "store names have no '/' (use family:tag)")
    if ".." in name:
        raise _fail(name, "contains '..'")
    if not STORE_NAME.match(lowered):
        odd = _odd_characters(lowered, r"[a-z0-9._:-]")
        if odd:
            raise _fail(name, f"unexpected characters {odd} (use a-z, 0-9, '.', '_', '-' and one ':')")
        raise _fail(name, "expected family[:tag]: family starts with a letter or digit and has at most 64 "
                          "characters, tag at most 64")
    family, _, tag = lowered.partition(":")
    tag = tag or DEFAULT_TAG
    if not STORE_TAG.match(tag):
        raise _fail(name, "the tag must start with a letter or digit")
    return ModelRef("store", f"{family}:{tag}", family=family, tag=tag)


def _parse_hf(ref: str, body: str) -> ModelRef:
    repo, sep, variant = body.partition(":")
    if repo.count("/") != 1:
        raise _fail(ref, "a Hugging Face repo id is org/repo")
    org, name = repo.split("/")
    if len(repo) > 96:
        raise _fail(ref, "a Hugging Face repo id has at most 96 characters")
    for part in (org, name):
        if not part:
            raise _fail(ref, "empty part in org/repo")
        if not HF_PART.match(part):
            odd = _odd_characters(part, r"[A-Za-z0-9._-]")
            raise _fail(ref, f"unexpected characters {odd} in the repo id" if odd
                        else "repo id parts start with a letter or digit")
        if part.endswith((".", "-")):
            raise _fail(ref, "repo id parts cannot end with '.' or '-'")
    if "--" in repo:
        raise _fail(ref, "repo ids cannot contain '--'")
    if repo.endswith(".git"):
        raise _fail(ref, "repo ids cannot end with .git")
    if sep:
        if not HF_SUFFIX.match(variant):
            odd = _odd_characters(variant, r"[A-Za-z0-9._-]")
            raise _fail(ref, f"unexpected characters {odd} after ':'" if odd
                        else "expected :QUANT or :file.gguf after the repo id")
    return ModelRef("hf", f"{repo}:{variant}" if sep else repo, repo=repo, variant=variant if sep else None)


def _parse_discovered(ref: str) -> ModelRef:
    body, _, tag = ref.partition(":")
    parts = body.split("/")
    if len(parts) > 4:
        raise _fail(ref, "too many '/'")
    for part in parts[1:] + ([tag] if tag else []):
        if not DISCOVERED_PART.match(part):
            odd = _odd_characters(part, r"[A-Za-z0-9._+-]")
            raise _fail(ref, f"unexpected characters {odd}" if odd else "empty or badly formed part")
    if len(parts) < 2:
        raise _fail(ref, f"expected {parts[0]}/NAME")
    return ModelRef("discovered", ref)


# What names the bundled model: nothing, or the name it is listed under.
DEFAULT_NAMES = ("", "ember-default", "ember-default:latest")


def reserved_reason(name: str) -> str | None:
    """Why `name` can neither be given to a stored model nor removed from the store: it names the model built
    into ember or one shipped in a Python package (a stored copy under that name would shadow it, or never be
    reachable). None for any other name."""
    from ember.store.packaged import PACKAGED_MODELS

    key = name.strip().lower()
    tagged = key if ":" in key.rsplit("/", 1)[-1] else f"{key}:latest"
    if key in DEFAULT_NAMES or tagged in DEFAULT_NAMES:
        return f"{name!r} is the model built into ember"
    package = PACKAGED_MODELS.get(key) or PACKAGED_MODELS.get(tagged)
    if package is not None:
        return f"{name!r} is the model shipped in the {package[1]} package"
    return None


def refuse_reserved(name: str, action: str) -> None:
    """ProtectedModel when `name` is reserved (see reserved_reason); `action`: "removed", "copied onto"."""
    reason = reserved_reason(name)
    if reason is not None:
        raise ProtectedModel(f"{reason}: it cannot be {action}")


def parse_ref(ref: str | os.PathLike | None, *, allow_paths: bool = False, allow_digest: bool = False) -> ModelRef:
    """Validate a model reference; raise ModelLoadError naming the problem for anything hostile or malformed."""
    if ref is None:
        return ModelRef("default", "")
    if isinstance(ref, os.PathLike):
        if not allow_paths:
            raise ModelLoadError("model paths are not allowed here; give a model name")
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise ModelLoadError(f"model name must be a string, not {type(ref).__name__}")
    if ref in DEFAULT_NAMES:
        return ModelRef("default", "")
    if "\x00" in ref:
        raise _fail(ref, "contains a NUL character")
    if any(ord(c) < 32 or ord(c) == 127 for c in ref):
        raise _fail(ref, "contains control characters")
    if len(ref) > (MAX_PATH if allow_paths else MAX_REF):
        raise _fail(ref, f"longer than {MAX_PATH if allow_paths else MAX_REF} characters")
    if allow_paths:
        path = Path(ref).expanduser()
        if _looks_like_path(ref) or path.exists():
            if not path.exists():
                raise ModelLoadError(f"model {ref!r} not found (give a GGUF file or a folder with config.json)")
            return ModelRef("path", ref, path=path)
    elif _looks_like_path(ref):
        raise _fail(ref, "file paths are not allowed here (give a model name)")
    if len(ref) > MAX_REF:
        raise _fail(ref, f"longer than {MAX_REF} characters")
    if ref != ref.strip():
        raise _fail(ref, "leading or trailing spaces")
    if ".." in ref:
        raise _fail(ref, "contains '..'")
    if ref.startswith("/"):
        raise _fail(ref, "starts with '/'")
    digest = DIGEST.match(ref)
    if digest or ref.lower().startswith(("sha256:", "sha256-")):
        if not allow_digest:
            raise _fail(ref, "digest references are not allowed here")
        if not digest:
            raise _fail(ref, "a digest is sha256: followed by 64 lower-case hex digits")
        return ModelRef("digest", f"sha256:{digest.group(1)}", digest=digest.group(1))
    if "/" in ref:
        first, _, rest = ref.partition("/")
        if first.lower() in HF_HOSTS:
            return _parse_hf(ref, rest)
        if first in DISCOVERY_PREFIXES:
            return _parse_discovered(ref)
        if ref.count("/") > 1:
            raise _fail(ref, "expected org/repo (one '/')")
        return _parse_hf(ref, ref)
    return parse_store_name(ref)
