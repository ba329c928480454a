"""Views of a scale project's home from this process: its Redis memory per person and
per item, and people the policy lets a purpose personalize (loadtests/scale.py)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.bench import memory

if TYPE_CHECKING:
    from loadtests.scale_project import Size

Say = Callable[[str], None]


@contextmanager
def home_selected(project: Path, home: Path) -> Iterator[None]:
    """This process's settings point at `home` and `project` (restored afterwards)."""
    from rankgate.core.settings import get_settings

    names = ("RANKGATE_HOME", "RANKGATE_PROJECT", "REDIS_URL", "RANKGATE_REDIS_URL")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(RANKGATE_HOME=str(home), RANKGATE_PROJECT=str(project))
    os.environ.pop("REDIS_URL", None)
    os.environ.pop("RANKGATE_REDIS_URL", None)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def redis_memory(env: Any, size: Size, sample: int = 3000) -> dict[str, Any]:
    """INFO memory, and MEMORY USAGE of `sample` random keys by kind, scaled to the
    key count: bytes per person (feature rows + consent) and per item."""
    client = env.redis
    info = client.info("memory")
    keys = int(client.dbsize())
    rng_keys = (
        list(client.scan_iter(count=1000))
        if keys <= sample
        else [client.randomkey() for _ in range(sample)]
    )
    kinds: dict[str, list[int]] = {}
    namespace = env.home.namespace.encode()
    for key in rng_keys:
        if key is None:
            continue
        used = client.memory_usage(key, samples=0) or 0
        if b"shopper_key" in key:
            kind = "person features"
        elif b"product_id" in key:
            kind = "item features"
        elif key.startswith(namespace) and b":consent:" in key:
            kind = "consent"
        else:
            kind = "other"
        kinds.setdefault(kind, []).append(int(used))
    seen = sum(len(v) for v in kinds.values()) or 1
    estimated = {
        kind: {
            "sampled": len(values),
            "keys_estimated": round(keys * len(values) / seen),
            "mean_bytes": round(sum(values) / len(values), 1),
            "bytes_estimated": round(keys * sum(values) / seen),
        }
        for kind, values in sorted(kinds.items())
    }

    def total(*names: str) -> float:
        return sum(estimated.get(n, {}).get("bytes_estimated", 0) for n in names)

    return {
        "used_memory_mib": round(info["used_memory"] / memory.MIB, 1),
        "used_memory_rss_mib": round(info["used_memory_rss"] / memory.MIB, 1),
        "keys": keys,
        "sampled": "every key" if keys <= sample else f"{sample} random keys",
        "kinds": estimated,
        "per_person_bytes": round(total("person features", "consent") / size.people, 1),
        "per_item_bytes": round(total("item features") / size.items, 1),
        "used_per_person_bytes": round(info["used_memory"] / size.people, 1),
    }


def granted_people(env: Any, purpose: str, count: int, seed: int = 7) -> list[str]:
    """Up to `count` people (a random sample) who may be personalized for `purpose`."""
    from rankgate.core.pseudonym import user_key
    from rankgate.governance.consent import ConsentState

    ids = env.project.demo_user_ids()
    rng = random.Random(seed)
    sample = rng.sample(ids, min(len(ids), count * 3))
    states = env.consent.states([user_key(u) for u in sample], purpose)
    return [u for u, s in zip(sample, states, strict=True) if s == ConsentState.GRANTED][:count]
