"""Canary routing between model versions, sticky per user, with automatic rollback.

Roles (the `routing` section of the ingress user_config):
- stable:    serves everyone not in the canary (exactly one).
- canary:    serves `weight` % of users (at most one).
- shadow:    scores a copy of requests off the response path; never answers.
- alternate: serves purposes that may not use the stable version's feature views.

A canary that had another role before (shadow, alternate) keeps it as
`previous_role`, so that taking the canary out gives that role back.

Assignment hashes the pseudonymous user key with the config's salt into one of
10,000 buckets; a user is in the canary when their bucket is below
`canary weight × 100`. The same user lands in the same variant on every replica
and after restarts, and raising the weight only moves users into the canary.

The router keeps, per variant, a sliding window of outcomes (error, degraded,
latency). When the canary is worse than stable beyond the rollback rules, with
enough requests on both sides, its weight goes to 0 and a `RollbackEvent`
says which rule fired and with what figures.

Clicks come later, through the event stream, so the request windows cannot see
them: the pipeline reads both variants' joined impressions and clicks from Redis
(serving/feedback.py) and asks `check_ctr`, which rolls the canary back when,
with `min_impressions` on both sides, a one-sided Fisher exact test says the
canary's click rate is below stable's at `ctr_p_value`.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from rankgate.config_files import Strict

BUCKETS = 10_000
Role = Literal["stable", "canary", "shadow", "alternate"]
# Roles a version can return to when its canary ends (stable and canary are taken over).
ReturnRole = Literal["shadow", "alternate"]


class VersionRoute(Strict):
    version: str = Field(min_length=1)
    role: Role
    weight: float | None = Field(None, ge=0, le=100)
    """Percent of users; stable and canary weights add up to 100."""
    previous_role: ReturnRole | None = None
    """A canary's role before it was promoted; rolling the canary back restores it."""


class RollbackRules(Strict):
    window_s: float = Field(30.0, gt=0)
    """Outcomes older than this are forgotten."""
    min_requests: int = Field(30, ge=1)
    """Both variants need this many requests in the window before a rule may fire."""
    max_error_rate_delta: float = Field(0.05, ge=0, le=1)
    """Canary error rate may exceed stable's by at most this much."""
    max_degraded_rate_delta: float = Field(0.10, ge=0, le=1)
    """Canary share of degraded answers (fallbacks after the model was chosen) vs stable."""
    max_p99_ratio: float = Field(2.0, gt=1)
    """Canary p99 latency may be at most this multiple of stable's..."""
    min_p99_delta_ms: float = Field(5.0, ge=0)
    """...and this much above it, so that noise on fast answers does not fire."""
    min_impressions: int = Field(1000, ge=1)
    """The click-rate rule waits for this many joined impressions of each variant."""
    ctr_p_value: float | None = Field(0.05, gt=0, lt=1)
    """The canary is rolled back when a one-sided test (Fisher exact) finds its click
    rate below stable's at this significance; null turns the click-rate rule off."""


class RoutingConfig(Strict):
    salt: str = Field(min_length=1, max_length=64)
    """Changing the salt reshuffles who is in the canary."""
    versions: list[VersionRoute] = Field(min_length=1)
    rollback: RollbackRules = RollbackRules()

    @model_validator(mode="after")
    def _consistent(self) -> RoutingConfig:
        names = [v.version for v in self.versions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"version {duplicates[0]!r} is listed twice")
        stables = [v for v in self.versions if v.role == "stable"]
        canaries = [v for v in self.versions if v.role == "canary"]
        if len(stables) != 1:
            problem = (
                "a canary without a stable"
                if canaries and not stables
                else f"{len(stables)} stables"
            )
            raise ValueError(f"need exactly one stable version, got {problem}")
        if len(canaries) > 1:
            raise ValueError(f"at most one canary, got {len(canaries)}")
        for route in self.versions:
            if route.role in ("shadow", "alternate") and route.weight not in (None, 0):
                raise ValueError(f"{route.version}: a {route.role} version takes no weight")
            if route.previous_role is not None and route.role != "canary":
                raise ValueError(f"{route.version}: only a canary has a previous_role")
        stable_weight = stables[0].weight if stables[0].weight is not None else 100.0
        canary_weight = (canaries[0].weight or 0.0) if canaries else 0.0
        if abs(stable_weight + canary_weight - 100.0) > 1e-9:
            raise ValueError(
                f"stable and canary weights must add up to 100, got {stable_weight:g} + {canary_weight:g}"
            )
        return self

    def of_role(self, role: Role) -> list[VersionRoute]:
        return [v for v in self.versions if v.role == role]

    @property
    def stable(self) -> str:
        return self.of_role("stable")[0].version

    @property
    def canary(self) -> VersionRoute | None:
        found = self.of_role("canary")
        return found[0] if found else None

    @property
    def all_versions(self) -> list[str]:
        return [v.version for v in self.versions]


def bucket(user_key: str, salt: str) -> int:
    digest = hashlib.sha256(f"{salt}:{user_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Assignment:
    version: str
    variant: Role


@dataclass
class Window:
    """Outcomes of one variant over the last `window_s` seconds."""

    window_s: float
    events: deque[tuple[float, bool, bool, float]] = field(default_factory=deque)

    def add(self, now: float, error: bool, degraded: bool, latency_ms: float) -> None:
        self.events.append((now, error, degraded, latency_ms))
        self.trim(now)

    def trim(self, now: float) -> None:
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()

    def figures(self) -> dict[str, float]:
        count = len(self.events)
        if not count:
            return {"requests": 0, "error_rate": 0.0, "degraded_rate": 0.0, "p99_ms": 0.0}
        latencies = sorted(e[3] for e in self.events)
        return {
            "requests": count,
            "error_rate": sum(e[1] for e in self.events) / count,
            "degraded_rate": sum(e[2] for e in self.events) / count,
            "p99_ms": latencies[min(count - 1, int(0.99 * count))],
        }


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


@dataclass(frozen=True)
class RollbackEvent:
    version: str
    rule: str
    detail: str
    canary: dict[str, float]
    stable: dict[str, float]
    at: float


class Router:
    def __init__(self, config: RoutingConfig, rolled_back: Iterable[str] = ()) -> None:
        self.config = config
        self.rolled_back: set[str] = set(rolled_back)
        self.windows: dict[str, Window] = {
            v.version: Window(config.rollback.window_s)
            for v in config.versions
            if v.role in ("stable", "canary")
        }

    @property
    def canary_weight(self) -> float:
        canary = self.config.canary
        if canary is None or canary.version in self.rolled_back:
            return 0.0
        return canary.weight or 0.0

    def assign(self, user_key: str) -> Assignment:
        canary = self.config.canary
        if (
            canary is not None
            and bucket(user_key, self.config.salt) < self.canary_weight * BUCKETS / 100
        ):
            return Assignment(canary.version, "canary")
        return Assignment(self.config.stable, "stable")

    def split(self) -> list[tuple[Assignment, float]]:
        """Each variant `assign` gives out, with the percent of users it gives it to."""
        shares = [(Assignment(self.config.stable, "stable"), 100.0 - self.canary_weight)]
        canary = self.config.canary
        if canary is not None:
            shares.append((Assignment(canary.version, "canary"), self.canary_weight))
        return [(assigned, share) for assigned, share in shares if share > 0]

    def choose(
        self,
        user_key: str,
        allowed_views: frozenset[str],
        views_of: dict[str, frozenset[str] | None],
    ) -> Assignment | None:
        """The user's variant if the purpose permits its views, else stable, else an alternate."""
        return self.answer(self.assign(user_key), allowed_views, views_of)

    def answer(
        self,
        assigned: Assignment,
        allowed_views: frozenset[str],
        views_of: dict[str, frozenset[str] | None],
    ) -> Assignment | None:
        """Who answers a user assigned to `assigned`; promotion checks coverage with it too."""

        def permitted(version: str) -> bool:
            views = views_of.get(version)
            return views is None or views <= allowed_views  # unknown views: it fails on load anyway

        if permitted(assigned.version):
            return assigned
        if permitted(self.config.stable):
            return Assignment(self.config.stable, "stable")
        for route in self.config.of_role("alternate"):
            if permitted(route.version):
                return Assignment(route.version, "alternate")
        return None

    def shadows(
        self, allowed_views: frozenset[str], views_of: dict[str, frozenset[str] | None]
    ) -> list[str]:
        return [
            r.version
            for r in self.config.of_role("shadow")
            if (views := views_of.get(r.version)) is not None and views <= allowed_views
        ]

    def record(
        self, version: str, error: bool, degraded: bool, latency_ms: float, now: float | None = None
    ) -> None:
        window = self.windows.get(version)
        if window is not None:
            window.add(time.monotonic() if now is None else now, error, degraded, latency_ms)

    @property
    def live_canary(self) -> str | None:
        """The canary version while it has users (not rolled back, weight above 0)."""
        canary = self.config.canary
        if canary is None or canary.version in self.rolled_back or not canary.weight:
            return None
        return canary.version

    def _window_figures(self, canary: str, now: float) -> tuple[dict[str, float], dict[str, float]]:
        canary_window, stable_window = self.windows[canary], self.windows[self.config.stable]
        canary_window.trim(now)
        stable_window.trim(now)
        return canary_window.figures(), stable_window.figures()

    def _fire(
        self, canary: str, rule: str, detail: str, c: dict[str, float], s: dict[str, float]
    ) -> RollbackEvent:
        self.rolled_back.add(canary)
        return RollbackEvent(canary, rule, detail, c, s, time.time())

    def check_ctr(
        self, canary: Exposure, stable: Exposure, now: float | None = None
    ) -> RollbackEvent | None:
        """Roll the canary back when its click rate is significantly below stable's
        (`min_impressions` each, one-sided Fisher exact p < `ctr_p_value`); the event
        carries the request windows' figures too. Returns the event (once)."""
        version, rules = self.live_canary, self.config.rollback
        if version is None or rules.ctr_p_value is None:
            return None
        if min(canary.impressions, stable.impressions) < rules.min_impressions:
            return None
        p_value = ctr_below(canary, stable)
        if p_value >= rules.ctr_p_value:
            return None
        c, s = self._window_figures(version, time.monotonic() if now is None else now)
        detail = (
            f"canary CTR {canary.ctr:.2%} ({canary.clicks}/{canary.impressions}) vs stable "
            f"{stable.ctr:.2%} ({stable.clicks}/{stable.impressions}): one-sided Fisher exact "
            f"p={p_value:.2g} < {rules.ctr_p_value:g}"
        )
        return self._fire(
            version,
            "ctr",
            detail,
            {**c, **canary.figures(), "p_value": p_value},
            {**s, **stable.figures()},
        )

    def check_rollback(self, now: float | None = None) -> RollbackEvent | None:
        """Roll the canary back when a rule of the request windows fires; returns the
        event (once)."""
        version = self.live_canary
        if version is None:
            return None
        rules = self.config.rollback
        c, s = self._window_figures(version, time.monotonic() if now is None else now)
        if c["requests"] < rules.min_requests or s["requests"] < rules.min_requests:
            return None
        fired: tuple[str, str] | None = None
        if c["error_rate"] - s["error_rate"] > rules.max_error_rate_delta:
            fired = (
                "error_rate",
                (
                    f"canary {c['error_rate']:.1%} vs stable {s['error_rate']:.1%} "
                    f"(allowed +{rules.max_error_rate_delta:.1%})"
                ),
            )
        elif c["degraded_rate"] - s["degraded_rate"] > rules.max_degraded_rate_delta:
            fired = (
                "degraded_rate",
                (
                    f"canary {c['degraded_rate']:.1%} vs stable {s['degraded_rate']:.1%} "
                    f"(allowed +{rules.max_degraded_rate_delta:.1%})"
                ),
            )
        elif (
            c["p99_ms"] > s["p99_ms"] * rules.max_p99_ratio
            and c["p99_ms"] - s["p99_ms"] > rules.min_p99_delta_ms
        ):
            fired = (
                "p99_latency",
                (
                    f"canary p99 {c['p99_ms']:.1f} ms vs stable {s['p99_ms']:.1f} ms "
                    f"(allowed ×{rules.max_p99_ratio:g})"
                ),
            )
        if fired is None:
            return None
        return self._fire(version, fired[0], fired[1], c, s)
