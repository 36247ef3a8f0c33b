"""ember's model store: content-addressed blobs plus one JSON manifest per `family:tag`.

Layout under the root (``$EMBER_HOME`` or ``~/.ember``)::

    blobs/sha256-<hex>                 file contents, named by their SHA-256
    manifests/<family>/<tag>.json      {files: {name: {digest, size}}, format, source, created, ...}
    models/<family>/<tag>/<file>       links to the blobs under the files' real names (what loaders open)
    tmp/                               partial files; renamed into blobs/ only once complete and fsynced

A manifest is written (atomically) only after every blob it lists is in place, so an interrupted pull
leaves nothing registered. Every path is built from a validated name and checked to stay under the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ember.errors import ModelLoadError
from ember.store.names import ModelRef, parse_store_name, refuse_reserved

log = logging.getLogger(__name__)

CHUNK = 4 << 20
HEX = re.compile(r"^[0-9a-f]{64}$")
FILE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}$")
MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class BlobInfo:
    digest: str  # hex SHA-256
    size: int


@dataclass
class Manifest:
    name: str  # family:tag
    format: str  # gguf | safetensors
    files: dict[str, BlobInfo]
    source: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)  # quant, parameters, architecture (for `ember ls`)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "name": self.name,
            "format": self.format,
            "files": {k: {"digest": f"sha256:{v.digest}", "size": v.size} for k, v in sorted(self.files.items())},
            "source": self.source,
            "created": self.created,
            "details": self.details,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        try:
            files = {}
            for fname, entry in data["files"].items():
                check_file_name(fname)
                digest = str(entry["digest"]).removeprefix("sha256:")
                if not HEX.match(digest):
                    raise ValueError(f"bad digest for {fname}")
                files[fname] = BlobInfo(digest, int(entry["size"]))
            return cls(str(data["name"]), str(data["format"]), files, dict(data.get("source") or {}),
                       float(data.get("created") or 0.0), dict(data.get("details") or {}))
        except (KeyError, TypeError, ValueError, AttributeError, ModelLoadError) as err:
            raise ModelLoadError(f"{where}: malformed manifest ({err})") from None


def check_file_name(name: str) -> str:
    """A file name inside a model: `a.json` or `sub/a.json`; no '..', no absolute paths, no odd characters."""
    if not isinstance(name, str) or not name or len(name) > 400:
        raise ModelLoadError(f"bad file name in model: {name!r}")
    parts = name.split("/")
    if len(parts) > 3 or not all(FILE_PART.match(p) for p in parts) or ".." in name:
        raise ModelLoadError(f"bad file name in model: {name!r}")
    return name


def model_format(file_names) -> str:
    names = [n.rsplit("/", 1)[-1] for n in file_names]
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    if len(ggufs) == 1:
        return "gguf"
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return "safetensors"
    if len(ggufs) > 1:
        raise ModelLoadError(f"a model holds one GGUF file, not {len(ggufs)}")
    raise ModelLoadError("a model needs one .gguf file, or config.json and .safetensors files")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ModelStore:
    def __init__(self, root: str | Path | None = None):
        if root is None:
            root = os.environ.get("EMBER_HOME") or Path.home() / ".ember"
        self.root = Path(root).expanduser().resolve()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.models = self.root / "models"
        self.tmp = self.root / "tmp"

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # ---- paths -------------------------------------------------------------------------------------

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ModelLoadError(f"refusing a path outside the model store: {path}")
        return path

    def blob_path(self, digest: str) -> Path:
        digest = digest.removeprefix("sha256:")
        if not HEX.match(digest):
            raise ModelLoadError(f"bad digest {digest!r}")
        return self._inside(self.blobs / f"sha256-{digest}")

    def _ref(self, name: str | ModelRef) -> ModelRef:
        return name if isinstance(name, ModelRef) else parse_store_name(name)

    def manifest_path(self, name: str | ModelRef) -> Path:
        ref = self._ref(name)
        return self._inside(self.manifests / ref.family / f"{ref.tag}.json")

    def view_path(self, name: str | ModelRef) -> Path:
        ref = self._ref(name)
        return self._inside(self.models / ref.family / ref.tag)

    def _mkdirs(self) -> None:
        for d in (self.blobs, self.manifests, self.models, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """An advisory lock around changes to manifests and blobs (no-op where fcntl is missing)."""
        self._mkdirs()
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- blobs -------------------------------------------------------------------------------------

    def add_file(self, name: str, source: str | Path | IO[bytes], *, expected_sha256: str | None = None,
                 expected_size: int | None = None, link: bool = False) -> BlobInfo:
        """Copy a file or stream into blobs/ (hashing as it copies); same content twice gives one blob.

        With `expected_sha256`/`expected_size`, a mismatch raises ModelLoadError and stores nothing.
        With `link`, a file on the same file system is hard-linked instead of copied (e.g. from the HF cache).
        """
        self._mkdirs()
        fd, tmp_name = tempfile.mkstemp(prefix="blob-", suffix=".partial", dir=self.tmp)
        tmp = Path(tmp_name)
        try:
            linked = False
            if link and isinstance(source, (str, os.PathLike)):
                os.close(fd)
                tmp.unlink()
                try:
                    os.link(Path(source).resolve(), tmp)
                    linked = True
                except OSError:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            if linked:
                digest, size = hash_file(tmp)
            else:
                digest, size = _copy_hashing(source, fd)
            if expected_size is not None and size != expected_size:
                raise ModelLoadError(f"{name}: size mismatch (expected {expected_size} bytes, got {size})")
            if expected_sha256 is not None and digest != expected_sha256.lower().removeprefix("sha256:"):
                raise ModelLoadError(f"{name}: checksum mismatch (expected sha256 {expected_sha256}, got {digest})")
            blob = self.blob_path(digest)
            if blob.exists() and blob.stat().st_size == size:
                tmp.unlink()
            else:
                if not linked:
                    os.chmod(tmp, 0o444)
                os.replace(tmp, blob)
                _fsync_dir(self.blobs)
            return BlobInfo(digest, size)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    # ---- manifests ---------------------------------------------------------------------------------

    def register(self, name: str, files: dict[str, Path | BlobInfo], source: dict[str, Any] | None = None,
                 *, details: dict[str, Any] | None = None) -> Manifest:
        """Add the files (paths are copied in; BlobInfos must already be stored), then write the manifest."""
        ref = self._ref(name)
        if not files:
            raise ModelLoadError("a model needs at least one file")
        for fname in files:
            check_file_name(fname)
        fmt = model_format(files)
        added: list[str] = []
        try:
            infos: dict[str, BlobInfo] = {}
            for fname, item in files.items():
                if isinstance(item, BlobInfo):
                    if not self.has_blob(item.digest):
                        raise ModelLoadError(f"{fname}: blob sha256:{item.digest} is not in the store")
                    infos[fname] = item
                else:
                    info = self.add_file(fname, item)
                    added.append(info.digest)
                    infos[fname] = info
            manifest = Manifest(ref.store_name, fmt, infos, dict(source or {}), time.time(), dict(details or {}))
            if not manifest.details:
                manifest.details = self._details(manifest)
            with self._lock():
                previous = self._previous_digests(ref)
                self._write_manifest(ref, manifest)
                self._clear_view(ref)
                self._collect(previous)  # blobs of the manifest this one replaced, if nothing else uses them
            return manifest
        except BaseException:
            self.collect_garbage(only=added)
            raise

    def _previous_digests(self, ref: ModelRef) -> list[str]:
        try:
            return [f.digest for f in self.get(ref).files.values()]
        except ModelLoadError:
            return []

    def _details(self, manifest: Manifest) -> dict[str, Any]:
        from ember.store.info import describe_files

        try:
            return describe_files(manifest.format, {k: self.blob_path(v.digest) for k, v in manifest.files.items()})
        except Exception as err:  # details are a convenience for `ember ls`; never fail a pull on them
            log.debug("cannot describe %s: %s", manifest.name, err)
            return {}

    def _write_manifest(self, ref: ModelRef, manifest: Manifest) -> None:
        target = self.manifest_path(ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix="manifest-", suffix=".partial", dir=self.tmp)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(manifest.to_json(), out, indent=2)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, target)
            _fsync_dir(target.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def exists(self, name: str) -> bool:
        return self.manifest_path(name).is_file()

    def get(self, name: str | ModelRef) -> Manifest:
        ref = self._ref(name)
        path = self.manifest_path(ref)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelLoadError(f"model {ref.store_name!r} is not in the store ({self.root})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"{path}: unreadable manifest ({err})") from None
        manifest = Manifest.from_json(data, str(path))
        manifest.name = ref.store_name
        return manifest

    def list(self) -> list[Manifest]:
        found = []
        if not self.manifests.is_dir():
            return found
        for family in sorted(self.manifests.iterdir()):
            if not family.is_dir() or family.is_symlink():
                continue
            for path in sorted(family.glob("*.json")):
                try:
                    found.append(self.get(f"{family.name}:{path.stem}"))
                except ModelLoadError as err:
                    log.debug("skipping %s: %s", path, err)
        return found

    def tags(self, family: str) -> list[str]:
        folder = self.manifests / family
        if "/" in family or ".." in family or not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.json"))

    def find_by_source(self, repo: str, variant: str | None = None) -> list[Manifest]:
        """Store models pulled from Hugging Face repo `repo` (and the given quantization/file, if any)."""
        hits = []
        for manifest in self.list():
            src = manifest.source
            if str(src.get("repo", "")).lower() != repo.lower():
                continue
            if variant is not None:
                wanted = variant.lower()
                names = [str(src.get("file", "")).lower()] + [f.lower() for f in manifest.files]
                quant = str(manifest.details.get("quant") or src.get("quant") or "").lower()
                if wanted != quant and wanted not in names:
                    continue
            hits.append(manifest)
        return hits

    # ---- what loaders open -------------------------------------------------------------------------

    def path_for(self, name: str | ModelRef) -> Path:
        """The GGUF file, or the checkpoint folder, of a stored model (links to blobs under real names)."""
        ref = self._ref(name)
        manifest = self.get(ref)
        view = self.view_path(ref)
        if not self._view_ok(view, manifest):
            with self._lock():
                manifest = self.get(ref)
                if not self._view_ok(view, manifest):  # another process may have built it meanwhile
                    self._build_view(view, manifest)
        if manifest.format == "gguf":
            (fname,) = [f for f in manifest.files if f.lower().endswith(".gguf")]
            return view / fname
        return view

    def _view_ok(self, view: Path, manifest: Manifest) -> bool:
        for fname, info in manifest.files.items():
            path = view / fname
            try:
                if path.stat().st_size != info.size or not path.samefile(self.blob_path(info.digest)):
                    return False
            except OSError:
                return False
        return True

    def _build_view(self, view: Path, manifest: Manifest) -> None:
        self._remove_tree(view)
        staging = Path(tempfile.mkdtemp(prefix="view-", dir=self.tmp))
        try:
            for fname, info in manifest.files.items():
                blob = self.blob_path(info.digest)
                if not blob.is_file():
                    raise ModelLoadError(f"{manifest.name}: blob for {fname} is missing from the store")
                target = staging / fname
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(blob, target)
                except OSError:
                    os.symlink(blob, target)
            view.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, view)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _clear_view(self, ref: ModelRef) -> None:
        self._remove_tree(self.view_path(ref))

    def _remove_tree(self, path: Path) -> None:
        self._inside(path)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)

    # ---- removal -----------------------------------------------------------------------------------

    def remove(self, name: str) -> Manifest:
        """Delete a model's manifest, its view, and the blobs no other manifest uses."""
        refuse_reserved(name, "removed")
        ref = self._ref(name)
        manifest = self.get(ref)
        with self._lock():
            self.manifest_path(ref).unlink()
            self._clear_view(ref)
            for folder in (self.manifests / ref.family, self.models / ref.family):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            self._collect([f.digest for f in manifest.files.values()])
        return manifest

    def copy(self, src: str, dst: str) -> Manifest:
        """Register `dst` as another name for `src` (same blobs, nothing copied)."""
        refuse_reserved(dst, "copied onto")
        source = self.get(src)
        dst_ref = self._ref(dst)
        if self.exists(dst_ref.store_name):
            raise ModelLoadError(f"model {dst_ref.store_name!r} already exists; remove it first")
        manifest = Manifest(dst_ref.store_name, source.format, dict(source.files), dict(source.source), time.time(),
                            dict(source.details))
        manifest.source.setdefault("copied_from", source.name)
        with self._lock():
            self._write_manifest(dst_ref, manifest)
        return manifest

    def referenced_digests(self) -> set[str]:
        return {f.digest for m in self.list() for f in m.files.values()}

    def collect_garbage(self, only: list[str] | None = None) -> list[str]:
        """Delete blobs no manifest lists (all of them, or only those in `only`) and stale temp files."""
        with self._lock():
            if only is None:
                only = [p.name.removeprefix("sha256-") for p in self.blobs.glob("sha256-*")]
                for stale in self.tmp.iterdir():
                    if time.time() - stale.lstat().st_mtime > 24 * 3600:
                        self._remove_tree(stale)
            return self._collect(only)

    def _collect(self, digests: list[str]) -> list[str]:
        used = self.referenced_digests()
        removed = []
        for digest in dict.fromkeys(digests):
            if digest in used:
                continue
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()
                removed.append(digest)
        return removed


def _copy_hashing(source: str | Path | IO[bytes], fd: int) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out:
        with _open_source(source) as src:
            while chunk := src.read(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return hasher.hexdigest(), size


def hash_file(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


@contextlib.contextmanager
def _open_source(source: str | Path | IO[bytes]) -> Iterator[IO[bytes]]:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            yield fh
    else:
        yield source
