"""`rankgate setup` and the environment the CLI commands share.

Setup is idempotent: every step checks whether its result is already there and
says so instead of redoing it. Markers of steps whose result lives in Redis are
kept in Redis itself (`<namespace>:setup:*`), so a wiped or different Redis is
set up again while a kept one is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import redis

from rankgate import redis_keys
from rankgate.consent import ConsentStore, demo_consent
from rankgate.errors import ModelStoreError, RankgateError
from rankgate.example_data import PreparedData, example_user_ids, prepare, prepared
from rankgate.home import Home
from rankgate.policy import load_policy
from rankgate.pseudonym import user_key
from rankgate.redis_server import connect, describe, resolve_redis_url
from rankgate.settings import Settings, get_settings

if TYPE_CHECKING:
    from model_store.store import ModelStore

Say = Callable[[str], None]


@dataclass
class Environment:
    settings: Settings
    home: Home
    redis_url: str | None

    @classmethod
    def open(cls, redis: bool = True) -> Environment:
        settings = get_settings()
        home = Home.from_settings(settings)
        url = resolve_redis_url(settings) if redis else None
        if url:
            connect(url)  # fail early, naming the address
        return cls(settings, home, url)

    @cached_property
    def redis(self) -> redis.Redis:
        return connect(self.redis_url)

    @property
    def data(self) -> PreparedData:
        return prepared(self.home)

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

        return feature_store(self.settings, self.redis_url)

    def marker_key(self, step: str) -> str:
        return redis_keys.setup_marker(self.home.namespace, step)

    def apply_features(self) -> list[str]:
        from features.store import apply

        if not self.data.is_complete():
            raise RankgateError(f"no prepared data in {self.data.directory}: run `rankgate setup`")
        return apply(self.feast, self.home)

    def feature_views(self) -> dict[str, set[str]] | None:
        """Views of the applied repository and their fields (None: not applied)."""
        if not (self.home.feast_dir / "registry.db").exists():
            return None
        views = self.feast.list_feature_views()
        return {view.name: {f.name for f in view.features} for view in views} or None

    def materialize(self) -> None:
        from features.store import materialize

        if self.feature_views() is None:
            raise RankgateError("feature repository not applied: run `rankgate features apply`")
        materialize(self.feast)
        snapshot = json.loads(self.data.marker.read_text())["snapshot_time"]
        self.redis.set(self.marker_key("materialized"), snapshot)

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
            auc = "n/a" if manifest.metrics.auc is None else f"{manifest.metrics.auc:.3f}"
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


def run_setup(say: Say) -> bool:
    """Bring the home to a ready state. Returns True when anything was done."""
    from model_store.train import DEFAULT_VERSIONS, train

    env = Environment.open()
    did = False
    say(f"home: {env.home.root}")
    say(
        f"redis: {describe(env.redis_url or '')}"
        + (" (REDIS_URL)" if env.settings.redis_url else " (embedded)")
    )
    if env.settings.uses_dev_secret:
        say("note: RANKGATE_USER_KEY_SECRET is unset; using the development default")

    if env.data.is_complete():
        say("✓ example data: already prepared")
    else:
        say("• example data: preparing the Open Bandit sample ...")
        prepare(env.home)
        did = True

    if env.feature_views() is not None:
        say("✓ feature repository: already applied")
    else:
        say("• feature repository: applying ...")
        env.apply_features()
        did = True

    snapshot = json.loads(env.data.marker.read_text())["snapshot_time"]
    done = env.redis.get(env.marker_key("materialized"))
    if done is not None and done.decode() == snapshot:  # type: ignore[union-attr]
        say("✓ online store: already materialized")
    else:
        say("• online store: materializing feature views into Redis ...")
        env.materialize()
        did = True

    for version, (feature_names, params) in DEFAULT_VERSIONS.items():
        if env.models.exists(version):
            say(f"✓ model {version}: already registered")
            continue
        say(f"• model {version}: training ...")
        train(env.models, env.data, version, params, feature_names, lambda m: say(f"    {m}"))
        did = True

    if env.redis.get(env.marker_key("demo_consent")) is not None:
        say("✓ demo consent records: already written")
    else:
        purposes = list(load_policy().purposes)
        ids = example_user_ids()
        say(f"• demo consent records: writing {len(ids)} users × {len(purposes)} purposes ...")
        with env.redis.pipeline(transaction=False) as pipe:
            store = ConsentStore(pipe, env.home.namespace)  # type: ignore[arg-type]
            for uid in ids:
                store.record(user_key(uid), demo_consent(uid, purposes), source="rankgate-demo")
            pipe.set(env.marker_key("demo_consent"), len(ids))
            pipe.execute()
        did = True

    say("setup complete." if did else "nothing to do: everything was already set up.")
    return did


def list_users(purpose: str, consent: str | None, limit: int) -> list[str]:
    policy = load_policy()
    if purpose not in policy.purposes:
        known = ", ".join(policy.purposes)
        raise RankgateError(f"--purpose: unknown purpose {purpose!r} (known: {known})", 422)
    env = Environment.open()
    ids = example_user_ids()
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
