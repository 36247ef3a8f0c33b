"""`ember pull org/repo[:QUANT|:file.gguf]`: download a model from Hugging Face into the store.

GGUF repos: the file whose name holds the quantization tag (Q4_K_M first when none is given); repos without
GGUF files: the transformers checkpoint (config, tokenizer, safetensors). Files come through
`huggingface_hub.hf_hub_download` (its cache, its lock per file, its progress bars), are checked against the
repo's LFS SHA-256 and sizes, then added to the store; the manifest is written last, so a failed or
interrupted pull registers nothing and leaves no partial blobs behind. A pull that cannot fit on the disk is
refused before it downloads; one killed mid-download starts that file again on the next pull
(docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ModelLoadError
from ember.store.info import quant_from_filename
from ember.store.names import STORE_NAME, parse_ref, parse_store_name
from ember.store.store import BlobInfo, Manifest, ModelStore

log = logging.getLogger(__name__)

PREFERRED_QUANT = "Q4_K_M"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                    "*.safetensors", "model.safetensors.index.json", "README.md", "LICENSE", "LICENSE.txt",
                    "LICENSE.md")
LICENSE_FILES = ("README.md", "LICENSE", "LICENSE.txt", "LICENSE.md")
MAX_LICENSE_BYTES = 1 << 20
SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path in the repo
    size: int | None
    sha256: str | None  # LFS files only


def _remote_files(api, repo: str, revision: str | None) -> tuple[str | None, list[RemoteFile]]:
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
    except Exception as err:  # huggingface_hub raises many kinds (404, offline, gated, ...)
        raise ModelLoadError(f"cannot list Hugging Face repo {repo!r}: {_short(err)}") from None
    files = []
    for sibling in info.siblings or []:
        lfs = getattr(sibling, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        if isinstance(lfs, dict):
            sha = lfs.get("sha256")
        size = getattr(sibling, "size", None)
        files.append(RemoteFile(sibling.rfilename, int(size) if size is not None else None, sha))
    return getattr(info, "sha", None), files


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def available_quants(ggufs: list[RemoteFile]) -> list[str]:
    return sorted({quant_from_filename(f.name) or f.name.rsplit("/", 1)[-1] for f in ggufs})


def pick_gguf(ggufs: list[RemoteFile], variant: str | None, repo: str) -> RemoteFile:
    """The GGUF for `variant` (a quantization tag or a file name); without one, Q4_K_M, the smallest Q4, or
    the only file."""
    listing = ", ".join(available_quants(ggufs))
    if variant is not None:
        wanted = variant.lower()
        if wanted.endswith(".gguf"):
            hits = [f for f in ggufs if f.name.lower() == wanted or f.name.rsplit("/", 1)[-1].lower() == wanted]
            if len(hits) == 1:
                return hits[0]
            raise ModelLoadError(f"{repo} has no file {variant!r}; quantizations: {listing}")
        exact = [f for f in ggufs if (quant_from_filename(f.name) or "").lower() == wanted]
        hits = exact or [f for f in ggufs if wanted in f.name.rsplit("/", 1)[-1].lower()]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise ModelLoadError(f"{repo} has no {variant} GGUF; available: {listing}")
        names = ", ".join(f.name for f in hits)
        raise ModelLoadError(f"{variant!r} is ambiguous in {repo} ({names}); name the file as {repo}:FILE.gguf")
    preferred = [f for f in ggufs if (quant_from_filename(f.name) or "") == PREFERRED_QUANT]
    if len(preferred) == 1:
        return preferred[0]
    q4 = [f for f in ggufs if (quant_from_filename(f.name) or "").startswith(("Q4", "IQ4"))]
    if q4:
        return min(q4, key=lambda f: (f.size or 0, f.name))
    if len(ggufs) == 1:
        return ggufs[0]
    raise ModelLoadError(f"{repo} has several GGUF files; pick one with {repo}:QUANT (available: {listing})")


def checkpoint_files(files: list[RemoteFile], repo: str) -> list[RemoteFile]:
    top = [f for f in files if "/" not in f.name]
    chosen = [f for f in top if any(fnmatch.fnmatch(f.name, pattern) for pattern in CHECKPOINT_FILES)]
    names = {f.name for f in chosen}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise ModelLoadError(f"{repo} has neither GGUF files nor a safetensors checkpoint (config.json + "
                             "*.safetensors)")
    return chosen


def default_name(repo: str, variant: str | None) -> str:
    family = repo.split("/", 1)[1].lower()
    tag = (variant or "latest").lower().removesuffix(".gguf")
    name = f"{family}:{tag}"
    if not STORE_NAME.match(name) or ".." in name:
        raise ModelLoadError(f"cannot make a store name from {repo}:{tag}; give one with --name")
    return name


def pull(ref: str, store: ModelStore | None = None, *, name: str | None = None, revision: str | None = None,
         progress: bool = True, echo: Callable[[str], None] | None = None,
         report: Callable[[dict], None] | None = None) -> Manifest:
    """Download `ref` (`org/repo[:QUANT|:file.gguf]`) into the store; returns the written manifest.

    `report` receives Ollama's pull progress objects as the work happens: per file {"status": "pulling X",
    "digest", "total", "completed"} before and after its download, {"status": "verifying sha256 digest"} right
    before the file is hashed and compared with the repo's LFS SHA-256 (files without one: "verifying size"),
    then {"status": "writing manifest"}."""
    tell = report or (lambda event: None)
    import huggingface_hub

    parsed = parse_ref(ref, allow_paths=False)
    if parsed.kind != "hf":
        raise ModelLoadError(f"ember pull needs a Hugging Face repo id like org/repo or org/repo:Q4_K_M, not {ref!r}")
    store = store or ModelStore()
    target = parse_store_name(name) if name else None
    say = echo or ((lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None))
    repo = parsed.repo
    commit, files = _remote_files(huggingface_hub.HfApi(), repo, revision)
    ggufs = [f for f in files if f.name.lower().endswith(".gguf") and "mmproj" not in f.name.lower()
             and not SPLIT_GGUF.search(f.name)]
    if ggufs or (parsed.variant and any(f.name.lower().endswith(".gguf") for f in files)):
        if not ggufs:
            raise ModelLoadError(f"{repo} has only split or projector GGUF files, which ember cannot load")
        chosen = pick_gguf(ggufs, parsed.variant, repo)
        # the repo's README/LICENSE (small) too: `ember show` reads the license from them
        wanted = [chosen] + [f for f in files if f.name in LICENSE_FILES and (f.size or 0) < MAX_LICENSE_BYTES]
        variant = quant_from_filename(chosen.name) or chosen.name.rsplit("/", 1)[-1]
        fmt = "gguf"
    else:
        if parsed.variant:
            raise ModelLoadError(f"{repo} has no GGUF files; pull it without ':{parsed.variant}'")
        wanted = checkpoint_files(files, repo)
        variant = None
        fmt = "safetensors"
    store_name = target.store_name if target else default_name(repo, variant)
    total = sum(f.size or 0 for f in wanted)
    say(f"pulling {repo}{'@' + commit[:12] if commit else ''}: {len(wanted)} file(s), {total / 1e6:.1f} MB "
        f"→ {store_name}")

    _check_free_space(repo, commit or revision, wanted, store)

    added: list[str] = []
    infos: dict[str, BlobInfo] = {}
    try:
        with _progress_bars(progress), warnings.catch_warnings():
            # checked above, in one line; huggingface_hub would add a two-line warning of its own
            warnings.filterwarnings("ignore", message="Not enough free disk space")
            for remote in wanted:
                pulling = {"status": f"pulling {remote.sha256[:12] if remote.sha256 else remote.name}",
                           **({"digest": f"sha256:{remote.sha256}"} if remote.sha256 else {}),
                           **({"total": remote.size} if remote.size is not None else {})}
                tell({**pulling, "completed": 0})
                try:
                    local = huggingface_hub.hf_hub_download(repo, remote.name, revision=commit or revision)
                except Exception as err:
                    raise ModelLoadError(f"download of {repo}/{remote.name} failed: {_short(err)}") from None
                _drop_abandoned_downloads(local)
                tell({**pulling, "completed": remote.size if remote.size is not None else os.path.getsize(local)})
                tell({"status": "verifying sha256 digest" if remote.sha256 else "verifying size",
                      **({"digest": pulling["digest"]} if remote.sha256 else {})})
                local_name = remote.name.rsplit("/", 1)[-1]
                try:
                    info = store.add_file(local_name, local, expected_sha256=remote.sha256,
                                          expected_size=remote.size, link=True)
                except OSError as err:  # a full disk, most likely: say where, in one line
                    raise ModelLoadError(f"cannot store {local_name} in {store.root}: "
                                         f"{err.strerror or _short(err)}") from None
                added.append(info.digest)
                infos[local_name] = info
        source = {"type": "huggingface", "repo": repo, "revision": commit, "format": fmt}
        if fmt == "gguf":
            source["file"] = wanted[0].name
            source["quant"] = variant
        tell({"status": "writing manifest"})
        manifest = store.register(store_name, infos, source)
    except BaseException:
        store.collect_garbage(only=added)
        raise
    say(f"pulled {store_name} ({manifest.size / 1e6:.1f} MB)")
    return manifest


def _check_free_space(repo: str, revision: str | None, wanted: list[RemoteFile], store: ModelStore) -> None:
    """Refuse before downloading when the files cannot fit: in the Hugging Face cache, and in the store too
    when it is on another file system (then files are copied, not hard-linked)."""
    import huggingface_hub
    from huggingface_hub import constants

    missing = sum(f.size or 0 for f in wanted
                  if not isinstance(huggingface_hub.try_to_load_from_cache(repo, f.name, revision=revision), str))
    cache = _existing_parent(Path(constants.HF_HUB_CACHE))
    places = [cache]
    store_dir = _existing_parent(store.root)
    if store_dir.stat().st_dev != cache.stat().st_dev:
        places.append(store_dir)
    for place in places:
        free = shutil.disk_usage(place).free
        if missing > free:
            raise ModelLoadError(f"not enough disk space to pull {repo}: {missing / 1e6:.1f} MB needed in {place}, "
                                 f"{free / 1e6:.1f} MB free")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _drop_abandoned_downloads(local: str) -> None:
    """Delete the partial downloads of this file that killed pulls left in the Hugging Face cache.

    huggingface_hub (1.x) downloads into `<blob>.<random>.incomplete` and deletes it when the download fails,
    but a process killed with SIGKILL leaves it, one more per kill. Now that the blob is complete, such files
    are abandoned unless another process is downloading this blob right now, and that one holds
    huggingface_hub's lock for the blob: only with that lock free are they deleted.
    """
    from filelock import FileLock, Timeout

    blob = Path(local).resolve()
    leftovers = list(blob.parent.glob(f"{glob.escape(blob.name)}.*.incomplete"))
    if not leftovers:
        return
    repo_folder = blob.parent.parent  # <cache>/models--org--name/blobs/<etag>
    lock = repo_folder.parent / ".locks" / repo_folder.name / f"{blob.name}.lock"
    try:
        with FileLock(lock, timeout=0):
            for leftover in leftovers:
                leftover.unlink(missing_ok=True)
    except (Timeout, OSError):
        pass  # in use, or not ours to delete: the next pull tries again


@contextlib.contextmanager
def _progress_bars(show: bool):
    if show:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
