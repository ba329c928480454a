"""Canary routing between model versions, sticky per user, with automatic rollback.

Roles (the `routing` section of the ingress user_config):
- stable:    serves everyone not in the canary (exactly one).
- canary:    serves `weight` % of users (at most one).
- shadow:    scores a copy of requests off the response path; never answers.
- alternate: serves purposes that may not use the stable version's feature views.

A canary that had another role before (shadow, alternate) keeps it as
`previous_role`, so that taking the canary out gives that role back.

Residency (policy.yaml `residency`, rankgate/governance/residency.py): a request of
a region with a rule is answered only by a version whose training data's lineage
the rule accepts. The router holds, per such region, the frozenset of accepted
versions (computed once per serving config); a version the region does not accept
is passed over like one that reads views the purpose does not permit: the next
permitted version answers (stable, then an alternate), else nobody (the route
stage then answers with the fallback, reason `residency`). Shadows the region
does not accept do not score its requests.

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
(serving/observe/outcomes.py) and asks `check_ctr`, which rolls the canary back when,
with `min_impressions` on both sides, a one-sided Fisher exact test says the
canary's click rate is below stable's at `ctr_p_value`.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from serving.contract.config import Role, RoutingConfig
from serving.observe.outcomes import Exposure, ctr_below
from serving.observe.routing_log import RollbackEvent

BUCKETS = 10_000


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


class Router:
    def __init__(
        self,
        config: RoutingConfig,
        rolled_back: Iterable[str] = (),
        residency: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self.config = config
        self.rolled_back: set[str] = set(rolled_back)
        self.residency: dict[str, frozenset[str]] = dict(residency or {})
        """Serving region -> the versions its residency rule accepts (a region absent:
        no rule, every version)."""
        # The config is immutable: the fallbacks of `answer` are looked up once.
        self.stable = Assignment(config.stable, "stable")
        self.alternates = [Assignment(r.version, "alternate") for r in config.of_role("alternate")]
        self.shadow_versions = [r.version for r in config.of_role("shadow")]
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
        return self.stable

    def split(self) -> list[tuple[Assignment, float]]:
        """Each variant `assign` gives out, with the percent of users it gives it to."""
        shares = [(self.stable, 100.0 - self.canary_weight)]
        canary = self.config.canary
        if canary is not None:
            shares.append((Assignment(canary.version, "canary"), self.canary_weight))
        return [(assigned, share) for assigned, share in shares if share > 0]

    def choose(
        self,
        user_key: str,
        allowed_views: frozenset[str],
        views_of: dict[str, frozenset[str] | None],
        region: str | None = None,
    ) -> Assignment | None:
        """The user's variant if the purpose permits its views and the region its
        lineage, else stable, else an alternate."""
        return self.answer(
            self.assign(user_key), allowed_views, views_of, self.residency.get(region or "")
        )

    def answer(
        self,
        assigned: Assignment,
        allowed_views: frozenset[str],
        views_of: dict[str, frozenset[str] | None],
        accepted: frozenset[str] | None = None,
    ) -> Assignment | None:
        """Who answers a user assigned to `assigned`: the first of it, stable and the
        alternates that reads only `allowed_views` and is in `accepted` (the versions
        the request's region accepts; None: no residency rule). Promotion checks
        coverage with it too."""

        def permitted(version: str) -> bool:
            if accepted is not None and version not in accepted:
                return False
            views = views_of.get(version)
            return views is None or views <= allowed_views  # unknown views: it fails on load anyway

        if permitted(assigned.version):
            return assigned
        if permitted(self.stable.version):
            return self.stable
        for alternate in self.alternates:
            if permitted(alternate.version):
                return alternate
        return None

    def shadows(
        self,
        allowed_views: frozenset[str],
        views_of: dict[str, frozenset[str] | None],
        region: str | None = None,
    ) -> list[str]:
        """The shadows that may score this request: the purpose permits their views and
        the region accepts their lineage (a shadow scores the person's data like an
        answering version does)."""
        accepted = self.residency.get(region or "")
        return [
            version
            for version in self.shadow_versions
            if (views := views_of.get(version)) is not None
            and views <= allowed_views
            and (accepted is None or version in accepted)
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
