"""Models other tools already put on disk, used in place (nothing is copied).

- Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``):
  ``models--org--repo/snapshots/<rev>/``: a checkpoint (config.json + *.safetensors) → ``hf.co/org/repo``,
  each ``*.gguf`` → ``hf.co/org/repo:<file stem>``;
- Ollama (``$OLLAMA_MODELS`` or ``~/.ollama/models``): ``manifests/<registry>/<ns>/<model>/<tag>`` whose
  model layer is a GGUF blob → ``ollama/<model>:<tag>`` (``ollama/<ns>/<model>:<tag>`` outside ``library``);
- LM Studio (``~/.lmstudio/models``, legacy ``~/.cache/lm-studio/models``):
  ``<publisher>/<repo>/*.gguf`` → ``lmstudio/<publisher>/<repo>/<file>``;
- ``$EMBER_MODELS_PATH`` (``os.pathsep``-separated folders): each ``*.gguf`` → ``local/<stem>`` and each
  subfolder with config.json → ``local/<folder>``.

Walks are bounded (a few levels, no symlinked folders leaving the root); unreadable entries are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.formats.gguf import has_gguf_magic
from ember.store.info import quant_from_filename

log = logging.getLogger(__name__)

OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_TEMPLATE = "application/vnd.ollama.image.template"
MAX_ENTRIES = 10000  # per root, to bound the walk
MAX_MANIFEST = 1 << 20
NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")


@dataclass(frozen=True)
class DiscoveredModel:
    name: str
    path: Path  # GGUF file (an Ollama blob has no .gguf suffix) or checkpoint folder
    format: str  # gguf | safetensors
    source: str  # huggingface | ollama | lmstudio | local
    size: int
    quant: str | None = None
    template: str | None = None  # Ollama's Go template text, kept as-is (not converted)
    modified: float = 0.0


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else _home() / ".cache") / "huggingface" / "hub"


def ollama_dir() -> Path:
    if os.environ.get("OLLAMA_MODELS"):
        return Path(os.environ["OLLAMA_MODELS"]).expanduser()
    return _home() / ".ollama" / "models"


def lmstudio_dirs() -> list[Path]:
    return [_home() / ".lmstudio" / "models", _home() / ".cache" / "lm-studio" / "models"]


def ember_model_paths() -> list[Path]:
    value = os.environ.get("EMBER_MODELS_PATH", "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as err:
        log.debug("skipping %s: %s", folder, err)
        return []


def _within(path: Path, root: Path) -> bool:
    """True when `path` (after symlinks) stays under `root` (after symlinks)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _is_checkpoint(folder: Path) -> bool:
    return _is_file(folder / "config.json") and any(p.suffix == ".safetensors" for p in _listdir(folder))


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and _is_file(path) and "mmproj" not in path.name.lower()


# ---- Hugging Face cache ------------------------------------------------------------------------------

def _hf_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot `refs/main` points at, else the most recently modified one."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    try:
        rev = ref.read_text(encoding="utf-8").strip() if _is_file(ref) else ""
    except OSError:
        rev = ""
    if re.fullmatch(r"[0-9a-f]{6,64}", rev) and _is_dir(snapshots / rev):
        return snapshots / rev
    candidates = [p for p in _listdir(snapshots) if _is_dir(p) and not p.is_symlink()]
    return max(candidates, key=_mtime) if candidates else None


def discover_hf(cache: Path | None = None) -> Iterator[DiscoveredModel]:
    cache = cache or hf_cache_dir()
    for repo_dir in _listdir(cache)[:MAX_ENTRIES]:
        if not repo_dir.name.startswith("models--") or not _is_dir(repo_dir) or repo_dir.is_symlink():
            continue
        parts = repo_dir.name.removeprefix("models--").split("--")
        if len(parts) != 2 or not all(NAME_PART.match(p) for p in parts):
            continue
        repo = "/".join(parts)
        snapshot = _hf_snapshot(repo_dir)
        if snapshot is None:
            continue
        files = _listdir(snapshot)
        if _is_checkpoint(snapshot):
            weights = [p for p in files if _is_file(p)]
            yield DiscoveredModel(f"hf.co/{repo}", snapshot, "safetensors", "huggingface", _size(weights),
                                  _config_dtype(snapshot), None, _mtime(snapshot))
        ggufs = [p for p in files if _is_gguf(p) and _within(p, repo_dir)]
        for sub in files:  # quantizations are sometimes kept in one level of subfolders
            if _is_dir(sub) and not sub.name.startswith("."):
                ggufs += [p for p in _listdir(sub) if _is_gguf(p) and _within(p, repo_dir)]
        for gguf in ggufs:
            if not NAME_PART.match(gguf.stem):
                continue
            yield DiscoveredModel(f"hf.co/{repo}:{gguf.stem}", gguf, "gguf", "huggingface", _size([gguf]),
                                  quant_from_filename(gguf.name), None, _mtime(gguf))


def _config_dtype(folder: Path) -> str | None:
    from ember.store.info import CONFIG_DTYPES

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return CONFIG_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or ""))
    except (OSError, ValueError, AttributeError):
        return None


# ---- Ollama ------------------------------------------------------------------------------------------

def _ollama_blob(root: Path, digest: object) -> Path | None:
    if not isinstance(digest, str):
        return None
    match = re.fullmatch(r"sha256[:-]([0-9a-f]{64})", digest)
    if not match:
        return None
    blob = root / "blobs" / f"sha256-{match.group(1)}"
    return blob if _is_file(blob) and _within(blob, root) else None


def _read_small(path: Path, limit: int = MAX_MANIFEST) -> str | None:
    try:
        if path.stat().st_size > limit:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def discover_ollama(root: Path | None = None) -> Iterator[DiscoveredModel]:
    root = root or ollama_dir()
    manifests = root / "manifests"
    seen = 0
    for registry in _listdir(manifests):
        for namespace in _listdir(registry) if _is_dir(registry) else []:
            for model in _listdir(namespace) if _is_dir(namespace) else []:
                for tag_file in _listdir(model) if _is_dir(model) else []:
                    seen += 1
                    if seen > MAX_ENTRIES:
                        return
                    entry = _ollama_entry(root, registry, namespace, model, tag_file)
                    if entry is not None:
                        yield entry


def _ollama_entry(root: Path, registry: Path, namespace: Path, model: Path, tag_file: Path):
    if not _is_file(tag_file) or not _within(tag_file, root):
        return None
    if not all(NAME_PART.match(p.name) for p in (namespace, model, tag_file)):
        return None
    text = _read_small(tag_file)
    try:
        manifest = json.loads(text) if text else None
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
    except ValueError:
        layers = None
    if not isinstance(layers, list):
        log.debug("skipping %s: not an Ollama manifest", tag_file)
        return None
    blob = template = None
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        if layer.get("mediaType") == OLLAMA_MODEL and blob is None:
            blob = _ollama_blob(root, layer.get("digest"))
        elif layer.get("mediaType") == OLLAMA_TEMPLATE:
            path = _ollama_blob(root, layer.get("digest"))
            template = _read_small(path) if path else None
    if blob is None:
        return None
    if not has_gguf_magic(blob):
        return None
    if registry.name == "registry.ollama.ai":
        prefix = "" if namespace.name == "library" else f"{namespace.name}/"
    else:
        if not NAME_PART.match(registry.name):
            return None
        prefix = f"{registry.name}/{namespace.name}/"
    return DiscoveredModel(f"ollama/{prefix}{model.name}:{tag_file.name}", blob, "gguf", "ollama",
                           _size([blob]), None, template, _mtime(tag_file))


# ---- LM Studio and EMBER_MODELS_PATH -------------------------------------------------------------------

def discover_lmstudio(roots: list[Path] | None = None) -> Iterator[DiscoveredModel]:
    seen: set[str] = set()
    for root in roots or lmstudio_dirs():
        for publisher in _listdir(root):
            if not _is_dir(publisher) or not NAME_PART.match(publisher.name) or not _within(publisher, root):
                continue
            for repo in _listdir(publisher):
                if not _is_dir(repo) or not NAME_PART.match(repo.name) or not _within(repo, root):
                    continue
                for gguf in _listdir(repo):
                    name = f"lmstudio/{publisher.name}/{repo.name}/{gguf.name}"
                    if not _is_gguf(gguf) or not NAME_PART.match(gguf.name) or name in seen:
                        continue
                    if not _within(gguf, root):
                        continue
                    seen.add(name)
                    yield DiscoveredModel(name, gguf, "gguf", "lmstudio", _size([gguf]),
                                          quant_from_filename(gguf.name), None, _mtime(gguf))


def discover_local(folders: list[Path] | None = None) -> Iterator[DiscoveredModel]:
    seen: set[str] = set()
    for root in ember_model_paths() if folders is None else folders:
        for entry in _listdir(root)[:MAX_ENTRIES]:
            if not NAME_PART.match(entry.name) or not _within(entry, root):
                continue
            if _is_gguf(entry):
                name, model = f"local/{entry.stem}", DiscoveredModel(
                    f"local/{entry.stem}", entry, "gguf", "local", _size([entry]),
                    quant_from_filename(entry.name), None, _mtime(entry))
            elif _is_dir(entry) and _is_checkpoint(entry):
                files = [p for p in _listdir(entry) if _is_file(p)]
                name, model = f"local/{entry.name}", DiscoveredModel(
                    f"local/{entry.name}", entry, "safetensors", "local", _size(files), _config_dtype(entry), None,
                    _mtime(entry))
            else:
                continue
            if name not in seen and NAME_PART.match(name.removeprefix("local/")):
                seen.add(name)
                yield model


def discover_all() -> list[DiscoveredModel]:
    """Every model found in the places above (first one wins when two have the same name)."""
    found: dict[str, DiscoveredModel] = {}
    for finder in (discover_hf, discover_ollama, discover_lmstudio, discover_local):
        try:
            for model in finder():
                found.setdefault(model.name, model)
        except OSError as err:  # a root that vanished mid-walk
            log.debug("discovery %s failed: %s", finder.__name__, err)
    return list(found.values())
