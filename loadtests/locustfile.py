"""Locust load test of rankgate with a realistic mix of requests.

Runs on its own against a server started with `rankgate serve`:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

or headless, with SLOs checked afterwards, through `rankgate loadtest`
(loadtests/loadtest.py).

The mix, per simulated user:

- rankings (~85 %) for the project's demo users, over its purposes and regions,
  with the whole catalogue or 5, 20 or 50 candidates; the users' consent states
  are the demo records (granted / denied / unknown), so a natural share of the
  answers are `no_consent` policy outcomes;
- rankings with `explain: true` (~10 %), for users the policy lets us personalize;
- deliberately bad requests (~2 %): they must be refused with a 422;
- consent writes (~3 %) for throw-away synthetic ids (`lt-user-N`), so the demo
  users' consent, which other tests and demos rely on, is never changed.

Request names group the statistics by what the request is expected to do:
"rank personalized-eligible", "rank no-consent", "rank explain", "rank bad-input",
"consent write".

Every request carries the API key from RANKGATE_API_KEY (`rankgate keys create
loadtest --purpose onsite_personalization --purpose email_marketing`; `rankgate
loadtest` makes a temporary one itself).

Every 200 rank answer is classified (personalized, or the fallback reason) in
counters. The runner reads them from the JSON file named by
RANKGATE_LOADTEST_OUTCOMES, written when the test stops; without that variable
they are logged instead. Counters are per process: run without `--processes`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locust import FastHttpUser, between, events, task
from locust.env import Environment as LocustEnvironment

from serving.contract.reasons import DEGRADED

OUTCOMES_ENV = "RANKGATE_LOADTEST_OUTCOMES"
API_KEY_ENV = "RANKGATE_API_KEY"
DEFAULT_HOST = "http://127.0.0.1:8000"

CANDIDATE_SIZES: tuple[int | None, ...] = (None, 5, 20, 50)  # None: whole catalogue
SYNTHETIC_USERS = 50

# One per kind of mistake a client makes; each must be a 422 that names the field.
BAD_BODIES: tuple[dict[str, Any], ...] = (
    {"user_id": "u-000000000000", "purpose": "telepathy", "region": "EU"},
    {"user_id": "u-000000000000", "purpose": "onsite_personalization", "region": "EU", "k": 0},
    {
        "user_id": "u-000000000000",
        "purpose": "onsite_personalization",
        "region": "EU",
        "colour": "blue",
    },
)

logger = logging.getLogger("rankgate.loadtest")


@dataclass(frozen=True)
class UserPool:
    """The project's demo users and what the policy decides for each per (purpose,
    region), with the policy's purposes and regions and the catalogue's item ids."""

    ids: list[str]
    purposes: tuple[str, ...]
    regions: tuple[str, ...]
    catalogue: list[Any]
    personalize: dict[tuple[str, str], frozenset[str]]
    eligible: dict[tuple[str, str], list[str]]
    consent_counts: dict[str, dict[str, int]]


def build_pool() -> UserPool:
    """Read the demo consent records and label each user with the gate's own decision.

    Using the server's gate logic (not a copy of the rules) keeps the request names
    honest if the policy file changes.
    """
    from rankgate.core.pseudonym import user_key
    from rankgate.governance.consent import ConsentState
    from rankgate.governance.policy import load_policy
    from rankgate.ops.environment import Environment
    from serving.ranking.gate import ConsentGate

    env = Environment.open()
    ids = env.project.demo_user_ids()
    if not ids:
        raise RuntimeError(f"{env.project.file}: the project names no demo users to load-test with")
    keys = [user_key(u) for u in ids]
    policy = load_policy()
    purposes, regions = tuple(policy.purposes), tuple(policy.regions)
    gate = ConsentGate(policy)
    eligible: dict[tuple[str, str], list[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for purpose in purposes:
        states = env.consent.states(keys, purpose)
        counts[purpose] = {s.value: states.count(s) for s in ConsentState}
        for region in regions:
            eligible[(purpose, region)] = [
                uid
                for uid, state in zip(ids, states, strict=True)
                if gate.decide(purpose, region, state).personalize
            ]
    return UserPool(
        ids=ids,
        purposes=purposes,
        regions=regions,
        catalogue=env.recorded_catalogue(),
        personalize={key: frozenset(users) for key, users in eligible.items()},
        eligible=eligible,
        consent_counts=counts,
    )


_pool: UserPool | None = None
outcomes: Counter[str] = Counter()


def pool() -> UserPool:
    global _pool
    if _pool is None:
        _pool = build_pool()
    return _pool


def classify(answer: dict[str, Any]) -> str:
    fallback = answer.get("fallback")
    return "personalized" if not fallback else f"fallback:{fallback.get('reason')}"


def summary() -> dict[str, Any]:
    rank_answers = sum(
        v for k, v in outcomes.items() if k == "personalized" or k.startswith("fallback:")
    )
    # Only degraded answers count toward the fallback-rate SLO: `no_consent` is the
    # policy working, `features_missing` and `no_permitted_model` describe the person
    # or the configuration rather than the service's health.
    degraded = sum(
        v
        for k, v in outcomes.items()
        if k.startswith("fallback:") and k.removeprefix("fallback:") in DEGRADED
    )
    return {
        "rank_answers": rank_answers,
        "degraded": degraded,
        "outcomes": dict(sorted(outcomes.items())),
        "consent_states": _pool.consent_counts if _pool is not None else {},
    }


@events.init.add_listener
def _build_pool_once(environment: LocustEnvironment, **_kwargs: Any) -> None:
    # Before any user starts, so reading the consent records never delays a request.
    pool()


@events.test_start.add_listener
def _reset(environment: LocustEnvironment, **_kwargs: Any) -> None:
    # The web UI can run several tests in one process; each starts from zero.
    outcomes.clear()


@events.test_stop.add_listener
def _write_outcomes(environment: LocustEnvironment, **_kwargs: Any) -> None:
    report = summary()
    target = os.environ.get(OUTCOMES_ENV)
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    else:
        rate = report["degraded"] / report["rank_answers"] if report["rank_answers"] else 0.0
        logger.info("rank outcomes %s; degraded %.2f %%", report["outcomes"], rate * 100)


class RankgateUser(FastHttpUser):
    """One application instance asking for rankings and forwarding consent decisions."""

    host = DEFAULT_HOST
    wait_time = between(0.05, 0.3)
    # Bounded, so a stuck server shows up as failures rather than a hung test.
    connection_timeout = 5.0
    network_timeout = 10.0

    def on_start(self) -> None:
        key = os.environ.get(API_KEY_ENV)
        if not key:
            raise RuntimeError(
                f"{API_KEY_ENV} is not set: every /v1 call needs an API key "
                "(rankgate keys create loadtest --purpose ...)"
            )
        self.client.auth_header = f"Bearer {key}"

    def _rank(self, body: dict[str, Any], name: str, expect_personalized: bool) -> None:
        with self.client.post("/v1/rank", json=body, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                answer = response.json()
                items = answer["items"]
            except (ValueError, KeyError, TypeError):
                response.failure("200 without a ranking in the body")
                return
            if not isinstance(items, list):
                response.failure("200 whose items are not a list")
                return
            outcome = classify(answer)
            outcomes[outcome] += 1
            if body.get("explain"):
                # Whether reasons fit in the budget under load is worth seeing.
                explanation = answer.get("explanation") or {}
                status = explanation.get("status", "missing")
                reason = explanation.get("reason")
                outcomes[f"explain:{status}" + (f":{reason}" if reason else "")] += 1
            # Consent can change while the test runs (other clients write it), so
            # a decision other than the expected one is counted, not failed.
            unexpected = (
                outcome == "fallback:no_consent"
                if expect_personalized
                else outcome == "personalized"
            )
            if unexpected:
                outcomes["unexpected_policy_decision"] += 1
            response.success()

    @staticmethod
    def _candidates() -> list[Any] | None:
        size = random.choice(CANDIDATE_SIZES)
        catalogue = pool().catalogue
        return None if size is None else random.sample(catalogue, min(size, len(catalogue)))

    @task(85)
    def rank(self) -> None:
        users = pool()
        purpose, region = random.choice(users.purposes), random.choice(users.regions)
        # Any demo user: the consent mix is then the demo data's own.
        user_id = random.choice(users.ids)
        personalize = user_id in users.personalize[(purpose, region)]
        body: dict[str, Any] = {
            "user_id": user_id,
            "purpose": purpose,
            "region": region,
            "k": random.choice((5, 10, 20)),
            "context": {"channel": random.choice(("web", "app", "email"))},
        }
        candidates = self._candidates()
        if candidates is not None:
            body["candidates"] = candidates
            body["k"] = min(body["k"], len(candidates))
        name = "rank personalized-eligible" if personalize else "rank no-consent"
        self._rank(body, name, personalize)

    @task(10)
    def rank_explain(self) -> None:
        users = pool()
        purpose, region = random.choice(users.purposes), random.choice(users.regions)
        if not users.eligible[(purpose, region)]:
            return
        body: dict[str, Any] = {
            "user_id": random.choice(users.eligible[(purpose, region)]),
            "purpose": purpose,
            "region": region,
            "k": 5,
            "explain": True,
            # Reasons cost SHAP time: a client asking for them allows for it.
            "budget_ms": 200,
        }
        candidates = self._candidates()
        if candidates is not None:
            body["candidates"] = candidates
        self._rank(body, "rank explain", True)

    @task(2)
    def bad_input(self) -> None:
        body = random.choice(BAD_BODIES)
        with self.client.post(
            "/v1/rank", json=body, name="rank bad-input", catch_response=True
        ) as response:
            if response.status_code != 422:
                response.failure(f"expected 422, got {response.status_code}")
                return
            try:
                error = response.json().get("error")
            except ValueError:
                error = None
            if error != "invalid_request":
                response.failure(
                    f"422 without an invalid_request body: {(response.text or '')[:200]}"
                )
                return
            response.success()

    @task(3)
    def write_consent(self) -> None:
        body = {
            # In the body, not the URL: proxies and access logs keep URLs.
            "user_id": f"lt-user-{random.randrange(SYNTHETIC_USERS)}",
            "purposes": {purpose: random.random() < 0.6 for purpose in pool().purposes},
            "source": "loadtest",
        }
        with self.client.post(
            "/v1/consent", json=body, name="consent write", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            response.success()
