"""Outcome counters of each version and variant, as the event consumer's join writes
them (serving/events/outcome_join.py), and what reads them: the canary's click-rate
rule, `rankgate model status`, promotion and evidence.

    redis_keys.outcomes(ns, version, variant)     hash of counters
    redis_keys.outcomes_unjoined(ns)              hash: `<outcome>:<reason>` -> count
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from math import sqrt
from statistics import NormalDist

from rankgate.core import redis_keys
from rankgate.core.project import Outcomes, Project
from rankgate.core.redis_server import AsyncRedisClient, RedisClient

ROLES = ("impression", "click", "conversion")
COUNTERS = {"impression": "impressions", "click": "clicks", "conversion": "conversions"}
"""The counter of each outcome role (per position: `<counter>:<n>`)."""


def project_outcomes(project: Project) -> Outcomes | None:
    """The project's outcome types, or None when it declares none."""
    events = project.spec.events
    if events is None or not any(getattr(events.outcomes, role) for role in ROLES):
        return None
    return events.outcomes


def outcome_roles(outcomes: Outcomes) -> dict[str, list[str]]:
    """Event type -> the outcome roles it plays (usually one)."""
    roles: dict[str, list[str]] = {}
    for role in ROLES:
        name = getattr(outcomes, role)
        if name is not None:
            roles.setdefault(name, []).append(role)
    return roles


@dataclass(frozen=True)
class Exposure:
    """Joined impressions and clicks of one variant's answers."""

    impressions: int
    clicks: int

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    def figures(self) -> dict[str, float]:
        return {"impressions": self.impressions, "clicks": self.clicks, "ctr": self.ctr}


def ctr_below(canary: Exposure, stable: Exposure) -> float:
    """p-value of a one-sided Fisher exact test that canary's click rate is below stable's.

    A click without its impression (the application reported one, not the other) is
    counted as a clicked impression: a side never has more clicks than impressions."""
    # Imported here: commands that only read the routing (`rankgate model status`)
    # stay light; a serving replica has scipy.stats loaded already (SHAP imports it).
    from scipy.stats import fisher_exact

    table = [
        [min(canary.clicks, canary.impressions), max(canary.impressions - canary.clicks, 0)],
        [min(stable.clicks, stable.impressions), max(stable.impressions - stable.clicks, 0)],
    ]
    return float(fisher_exact(table, alternative="less").pvalue)


# -- reading the counters -----------------------------------------------------

BASELINE_VERSION = "baseline:version"
"""In a canary's counters: the stable version when the canary started..."""
BASELINE_IMPRESSIONS = "baseline:impressions"
BASELINE_CLICKS = "baseline:clicks"
"""...and its impressions and clicks then (serving/ops/promotion.py writes them)."""


@dataclass(frozen=True)
class OutcomeTotals:
    """The counters of one version and variant."""

    version: str
    variant: str
    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    decisions: int = 0
    """Decisions with at least one outcome."""
    by_position: dict[int, dict[str, int]] = field(default_factory=dict)
    """Position -> counter (impressions, clicks, conversions) -> count."""
    baseline: tuple[str, Exposure] | None = None
    """A canary's: stable's version and exposure when the canary started."""

    @classmethod
    def parse(cls, version: str, variant: str, raw: Mapping[bytes, bytes]) -> OutcomeTotals:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        by_position: dict[int, dict[str, int]] = {}
        for name, value in fields.items():
            counter, _, position = name.partition(":")
            if counter in COUNTERS.values() and position.isdigit():
                by_position.setdefault(int(position), {})[counter] = int(value)
        baseline = None
        if BASELINE_VERSION in fields:
            baseline = (
                fields[BASELINE_VERSION],
                Exposure(
                    int(fields.get(BASELINE_IMPRESSIONS, 0)), int(fields.get(BASELINE_CLICKS, 0))
                ),
            )
        return cls(
            version,
            variant,
            impressions=int(fields.get("impressions", 0)),
            clicks=int(fields.get("clicks", 0)),
            conversions=int(fields.get("conversions", 0)),
            decisions=int(fields.get("decisions", 0)),
            by_position=dict(sorted(by_position.items())),
            baseline=baseline,
        )

    @property
    def exposure(self) -> Exposure:
        return Exposure(self.impressions, self.clicks)

    def ctr_interval(self, confidence: float = 0.95) -> tuple[float, float] | None:
        """Wilson score interval of the click rate (None without impressions)."""
        return wilson_interval(self.clicks, self.impressions, confidence)

    def since(self, canary: OutcomeTotals) -> Exposure:
        """This (stable) version's exposure since `canary` started, when the canary
        recorded where it stood then; else all of it."""
        if canary.baseline is None or canary.baseline[0] != self.version:
            return self.exposure
        base = canary.baseline[1]
        return Exposure(
            max(self.impressions - base.impressions, 0), max(self.clicks - base.clicks, 0)
        )


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of k successes in n trials (k is capped at n: a click
    reported without its impression counts as a clicked impression).

    Newcombe's (1998) formula, as scipy's `binomtest(k, n).proportion_ci(method="wilson")`
    computes it (a test holds the two together), in plain Python: `rankgate model status`
    shows rates without loading scipy and numpy."""
    if n <= 0:
        return None
    k = min(k, n)
    z = NormalDist().inv_cdf(0.5 + 0.5 * confidence)
    p = k / n
    denominator = 2 * (n + z**2)
    center = (2 * n * p + z**2) / denominator
    delta = z / denominator * sqrt(4 * n * p * (1 - p) + z**2)
    low = 0.0 if k == 0 else center - delta
    high = 1.0 if k == n else center + delta
    return low, high


def read_outcomes(client: RedisClient, namespace: str, version: str, variant: str) -> OutcomeTotals:
    raw = client.hgetall(redis_keys.outcomes(namespace, version, variant))
    return OutcomeTotals.parse(version, variant, raw)  # type: ignore[arg-type]


async def read_outcomes_async(
    client: AsyncRedisClient, namespace: str, version: str, variant: str
) -> OutcomeTotals:
    raw = await client.hgetall(redis_keys.outcomes(namespace, version, variant))  # type: ignore[misc]
    return OutcomeTotals.parse(version, variant, raw)


def outcome_keys(client: RedisClient, namespace: str) -> list[tuple[str, str]]:
    """(version, variant) of every counter hash in Redis, sorted."""
    prefix = redis_keys.outcomes(namespace, "", "")[:-1]  # "<ns>:outcomes:"
    found = set()
    for key in client.scan_iter(match=redis_keys.outcomes(namespace, "*", "*"), count=1000):
        rest = (key.decode() if isinstance(key, bytes) else key)[len(prefix) :]
        version, _, variant = rest.rpartition(":")
        found.add((version, variant))
    return sorted(found)


def read_unjoined(client: RedisClient, namespace: str) -> dict[str, int]:
    """`<outcome>:<reason>` -> count."""
    raw = client.hgetall(redis_keys.outcomes_unjoined(namespace))
    return {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]
