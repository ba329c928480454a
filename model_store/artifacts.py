"""The artifact store: what a cluster's replicas serve, at a URI every node reaches.

On one machine every process reads the home. On a cluster no node may assume it
sees another's files, so what the serving path reads is *published* to a store
(RANKGATE_STORE: `s3://bucket/prefix`, `gs://bucket/prefix` or `file:///path`,
read and written through fsspec) and each replica fetches it into a node-local
cache (RANKGATE_CACHE), checking every file against its sha256:

    <store>/home.json                      the home's namespace (Redis keys, Feast project)
    <store>/feast/registry.db              the Feast registry; Feast reads it there itself
    <store>/data/serving.json              the tables the serving path reads, with sha256
    <store>/data/<role><suffix>            ...the catalogue's source, the interaction log
    <store>/models/<name>/<version>/       a model version; manifest.json written last

The cache is a home of its own (`<cache>/<digest of the URI>/`) with the same layout,
so the serving code reads it as it reads a home. Model files are checked against
the manifest's `artifacts`; a version is renamed into the cache only once every
file matches, so a replica never loads half a version or a corrupted one.
Published versions are immutable, as in the home: publishing a version whose
manifest differs from the stored one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store.manifest import MANIFEST_FILE
from model_store.store import ModelStore, check_version_name, sha256_file
from rankgate.core.errors import ModelStoreError, RankgateError, VersionExists
from rankgate.core.home import Home

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

SERVING_FILES = "serving.json"
"""Index of `data/`: role -> {name, sha256}."""


class StoreError(RankgateError):
    """The artifact store is unreachable, incomplete or holds a file whose sha256 is wrong."""

    status_code = 503


class ArtifactStore:
    """One store URI, opened through fsspec."""

    def __init__(self, uri: str) -> None:
        import fsspec

        self.uri = uri.rstrip("/")
        try:
            # A folder store creates its folders on write, as object stores do.
            options = {"auto_mkdir": True} if self.uri.startswith("file://") else {}
            fs, root = fsspec.core.url_to_fs(self.uri, **options)
        except (ImportError, ValueError) as exc:
            scheme = self.uri.split("://", 1)[0]
            extra = {"s3": "s3", "gs": "gcs"}.get(scheme)
            hint = f" (pip install 'rankgate[{extra}]')" if extra else ""
            raise StoreError(f"RANKGATE_STORE {self.uri!r}: {exc}{hint}") from exc
        self.fs: AbstractFileSystem = fs
        self.root: str = root.rstrip("/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @property
    def registry_path(self) -> str:
        """The Feast registry's path as Feast takes it (object stores: the URI)."""
        if self.uri.startswith("file://"):
            return self._path("feast", "registry.db")
        return f"{self.uri}/feast/registry.db"

    def has_registry(self) -> bool:
        return self._exists(self._path("feast", "registry.db"))

    def cache_home(self, cache: Path) -> Home:
        """This store's folder in a node's cache, laid out as a home."""
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        root = cache / digest
        root.mkdir(parents=True, exist_ok=True)
        return Home(root)

    # --- reading and writing single objects --------------------------------------

    def _exists(self, path: str) -> bool:
        try:
            return bool(self.fs.exists(path))
        except Exception as exc:
            raise StoreError(f"{self.uri}: cannot reach the store ({exc})") from exc

    def _read(self, path: str) -> bytes | None:
        """An object's bytes; None when it does not exist."""
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StoreError(f"{self.uri}: cannot read {path} ({exc})") from exc

    def _write(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(path, data)
        except Exception as exc:
            raise StoreError(f"{self.uri}: cannot write {path} ({exc})") from exc

    def _upload(self, local: Path, path: str) -> None:
        try:
            self.fs.put_file(str(local), path)
        except Exception as exc:
            raise StoreError(f"{self.uri}: cannot write {path} ({exc})") from exc

    def _download(self, path: str, target: Path, sha256: str) -> None:
        """`path` into `target` (atomically), or StoreError when its sha256 is not `sha256`."""
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=".fetch-", dir=target.parent)
        os.close(handle)
        try:
            try:
                self.fs.get_file(path, partial)
            except FileNotFoundError as exc:
                raise StoreError(f"{self.uri}: {path} is missing") from exc
            except Exception as exc:
                raise StoreError(f"{self.uri}: cannot read {path} ({exc})") from exc
            actual = sha256_file(Path(partial))
            if actual != sha256:
                raise StoreError(
                    f"{self.uri}: {path} has sha256 {actual[:12]}…, expected {sha256[:12]}…"
                )
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)

    # --- the home's namespace, the registry and the serving tables ----------------

    def publish_home(self, home: Home) -> None:
        """home.json: replicas use the home's namespace for every Redis key."""
        namespace = home.namespace  # creates home.json when the home is new
        self._write(self._path("home.json"), (json.dumps({"namespace": namespace}) + "\n").encode())

    def fetch_home(self, cache: Home) -> None:
        data = self._read(self._path("home.json"))
        if data is None:
            raise StoreError(f"{self.uri}: no home.json; publish to it first (`rankgate publish`)")
        target = cache.root / "home.json"
        if not target.exists() or target.read_bytes() != data:
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            partial.write_bytes(data)
            os.replace(partial, target)

    def publish_registry(self, registry: Path) -> None:
        """A home's file registry, copied to where Feast reads it on the cluster."""
        self._upload(registry, self._path("feast", "registry.db"))

    def publish_files(self, files: Mapping[str, Path]) -> dict[str, str]:
        """Upload the serving tables (role -> local file) and their index; role -> sha256."""
        index: dict[str, dict[str, str]] = {}
        for role, local in sorted(files.items()):
            if not local.is_file():
                raise StoreError(f"{local}: file not found (the {role} the serving path reads)")
            name = role + "".join(local.suffixes)
            sha256 = sha256_file(local)
            self._upload(local, self._path("data", name))
            index[role] = {"name": name, "sha256": sha256}
        self._write(
            self._path("data", SERVING_FILES), (json.dumps(index, indent=2) + "\n").encode()
        )
        return {role: entry["sha256"] for role, entry in index.items()}

    def fetch_files(self, cache: Home) -> dict[str, Path]:
        """The serving tables in the cache's data folder (fetched when missing or
        different); role -> local path."""
        data = self._read(self._path("data", SERVING_FILES))
        if data is None:
            raise StoreError(f"{self.uri}: no data/{SERVING_FILES}; publish to it first")
        index: dict[str, dict[str, str]] = json.loads(data)
        files = {}
        for role, entry in index.items():
            target = cache.data_dir / entry["name"]
            if not (target.is_file() and sha256_file(target) == entry["sha256"]):
                self._download(self._path("data", entry["name"]), target, entry["sha256"])
            files[role] = target
        return files

    # --- model versions ----------------------------------------------------------

    def _version_path(self, name: str, version: str, *parts: str) -> str:
        return self._path("models", name, check_version_name(version), *parts)

    def publish_version(self, models: ModelStore, version: str) -> bool:
        """Upload a version of the home's model store, manifest last; False when the
        store already holds exactly it. VersionExists when it holds another version
        of that name."""
        folder = models.path(version)
        manifest = (folder / MANIFEST_FILE).read_bytes()
        stored = self._read(self._version_path(models.name, version, MANIFEST_FILE))
        if stored == manifest:
            return False
        if stored is not None:
            raise VersionExists(
                f"model version {version!r} already exists in {self.uri} with another "
                "manifest; choose a new version (registered versions are immutable)"
            )
        for name in _artifacts(manifest, folder / MANIFEST_FILE):
            self._upload(folder / name, self._version_path(models.name, version, name))
        self._write(self._version_path(models.name, version, MANIFEST_FILE), manifest)
        return True

    def fetch_versions(self, models: ModelStore, versions: Iterable[str]) -> None:
        """`fetch_version` of each (those the store lacks stay unknown to `models`)."""
        for version in versions:
            self.fetch_version(models, version)

    def fetch_version(self, models: ModelStore, version: str) -> bool:
        """Make `models` (a cache's model store) hold the version as published: every
        file checked against the manifest's sha256. False when the store lacks it."""
        manifest = self._read(self._version_path(models.name, version, MANIFEST_FILE))
        if manifest is None:
            return False
        target = models.path(version)
        artifacts = _artifacts(manifest, Path(self._version_path(models.name, version)))
        if _holds(target, manifest, artifacts):
            return True
        staging = models.staging_dir()
        try:
            for name, sha256 in artifacts.items():
                self._download(
                    self._version_path(models.name, version, name), staging / name, sha256
                )
            (staging / MANIFEST_FILE).write_bytes(manifest)
            if target.exists():  # a stale or damaged copy: replaced whole
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(staging, target)
            except OSError:
                if not _holds(target, manifest, artifacts):  # another replica's copy
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True


def _artifacts(manifest: bytes, where: Path) -> dict[str, str]:
    try:
        payload: dict[str, Any] = json.loads(manifest)
        artifacts = payload["artifacts"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelStoreError(f"{where}: no readable 'artifacts' ({exc})") from exc
    for name in artifacts:
        if "/" in name or name in {"", ".", ".."}:
            raise ModelStoreError(f"{where}: field 'artifacts': {name!r} is not a file name")
    return dict(artifacts)


def _holds(folder: Path, manifest: bytes, artifacts: Mapping[str, str]) -> bool:
    """The cached copy of a version is exactly the published one."""
    path = folder / MANIFEST_FILE
    if not path.is_file() or path.read_bytes() != manifest:
        return False
    return all(
        (folder / name).is_file() and sha256_file(folder / name) == sha256
        for name, sha256 in artifacts.items()
    )
