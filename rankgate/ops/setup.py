"""`rankgate setup` and the environment the CLI commands share.

Setup follows the sources: it records a sha256 of each file of the project (and
a fingerprint of the pseudonymisation key, which the prepared tables depend on)
in `<home>/setup.json`, and redoes the data steps (prepare, Feast apply,
materialize) when any of them changed, naming what changed. Markers of steps
whose result lives in Redis are kept in Redis itself (`<namespace>:setup:*`,
holding the sources' digest), so a wiped or different Redis is set up again
while a kept one is not. Registered model versions are immutable: a setup model
trained from other sources is kept and setup says so; `--force` retrains it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from rankgate.core import redis_keys
from rankgate.core.errors import ConfigError, ModelStoreError, RankgateError
from rankgate.core.home import Home
from rankgate.core.project import ItemId, Project
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import connect, describe, resolve_redis_url
from rankgate.core.settings import Settings, get_project, get_settings
from rankgate.governance.consent import ConsentStore, demo_consent
from rankgate.governance.policy import load_policy_set

if TYPE_CHECKING:
    from feast import FeatureView

    from features.spec import ViewInfo
    from model_store.store import ModelStore

SETUP_FILE = "setup.json"

Say = Callable[[str], None]


@dataclass
class Environment:
    settings: Settings
    home: Home
    redis_url: str | None
    project: Project

    @classmethod
    def open(cls, redis: bool = True) -> Environment:
        settings = get_settings()
        home = Home.from_settings(settings)
        project = get_project(settings)
        url = resolve_redis_url(settings) if redis else None
        if url:
            connect(url)  # fail early, naming the address
        return cls(settings, home, url, project)

    @cached_property
    def redis(self) -> redis.Redis:
        return connect(self.redis_url)

    @property
    def data_dir(self) -> Path:
        return self.home.data_dir

    @cached_property
    def models(self) -> ModelStore:
        # Imported here, like Feast below: key and user commands open an
        # Environment too and should not pay for the model store's pydantic models.
        from model_store.store import ModelStore

        return ModelStore(self.home)

    @cached_property
    def consent(self) -> ConsentStore:
        return ConsentStore(self.redis, self.home.namespace)

    @cached_property
    def feast(self):  # type: ignore[no-untyped-def]
        from features.store import feature_store

        return feature_store(self.settings, self.redis_url, project=self.project)

    def marker_key(self, step: str) -> str:
        return redis_keys.setup_marker(self.home.namespace, step)

    def apply_features(self, objects: list[Any] | None = None) -> list[str]:
        from features.store import apply

        return apply(self.feast, self.project, self.home, objects)

    def views(self) -> list[FeatureView]:
        """The feature views of the applied registry (none before `features apply`)."""
        if not (self.home.feast_dir / "registry.db").exists():
            return []
        return list(self.feast.list_feature_views())

    def view_infos(self) -> dict[str, ViewInfo]:
        from features.store import view_infos

        return view_infos(self.views(), self.project)

    def catalogue(self) -> list[ItemId]:
        from feast import FeatureView

        from features.store import load_catalogue, read_definitions

        views = self.views() or [
            v for v in read_definitions(self.project, self.data_dir) if isinstance(v, FeatureView)
        ]
        return load_catalogue(self.project, views, self.data_dir)

    def recorded_catalogue(self) -> list[ItemId]:
        """The catalogue as the last setup read it (cheap: no Feast, no pandas)."""
        catalogue = self.recorded().get("catalogue")
        if catalogue is None:
            raise RankgateError(f"{self.home.root} is not set up: run `rankgate setup`")
        return list(catalogue)

    def recorded(self) -> dict[str, Any]:
        path = self.home.root / SETUP_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def sources(self) -> dict[str, Any]:
        """What the prepared state depends on: the project's files and the key."""
        fingerprint = hmac.new(
            self.settings.user_key_secret.encode(), b"rankgate-setup", hashlib.sha256
        ).hexdigest()[:16]
        return {
            "project": str(self.project.root),
            "key_fingerprint": fingerprint,
            "files": self.project.source_digest(),
        }

    @staticmethod
    def digest(sources: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]

    def feature_views(self) -> dict[str, set[str]] | None:
        """Views of the applied repository and their fields (None: not applied)."""
        if not (self.home.feast_dir / "registry.db").exists():
            return None
        views = self.feast.list_feature_views()
        return {view.name: {f.name for f in view.features} for view in views} or None

    def materialize(self) -> list[str]:
        """Materialize every view but the streaming ones (their rows come only from the
        event stream); returns the views materialized."""
        from features.store import materialize

        if self.feature_views() is None:
            raise RankgateError("feature repository not applied: run `rankgate features apply`")
        names = materialize(self.feast, skip=set(self.project.streaming))
        self.redis.set(self.marker_key("materialized"), self.digest(self.sources()))
        return names

    def model_rows(self) -> list[tuple[str, str, str, str, str]]:
        rows = []
        for version in self.models.versions():
            report = self.models.check_hashes(version)
            try:
                manifest = self.models.manifest(version)
            except ModelStoreError:
                rows.append((version, "corrupt: " + "; ".join(report.failures()), "-", "-", "-"))
                continue
            state = "ok" if report.ok else "corrupt: " + "; ".join(report.failures())
            auc = (
                "n/a"
                if manifest.metrics is None or manifest.metrics.auc is None
                else f"{manifest.metrics.auc:.3f}"
            )
            rows.append(
                (
                    version,
                    state,
                    str(len(manifest.features)),
                    auc,
                    manifest.created_at.strftime("%Y-%m-%d %H:%M"),
                )
            )
        return rows


def changed_files(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Names of what differs between two source records."""
    if not before:
        return []
    changed = [
        name
        for name in sorted(set(before.get("files", {})) | set(now["files"]))
        if before.get("files", {}).get(name) != now["files"].get(name)
    ]
    if before.get("project") != now["project"]:
        changed.insert(0, f"project folder (was {before.get('project')})")
    if before.get("key_fingerprint") != now["key_fingerprint"]:
        changed.insert(0, "RANKGATE_USER_KEY_SECRET")
    return changed


def run_setup(say: Say, force: bool = False) -> bool:
    """Bring the home to a ready state for the project. Returns True when anything was done.

    A home whose sources are unchanged is checked without Feast, pandas or the
    trainers (the catalogue as the last setup read it): `rankgate serve` starts
    the server sooner."""
    env = Environment.open()
    did = False
    project = env.project
    say(f"home: {env.home.root}")
    say(f"project: {project.name} ({project.root})")
    say(
        f"redis: {describe(env.redis_url or '')}"
        + (" (REDIS_URL)" if env.settings.redis_url else " (embedded)")
    )
    if env.settings.uses_dev_secret:
        say("note: RANKGATE_USER_KEY_SECRET is unset; using the development default")

    sources = env.sources()
    recorded = env.recorded()
    digest = env.digest(sources)
    current = (
        recorded.get("digest") == digest
        and not force
        and (env.home.feast_dir / "registry.db").exists()
    )
    if current:
        say("✓ project sources: unchanged since the last setup")
        catalogue = recorded["catalogue"] if "catalogue" in recorded else env.catalogue()
        policies = load_policy_set(project.policies, catalogue, project.item_type)
        say(f"✓ catalogue: {len(catalogue)} items; policies {policies.policy.version} check out")
    else:
        changed = changed_files(recorded.get("sources", {}), sources)
        reason = (
            "--force"
            if force
            else "first setup of this home"
            if not recorded
            else "changed: " + ", ".join(changed[:8]) + (" …" if len(changed) > 8 else "")
        )
        say(f"• project sources: {reason}")
        from feast import FeatureView

        from features.store import checked_definitions, checked_streaming_fields, load_catalogue

        prepare = project.prepare_function()
        if prepare is not None:
            say(f"• data: running {project.spec.prepare} ...")
            prepare(env.data_dir)
        # Everything is checked before the registry, Redis or the models are touched.
        objects = checked_definitions(project, env.data_dir)
        views = [o for o in objects if isinstance(o, FeatureView)]
        catalogue = load_catalogue(project, views, env.data_dir)
        checked_streaming_fields(project, views, catalogue)
        policies = load_policy_set(project.policies, catalogue, project.item_type)
        say(f"✓ catalogue: {len(catalogue)} items; policies {policies.policy.version} check out")
        say("• feature repository: applying ...")
        say(f"    views: {', '.join(env.apply_features(objects))}")
        did = True

    done = env.redis.get(env.marker_key("materialized"))
    if done is not None and done.decode() == digest and current:  # type: ignore[union-attr]
        say("✓ online store: already materialized")
    else:
        say("• online store: materializing feature views into Redis ...")
        env.materialize()
        if project.streaming:
            streamed = ", ".join(project.streaming)
            say(f"    not materialized (kept fresh from the event stream): {streamed}")
        did = True

    trained_from = recorded.get("models", {})
    for model in project.spec.setup_models:
        version = model.version
        if env.models.exists(version):
            stale = trained_from.get(version) not in (None, digest)
            try:
                env.models.manifest(version)
                unreadable = None
            except ModelStoreError as exc:
                unreadable = exc.message
            if force or unreadable:
                why = "--force" if force else f"unusable ({unreadable})"
                say(f"• model {version}: {why}: retraining (the old folder is removed)")
                shutil.rmtree(env.models.path(version))
            elif stale:
                say(
                    f"! model {version}: kept, trained from earlier sources (registered versions "
                    "are immutable; `rankgate setup --force` retrains it)"
                )
                continue
            else:
                say(f"✓ model {version}: already registered")
                continue
        say(f"• model {version}: training ...")
        from features.spec import load_features_file
        from model_store.train import train, trainer_params

        try:
            params = trainer_params(model.trainer, model.params)
        except ValueError as exc:
            raise ConfigError(
                f"{project.file}: field 'setup_models' ({version}).params: {exc}"
            ) from exc
        features_path = project.path(model.features)
        train(
            env.models,
            project,
            env.views(),
            env.view_infos(),
            env.data_dir,
            version,
            params,
            load_features_file(features_path),
            str(features_path),
            lambda m: say(f"    {m}"),
        )
        trained_from[version] = digest
        did = True

    demo = env.redis.get(env.marker_key("demo_consent"))
    if demo is not None and demo.decode() == digest:  # type: ignore[union-attr]
        say("✓ demo consent records: already written")
    else:
        ids = project.demo_user_ids()
        purposes = list(policies.policy.purposes)
        say(f"• demo consent records: writing {len(ids)} users × {len(purposes)} purposes ...")
        with env.redis.pipeline(transaction=False) as pipe:
            store = ConsentStore(pipe, env.home.namespace)  # type: ignore[arg-type]
            for uid in ids:
                store.record(user_key(uid), demo_consent(uid, purposes), source="rankgate-demo")
            pipe.set(env.marker_key("demo_consent"), digest)
            pipe.execute()
        did = True

    record = {
        "catalogue": catalogue,
        "digest": digest,
        "sources": sources,
        "models": trained_from,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (env.home.root / SETUP_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    say("setup complete." if did else "nothing to do: everything was already set up.")
    return did


def list_users(purpose: str, consent: str | None, limit: int) -> list[str]:
    env = Environment.open()
    policy = load_policy_set(env.project.policies).policy
    if purpose not in policy.purposes:
        known = ", ".join(policy.purposes)
        raise RankgateError(f"--purpose: unknown purpose {purpose!r} (known: {known})", 422)
    ids = env.project.demo_user_ids()
    purposes = list(policy.purposes)
    states = {p: env.consent.states([user_key(u) for u in ids], p) for p in purposes}
    lines = []
    for index, uid in enumerate(ids):
        if consent is not None and states[purpose][index] != consent:
            continue
        lines.append(uid + "  " + "  ".join(f"{p}={states[p][index]}" for p in purposes))
        if len(lines) == limit:
            break
    return lines
