"""`rankgate setup` and the other steps that prepare a home for its project.

Setup follows the sources: it records a sha256 of each file of the project (and
a fingerprint of the pseudonymisation key, which the prepared tables depend on)
in `<home>/setup.json`, and redoes the data steps (prepare, Feast apply,
materialize) when any of them changed, naming what changed. Markers of steps
whose result lives in Redis are kept in Redis itself (`<namespace>:setup:*`,
holding the sources' digest), so a wiped or different Redis is set up again
while a kept one is not. Registered model versions are immutable: a setup model
trained from other sources is kept and setup says so; `--force` retrains it.
Demo consent (made-up decisions for the project's demo users,
rankgate/governance/demo_consent.py) is written only with `--demo-consent`.
The environment every command opens is rankgate/ops/environment.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rankgate.core import redis_keys
from rankgate.core.errors import ConfigError, ModelStoreError, RankgateError
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import (
    EmbeddedRedis,
    connect,
    describe,
    feast_connection_string,
    resolve_redis_url,
)
from rankgate.core.settings import get_project, get_settings
from rankgate.governance.consent import ConsentStore
from rankgate.governance.demo_consent import DEMO_SOURCE, demo_decisions
from rankgate.governance.policy import load_policy_set
from rankgate.ops.environment import SETUP_FILE, Environment

__all__ = ["SETUP_FILE", "changed_files", "run_setup"]

Say = Callable[[str], None]


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


def run_setup(say: Say, force: bool = False, demo_consent: bool = False) -> bool:
    """Bring the home to a ready state for the project. Returns True when anything was done.
    With `demo_consent`, also the demo consent records of the project's demo users.

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

        from features.applied import of_feast
        from features.store import checked_definitions, checked_streaming_fields
        from features.tables import load_catalogue

        prepare = project.prepare_function()
        if prepare is not None:
            say(f"• data: running {project.spec.prepare} ...")
            prepare(env.data_dir)
        # Everything is checked before the registry, Redis or the models are touched.
        objects = checked_definitions(project, env.data_dir)
        views = [o for o in objects if isinstance(o, FeatureView)]
        catalogue = load_catalogue(project, of_feast(views), env.data_dir)
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
                did = backfill_lineage(env, version, say) or did
                continue
            else:
                say(f"✓ model {version}: already registered")
                did = backfill_lineage(env, version, say) or did
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

    purposes = list(policies.policy.purposes)
    if demo_consent:
        did = setup_demo_consent(env, digest, purposes, say) or did
    elif env.redis.exists(env.marker_key("demo_consent")):
        say(
            "! demo consent records: kept, written by an earlier `rankgate setup "
            "--demo-consent` (made up; `rankgate privacy demo-consent remove --yes` removes them)"
        )
    else:
        say(
            "note: no demo consent written (people's consent comes from POST /v1/consent or "
            "`rankgate consent import`; `rankgate setup --demo-consent` makes some up for the "
            "project's demo users, for a demo)"
        )

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


def backfill_lineage(env: Environment, version: str, say: Say) -> bool:
    """A setup model trained before lineage existed gets it from the interaction log,
    when that log is the one it was trained on (residency rules accept no version
    without lineage); says why not otherwise. True when it was recorded."""
    if env.models.manifest(version).lineage.data is not None:
        return False
    from model_store.lineage import record_lineage

    try:
        data = record_lineage(env.models, env.project, env.views(), env.data_dir, version)
    except ModelStoreError as exc:
        say(f"! model {version}: no lineage recorded: {exc.message}")
        return False
    say(f"✓ model {version}: lineage recorded: {data.shown()}")
    return True


def setup_demo_consent(env: Environment, digest: str, purposes: list[str], say: Say) -> bool:
    """Write the demo consent records unless this setup's sources already wrote them
    (the marker holds their digest); True when written."""
    demo = env.redis.get(env.marker_key("demo_consent"))
    ids = env.project.demo_user_ids()
    # The marker counts only if a record is where it is read now (redis_keys.consent:
    # the key names changed once).
    sample = next((uid for uid in ids if demo_decisions([uid], purposes)[0]), None)
    if (
        demo is not None
        and demo.decode() == digest  # type: ignore[union-attr]
        and (
            sample is None
            or env.redis.exists(redis_keys.consent(env.home.namespace, user_key(sample)))
        )
    ):
        say("✓ demo consent records: already written")
        return False
    if not ids:
        say(
            f"! demo consent records: none written: {env.project.file.name} names no demo "
            "users (a `demo_user_ids()` in its prepare module)"
        )
        return False
    say(
        f"• demo consent records: writing {len(ids)} users × {len(purposes)} purposes "
        f"(made up, source {DEMO_SOURCE!r}) ..."
    )
    write_demo_consent(env.consent, ids, purposes)
    env.redis.set(env.marker_key("demo_consent"), digest)
    return True


DEMO_CHUNK = 100_000
"""Demo users whose records are built and written at a time (bounded memory)."""


def write_demo_consent(store: ConsentStore, user_ids: Sequence[str], purposes: list[str]) -> int:
    """`demo_consent` records of every id, dated now, through the bulk writer of
    `rankgate consent import`; how many were written."""
    import pyarrow as pa

    from rankgate.ops.consent_import import RECORDS, write_records

    now = datetime.now(UTC)
    written = 0
    # One chunk is written while the next is built: Redis works while Python hashes.
    with ThreadPoolExecutor(1) as writer:
        pending: Future[int] | None = None
        for start in range(0, len(user_ids), DEMO_CHUNK):
            ids, decided, granted = demo_decisions(user_ids[start : start + DEMO_CHUNK], purposes)
            records = pa.table(
                [
                    pa.array(ids, pa.string()),
                    pa.array(decided, pa.string()),
                    pa.array(granted, pa.bool_()),
                    pa.repeat(pa.scalar(DEMO_SOURCE), len(ids)),
                    pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), len(ids)),
                ],
                schema=RECORDS,
            )
            if pending is not None:
                written += pending.result()
            pending = writer.submit(write_records, store, records)
        if pending is not None:
            written += pending.result()
    return written


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


def feast_exports() -> list[str]:
    """The exports Feast's own CLI needs in the project's repository, and where to run it."""
    url = resolve_redis_url()
    connect(url)
    return [
        f"export RANKGATE_FEAST_REDIS='{feast_connection_string(url)}'",
        f"export RANKGATE_DATA_DIR='{Home.from_settings().data_dir}'",
        f"# cd {get_project().feast_repo} && feast apply",
    ]


def apply_features() -> list[str]:
    """Register the project's entities and feature views in the home's Feast registry."""
    return Environment.open().apply_features()


@dataclass(frozen=True)
class Materialized:
    views: list[str]
    streaming: list[str]


def materialize_features() -> Materialized:
    """Load the latest feature values into the online store, but for the streaming views."""
    env = Environment.open()
    return Materialized(env.materialize(), list(env.project.streaming))


def start_redis() -> str:
    """Start this home's embedded server (or check REDIS_URL); its address, described."""
    url = resolve_redis_url()
    connect(url)
    return describe(url)


def stop_redis() -> bool:
    """Save and stop this home's embedded server; False: it was not running."""
    if get_settings().redis_url:
        raise RankgateError("REDIS_URL is set: rankgate does not stop a server it did not start")
    return EmbeddedRedis(Home.from_settings()).stop()


def redis_status() -> str:
    """Which server this home uses and whether it answers."""
    settings = get_settings()
    if settings.redis_url:
        connect(settings.redis_url)
        return f"REDIS_URL {describe(settings.redis_url)}: up"
    url = EmbeddedRedis(Home.from_settings(settings)).running_url()
    return f"embedded {describe(url)}: up" if url else "embedded: not running"
