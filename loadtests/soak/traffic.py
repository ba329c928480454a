"""The soak's traffic: open-loop arrivals of the realistic mix, every answer kept.

Request i is due at t0 + i/rate and is sent then, whatever is still outstanding
(up to `MAX_OUTSTANDING`; past that, a request is counted as `not_sent:backlog`,
never silently dropped). Its kind comes from the mix:

- `rank`: a person the policy may personalize (consent granted), top 10;
- `rank_denied`: a person who objected: the fallback answers, no lookup;
- `explain`: a `rank` that asks for reasons;
- `events`: an impression (and, for some, a click) of an item a recent answer
  showed, with that answer's `request_id`, so the consumer joins it as an outcome;
- `consent`: a decision of one of the soak's own people (`soak-<run>-p<n>`), granted
  or withdrawn in turn; a person is written by one request at a time, so what was
  last acknowledged is what must be readable after the run.

Every answer is kept as an `Answer` (kind, due time, latency, status, what it was).
A consent write or an event that was not acknowledged (a 503, a timeout) may or may
not have been written: such a person leaves the consent pool (`uncertain`), such an
event is not expected anywhere.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

MAX_OUTSTANDING = 256
TIMEOUT_S = 10.0
MIX = {"rank": 0.62, "rank_denied": 0.08, "explain": 0.05, "events": 0.18, "consent": 0.07}
CLICK_SHARE = 0.3


@dataclass(frozen=True)
class Answer:
    kind: str
    due: float
    """Seconds from the start of the run."""
    latency_ms: float
    status: int
    """HTTP status; 0 when no answer came (connection refused or reset, timeout)."""
    what: str
    """`personalized`, `fallback:<reason>`, `accepted`, `recorded`, or for another
    status the answer's `error` (`http_<status>` without one, or the exception)."""
    retry_after: bool = False
    request_id: str = ""
    body: str = ""
    """The start of an answer that was not JSON (what the edge said)."""


@dataclass
class Shown:
    request_id: str
    user_id: str
    items: list[Any]


@dataclass
class Ledger:
    """Everything the traffic sent and got."""

    answers: list[Answer] = field(default_factory=list)
    accepted_events: dict[str, tuple[str, float]] = field(default_factory=dict)
    """event id -> (request id, second it was accepted) for every event answered 202."""
    refused_events: dict[str, str] = field(default_factory=dict)
    """event id -> request id for every event not acknowledged (503, timeout): it may
    still have been written, and then it is applied once like any other."""
    consent_acked: dict[str, bool] = field(default_factory=dict)
    """soak person -> the last decision acknowledged (200)."""
    uncertain: set[str] = field(default_factory=set)
    """Soak people with a write not acknowledged: whatever they hold is allowed."""
    not_sent: int = 0

    def rank_answers(self) -> list[Answer]:
        return [a for a in self.answers if a.kind in ("rank", "rank_denied", "explain")]


class Traffic:
    """The open-loop mix against one server, on its own event loop (run in a thread)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        granted: list[dict[str, Any]],
        denied: list[dict[str, Any]],
        purpose: str,
        run_id: str,
        consent_people: int = 200,
        seed: int = 7,
    ) -> None:
        self.base_url = base_url
        self.headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        self.granted, self.denied = granted, denied
        self.purpose = purpose
        self.run_id = run_id
        self.people = [f"soak-{run_id}-p{n}" for n in range(consent_people)]
        self.busy: set[str] = set()
        self.random = random.Random(seed)
        self.ledger = Ledger()
        self.recent: collections.deque[Shown] = collections.deque(maxlen=500)
        self.started = 0.0
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.session: aiohttp.ClientSession | None = None
        self.outstanding = 0
        self.sequence = 0
        self.done = False
        """True once the arrivals are over (the faults then probe on their own)."""
        self.late_ms: list[float] = []
        """How late the driver sent the requests it sent late (ms past their due time)."""

    def now(self) -> float:
        return time.monotonic() - self.started

    # -- one request of each kind ------------------------------------------------
    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        assert self.session is not None
        try:
            async with self.session.post(
                self.base_url + path, data=json.dumps(body), headers=self.headers
            ) as response:
                raw = await response.read()
                try:
                    payload = json.loads(raw) if raw else {}
                except ValueError:  # an answer of the edge (HAProxy), not of rankgate
                    payload = {"error": "not_json", "body": raw[:160].decode(errors="replace")}
                return response.status, payload, "retry-after" in response.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, {"error": type(exc).__name__}, False

    def keep(self, kind: str, due: float, status: int, what: str, **more: Any) -> None:
        # From when it was due: time spent behind a slow server is not hidden.
        latency = (time.monotonic() - self.started - due) * 1000.0
        self.ledger.answers.append(Answer(kind, due, latency, status, what, **more))

    def refused(
        self, kind: str, due: float, status: int, payload: dict[str, Any], retry: bool
    ) -> None:
        """Keep an answer other than the one hoped for: its `error` (or the edge's body)."""
        what = str(payload.get("error", f"http_{status}"))
        self.keep(kind, due, status, what, retry_after=retry, body=str(payload.get("body", "")))

    async def rank(self, kind: str, due: float) -> None:
        pool = self.denied if kind == "rank_denied" and self.denied else self.granted
        body = dict(self.random.choice(pool))
        if kind == "explain":
            body["explain"] = True
        status, payload, retry = await self.post("/v1/rank", body)
        if status == 200:
            fallback = payload.get("fallback")
            what = f"fallback:{fallback['reason']}" if fallback else "personalized"
            request_id = payload.get("request_id", "")
            items = [i["item_id"] for i in payload.get("items", [])]
            if items and request_id and not fallback:  # its outcomes must join
                self.recent.append(Shown(request_id, body["user_id"], items))
            self.keep(kind, due, status, what, request_id=request_id)
        else:
            self.refused(kind, due, status, payload, retry)

    async def events(self, due: float) -> None:
        if not self.recent:
            return await self.rank("rank", due)
        shown = self.random.choice(self.recent)
        self.sequence += 1
        base = f"soak-{self.run_id}-e{self.sequence}"
        stamp = time.time()
        event = {
            "user_id": shown.user_id,
            "item_id": shown.items[0],
            "request_id": shown.request_id,
        }
        batch = [{"event_id": f"{base}-i", "type": "impression", "timestamp": stamp, **event}]
        if self.random.random() < CLICK_SHARE:
            batch.append({"event_id": f"{base}-c", "type": "click", "timestamp": stamp, **event})
        status, payload, retry = await self.post("/v1/events", {"events": batch})
        if status == 202:
            at = self.now()
            for one, stream_id in zip(batch, payload.get("stream_ids", []), strict=False):
                if stream_id is not None:
                    self.ledger.accepted_events[one["event_id"]] = (shown.request_id, at)
            self.keep("events", due, status, "accepted")
        else:
            for one in batch:
                self.ledger.refused_events[one["event_id"]] = shown.request_id
            self.refused("events", due, status, payload, retry)

    async def consent(
        self, due: float, person: str | None = None, granted: bool | None = None
    ) -> bool:
        """One decision of a soak person; True when acknowledged."""
        if person is None:
            free = [p for p in self.people if p not in self.busy and p not in self.ledger.uncertain]
            if not free:
                return False
            person = self.random.choice(free)
        if granted is None:
            granted = not self.ledger.consent_acked.get(person, False)
        self.busy.add(person)
        try:
            body = {"user_id": person, "purposes": {self.purpose: granted}, "source": "soak"}
            status, payload, retry = await self.post("/v1/consent", body)
        finally:
            self.busy.discard(person)
        if status == 200:
            self.ledger.consent_acked[person] = granted
            self.keep("consent", due, status, "recorded")
            return True
        if status >= 500 or status == 0:
            self.ledger.uncertain.add(person)
        self.refused("consent", due, status, payload, retry)
        return False

    async def withdraw(self, count: int) -> list[str]:
        """Withdrawals of `count` people who hold a grant, all acknowledged (or not)
        before this returns: what a Redis kill right after must not lose."""
        holders = [
            p
            for p, g in self.ledger.consent_acked.items()
            if g and p not in self.busy and p not in self.ledger.uncertain
        ][:count]
        due = self.now()
        acked = await asyncio.gather(*(self.consent(due, p, False) for p in holders))
        return [p for p, ok in zip(holders, acked, strict=True) if ok]

    # -- the arrivals -------------------------------------------------------------
    async def one(self, kind: str, due: float) -> None:
        self.outstanding += 1
        try:
            if kind == "events":
                await self.events(due)
            elif kind == "consent":
                await self.consent(due)
            else:
                await self.rank(kind, due)
        finally:
            self.outstanding -= 1

    def session_for(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
            connector=aiohttp.TCPConnector(limit=MAX_OUTSTANDING),
        )

    async def closed(self, concurrency: int, duration_s: float) -> float:
        """The mix's peak: answers per second of `concurrency` clients, each sending
        its next request when the last is answered (this ledger is thrown away)."""
        kinds, weights = list(MIX), list(MIX.values())
        async with self.session_for() as session:
            self.session = session
            self.started = time.monotonic()

            async def client() -> None:
                while self.now() < duration_s:
                    await self.one(self.random.choices(kinds, weights)[0], self.now())

            await asyncio.gather(*(client() for _ in range(concurrency)))
        ok = sum(1 for a in self.ledger.answers if a.status in (200, 202))
        return ok / duration_s

    async def run(self, rate: float, duration_s: float) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        self.loop = asyncio.get_running_loop()
        async with self.session_for() as session:
            self.session = session
            self.started = time.monotonic()
            tasks: set[asyncio.Task[None]] = set()
            n = 0
            while not self.stopping:
                due = n / rate
                if due >= duration_s:
                    break
                wait = due - self.now()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    self.late_ms.append(-wait * 1000.0)  # the driver itself behind
                n += 1
                if self.outstanding >= MAX_OUTSTANDING:
                    self.ledger.not_sent += 1
                    continue
                kind = self.random.choices(kinds, weights)[0]
                task = asyncio.create_task(self.one(kind, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=TIMEOUT_S + 5)
        self.done = True

    def call(self, coroutine: Any, timeout_s: float = 30.0) -> Any:
        """Run `coroutine` on the traffic's loop from another thread (the faults)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)
