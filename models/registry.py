"""The model registry: one numbered folder per training run, written atomically.

    <registry>/<version>/
        manifest.json           version, created_at, data fingerprint, config, metrics, features
        query_tower/            Keras SavedModel of the candidate generator's query tower
        query_tower.json        {"version": N}
        item_tower/             Keras SavedModel of its item tower (serving signature only; not exported): the
                                checklist re-embeds catalog items with it to verify the index's vectors
                                (the manifest's item_tower; versions trained before it lack both)
        item_index.faiss/.json  ANN index over the item embeddings of the same run
        light_ranker/           Keras SavedModel of the light DCN ranker
        heavy_ranker/           Keras SavedModel of the multi-task heavy DCN ranker (its first member)
        heavy_ranker_<i>/       the further members of an ensemble (the manifest's heavy_ranker.members)
        user_features.parquet   encoded user features + raw id (the online store is built from it)
        item_features.parquet   encoded item features + raw id
        item_aliases.parquet    (item_id_raw, canonical_item_id_raw) of every duplicate id: what a
                                request, live event or takedown naming the other copy means
        user_history.parquet    (user_id_raw, item_id_raw) seen in training (the "already seen" filter)
        fallback_history.parquet  the same for the users workflow.active_users dropped: not trained on,
                                served by the fallback, which skips what they have seen (older
                                versions lack it)
        recent_events.parquet   (user_id, timestamp, click): each user's events in the longest activity
                                window before the end of the training data (windowed activity features)
        popularity.parquet      the fallback ranking (raw item id, score)
        item_affinity.npy/.json EASE item-item weights over encoded ids (absent when the manifest's
                                item_affinity is null: a catalog above item_affinity.max_items)

A version the retraining run refused (its gate, or the checklist of its export) holds
``refused.json`` (the reason): ``latest`` passes it over, so a script run without ``--version`` never
exports or rolls out a candidate the run said no to; ``get`` with its number still opens it.

Versions are integers because Triton's model versions are. A version folder appears only once
complete (built under a temporary name, every file and folder in it synced to disk, then renamed,
the rename synced too), so a reader never sees half a run, not even after a power cut or a kernel
crash right after the rename. A run killed while writing (SIGKILL, out of memory, a power cut)
leaves its temporary folder; the next run on the same host removes it (``remove_abandoned``: only
a folder whose writer's lock is free, never one a live run writes).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ITEM_TOWER = "item_tower"  # the candidate generator's item tower (the checklist's index_vectors; not served)
REFUSED = "refused.json"


@dataclass
class ModelVersion:
    path: Path

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def version(self) -> int:
        return int(self.manifest["version"])


def list_versions(registry: str | Path) -> list[int]:
    root = Path(registry)
    if not root.exists():
        return []
    # Only the names ``get`` and ``latest`` open: "007" would list as 7 and "²" passes isdigit.
    return sorted(
        int(p.name) for p in root.iterdir() if re.fullmatch(r"0|[1-9][0-9]*", p.name) and (p / MANIFEST).exists()
    )


def _require_folder(registry: str | Path) -> None:
    """A registry that is a file: FileNotFoundError, which the scripts report as an error of their
    --registry (listdir's NotADirectoryError was a traceback)."""
    if Path(registry).exists() and not Path(registry).is_dir():
        raise FileNotFoundError(f"registry {registry} is a file, not a model registry folder")


def latest(registry: str | Path) -> ModelVersion:
    """The highest version the retraining run did not refuse (``refuse``)."""
    _require_folder(registry)
    versions = list_versions(registry)
    if not versions:
        raise FileNotFoundError(f"no model version in registry {registry}")
    kept = [v for v in versions if refusal(Path(registry) / str(v)) is None]
    if not kept:
        raise FileNotFoundError(f"every model version in registry {registry} was refused: {versions}; name one")
    if kept[-1] != versions[-1]:
        log.warning(
            "registry %s: the latest version not refused is %d (refused: %s)",
            registry,
            kept[-1],
            [v for v in versions if v > kept[-1]],
        )
    return ModelVersion(Path(registry) / str(kept[-1]))


def refuse(registry: str | Path, version: int, reason: str) -> None:
    """Record that ``version`` was refused (``reason``): ``latest`` passes it over from now on."""
    path = get(registry, version).path
    tmp = path / f".{REFUSED}.tmp"
    tmp.write_text(json.dumps({"reason": reason, "refused_at": time.time()}))
    os.replace(tmp, path / REFUSED)  # a reader sees the whole record or none


def clear_refusal(registry: str | Path, version: int) -> None:
    """Undo ``refuse``: the version passed after all (a later run's gate and export)."""
    (get(registry, version).path / REFUSED).unlink(missing_ok=True)


def refusal(path: str | Path) -> str | None:
    """Why the version at ``path`` was refused, or None."""
    try:
        return json.loads((Path(path) / REFUSED).read_text()).get("reason", "refused")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # unreadable: a refusal all the same, not a pass
        return "refused (unreadable record)"


def get(registry: str | Path, version: int | None = None) -> ModelVersion:
    if version is None:
        return latest(registry)
    _require_folder(registry)
    path = Path(registry) / str(int(version))
    if not (path / MANIFEST).exists():
        raise FileNotFoundError(f"model version {version} not found in {registry}")
    return ModelVersion(path)


def check_artifact_versions(model: ModelVersion) -> int:
    """Refuse a version whose query tower, item index and item affinity do not come from the same
    training run.

    A query embedding is only meaningful against item embeddings of the same run, and affinity
    weights only against the encoded ids of the run's catalog; a copied or hand-assembled version
    folder could pair them wrongly. Raises ``VersionMismatchError``; ``IndexIntegrityError`` (one)
    where the item index file is not the one its ``item_index.json`` records (SHA-256, when recorded):
    the version stamp lives in the JSON, so another run's index file beside it carried this stamp.
    """
    from models.item_affinity import META_FILE as AFFINITY_META_FILE
    from models.item_index import INDEX_META_FILE, IndexIntegrityError, check_versions, index_file_problem

    stamps = {"manifest": model.version}
    stamped = [("query_tower", "query_tower.json"), ("item_index", INDEX_META_FILE)]
    if model.manifest.get("item_affinity"):
        stamped.append(("item_affinity", AFFINITY_META_FILE))
    for name, file in stamped:
        path = model.path / file
        if not path.exists():
            raise FileNotFoundError(f"model version {model.version} has no {file}")
        stamps[name] = int(json.loads(path.read_text())["version"])
    version = check_versions(**stamps)
    meta = json.loads((model.path / INDEX_META_FILE).read_text())
    if "sha256" in meta and (problem := index_file_problem(model.path, meta)):
        raise IndexIntegrityError(f"model version {model.version}: {problem}")
    return version


def fingerprint(*paths: str | Path) -> str:
    """SHA-256 over the bytes of every file under ``paths`` (sorted), to tie a model to its data."""
    digest = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            if f.is_file():
                # Each name and content length-prefixed: back to back, a name's end and its bytes'
                # start (or one file and the next) could shift without changing the digest.
                for part in (f.relative_to(root.parent).as_posix().encode(), f.read_bytes()):
                    digest.update(len(part).to_bytes(8, "big"))
                    digest.update(part)
    return digest.hexdigest()[:16]


# fsync's answer where the file system keeps nothing to sync (some network and FUSE mounts): not a failed write.
_NO_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def sync_path(path: str | Path, folder: bool = False) -> None:
    """``fsync`` a file or folder: its data (a folder's: its entries) on disk before this returns.

    With ``sync_tree``, what everything that publishes a folder with a rename uses (a registry version
    here; the Triton repository, its added versions and router versions in ``deployment/``): the
    folder's tree synced before the rename, the folder it lands in after it."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    except OSError:
        if folder:  # a platform that cannot open folders
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_SYNC:
            raise
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """Every file and folder under ``root`` (``root`` included) synced to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            sync_path(os.path.join(folder, name))
        sync_path(folder, folder=True)


OWNER = ".owner.json"  # in a version's temporary folder while a run writes it: {"host", "pid"}


def lock_folder(path: str | Path, wait: bool = False) -> int | None:
    """An open fd of folder ``path`` holding an exclusive flock on it (no lock file beside it); closing
    the fd releases it, and so does the kernel when the holder dies, SIGKILL included. Without
    ``wait``, None when another process holds it. A file system without flock (NFS emulates it with
    write locks, which a read-only fd cannot take) raises OSError, the fd closed. The registry's
    version writers, the retraining runner and the exports (``deployment.export.exclusive``) lock
    with it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_abandoned(registry: str | Path) -> list[Path]:
    """Remove the temporary folders (``.v<N>.tmp``) of runs that were killed (SIGKILL, out of memory,
    a power cut) before they published or cleaned up; return them.

    A folder is removed only if its ``.owner.json`` names this host and no process holds its lock:
    every ``VersionWriter`` holds one from before it writes that record until the folder is published
    or removed. A folder without the record (a run killed in between, or one of an older version of
    this code), one of another host (a shared file system whose locks may not reach across hosts),
    or one on a file system without flock stays, as does any folder a live run writes."""
    removed = []
    for path in Path(registry).iterdir():
        if not re.fullmatch(r"\.v[0-9]+\.tmp", path.name) or path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = lock_folder(path)
        except OSError:  # gone meanwhile, or no flock here
            continue
        if fd is None:  # a live run writes it
            continue
        try:
            owner = json.loads((path / OWNER).read_text())
            if owner.get("host") != socket.gethostname():
                continue
            log.warning(
                "removing %s, left by a run that did not finish (pid %s on %s)", path, owner.get("pid"), owner["host"]
            )
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except (OSError, ValueError, AttributeError):  # no record, or unreadable: not known to be abandoned
            continue
        finally:
            os.close(fd)
    return removed


class VersionWriter:
    """Context manager that reserves the next version and publishes it atomically on success."""

    def __init__(self, registry: str | Path):
        self.registry = Path(registry)
        self.registry.mkdir(parents=True, exist_ok=True)
        # After every published and every reserved number: a number freed by a failed run while a later
        # one still trains would otherwise go to a run that starts now, publishing below that one.
        reserved = [int(m[1]) for p in self.registry.iterdir() if (m := re.fullmatch(r"\.v([0-9]+)\.tmp", p.name))]
        version = max(list_versions(self.registry) + reserved, default=0) + 1
        # The number is reserved by creating its temporary folder (mkdir is atomic and exclusive), so
        # two runs writing at once never get the same one: the second found the first's folder, or
        # (once the first had published) its version, and took the next number. A folder left by a
        # killed run keeps its number reserved until a later run (above it) removes the folder.
        while True:
            tmp = self.registry / f".v{version}.tmp"
            try:
                os.mkdir(tmp)
            except FileExistsError:
                version += 1
                continue
            if (self.registry / str(version)).exists():  # published while we looked
                os.rmdir(tmp)
                version += 1
                continue
            break
        self.version, self.tmp = version, tmp
        # Held until the folder is published or removed: ``remove_abandoned`` never takes a live run's
        # folder. Only then the owner record, so a folder with one and no lock held is a dead run's.
        try:
            self._lock = lock_folder(tmp)  # nobody else knows the folder yet, or takes one without a record
        except OSError as err:
            self._lock = None
            log.debug("no lock on %s (%s): a killed run's folder will stay", tmp, err)
        if self._lock is not None:
            self._unlock = weakref.finalize(self, os.close, self._lock)  # a writer dropped unused frees it
            (tmp / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        else:
            self._unlock = None
        remove_abandoned(self.registry)  # all below this number: none is reused while this run holds it

    def _release(self) -> None:
        if self._unlock is not None:
            self._unlock()  # closes the fd once, dropping the lock

    def __enter__(self) -> VersionWriter:
        return self

    def write_manifest(self, **fields) -> None:
        manifest = {"version": self.version, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        manifest.update(fields)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._publish(exc_type)
        finally:
            self._release()

    def _publish(self, exc_type) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if not (self.tmp / MANIFEST).exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise RuntimeError("a model version must have a manifest before it is published")
        (self.tmp / OWNER).unlink(missing_ok=True)  # not part of the version
        # On disk before the rename publishes it: a crash (power cut) soon after the rename otherwise
        # left a version whose manifest and models are empty or cut short (the kernel writes file
        # data back later, the rename's metadata may reach the disk first), which ``latest``, the
        # export and a retraining run resuming after its durable train marker all accepted.
        sync_tree(self.tmp)
        final = self.registry / str(self.version)
        os.rename(self.tmp, final)  # atomic on one filesystem; fails if the version exists
        sync_path(self.registry, folder=True)  # and the rename itself
        self.path = final
