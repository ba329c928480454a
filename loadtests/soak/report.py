"""The soak's report: the figures (`soak.json`) and the page people read (`soak.md`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from loadtests.soak.memory import is_data_store, judgments
from loadtests.soak.traffic import Answer, Ledger

DOCUMENTED = "200, 202, 4xx for bad input, 503 with Retry-After"
MEMORY_VERDICT = (
    "memory: every server process that lived half an hour after warm-up under 5 % per "
    "hour over the second half of that life (the 95 % interval of the slope below 5 %); "
    "Redis's data in its own section"
)
NODE_LOSS_WINDOW_S = 10.0
"""Requests in flight on a replica behind Ray Serve's proxy (the multi-node
variant) that is lost, with its node or alone, fail (the proxy answers 500), for at
most this long after the loss (docs/cluster.md, "Node loss")."""


def documented(answer: Answer, losses: tuple[float, ...] = ()) -> bool:
    back = answer.due + answer.latency_ms / 1000.0
    return (
        answer.status in (200, 202)
        or 400 <= answer.status < 500
        or (answer.status == 503 and answer.retry_after)
        or (
            answer.status == 500
            and any(0.0 <= back - lost <= NODE_LOSS_WINDOW_S for lost in losses)
        )
    )


def requests_section(
    ledger: Ledger, duration_s: float, losses: tuple[float, ...] = ()
) -> dict[str, Any]:
    sent: Counter[str] = Counter(a.kind for a in ledger.answers)
    statuses: Counter[str] = Counter(f"{a.kind} {a.status}" for a in ledger.answers)
    others: Counter[str] = Counter(
        f"{a.status} {a.what}" + (" (Retry-After)" if a.retry_after else "")
        for a in ledger.answers
        if a.status not in (200, 202)
    )
    undocumented: Counter[str] = Counter(
        f"{a.status} {a.what}" for a in ledger.answers if not documented(a, losses)
    )
    examples = [
        {
            "due_s": round(a.due, 1),
            "kind": a.kind,
            "status": a.status,
            "what": a.what,
            "body": a.body,
        }
        for a in ledger.answers
        if not documented(a, losses)
    ][:50]
    return {
        "undocumented_examples": examples,
        "sent": sum(sent.values()) + ledger.not_sent,
        "answered": len(ledger.answers),
        "not_sent_backlog": ledger.not_sent,
        "per_second": round(len(ledger.answers) / max(duration_s, 1e-9), 1),
        "by_kind": dict(sent),
        "by_kind_and_status": dict(sorted(statuses.items())),
        "other_than_200": dict(others.most_common()),
        "undocumented": dict(undocumented.most_common()),
        "failed_on_loss": sum(
            1 for a in ledger.answers if a.status == 500 and documented(a, losses)
        ),
    }


def windows_section(ledger: Ledger, window_s: float) -> list[dict[str, Any]]:
    """Per window: rank latency percentiles (of 200s, from when each was due) and
    what answered (personalized, each fallback reason, other statuses)."""
    latencies: dict[int, list[float]] = defaultdict(list)
    answers: dict[int, Counter[str]] = defaultdict(Counter)
    for a in ledger.rank_answers():
        w = int(a.due // window_s)
        answers[w][a.what if a.status == 200 else f"http_{a.status}"] += 1
        if a.status == 200:
            latencies[w].append(a.latency_ms)
    rows = []
    for w in sorted(answers):
        values = np.array(latencies[w]) if latencies[w] else np.array([np.nan])
        p50, p99, p999 = (float(np.percentile(values, q)) for q in (50, 99, 99.9))
        rows.append(
            {
                "window": w,
                "from_s": round(w * window_s),
                "ranks": sum(answers[w].values()),
                "p50_ms": round(p50, 1),
                "p99_ms": round(p99, 1),
                "p999_ms": round(p999, 1),
                "answers": dict(answers[w].most_common()),
            }
        )
    return rows


def verdicts(report: dict[str, Any]) -> dict[str, bool]:
    audit, events, consent = report["audit"], report["events"], report["consent"]
    withdrawals = report["withdrawals_before_kills"]
    judged = memory_judgments(report)
    return {
        "audit: 0 missing, 0 duplicated": audit["missing"] == 0 and audit["duplicated"] == 0,
        "events: 0 lost, 0 applied twice": events["lost"] == 0 and events["applied_twice"] == 0,
        "consent: 0 acknowledged writes lost": consent["lost"] == 0 and withdrawals["lost"] == 0,
        "keys: no revoked key accepted past the bound": all(
            k["refused_after_s"] is not None
            and (k.get("last_accepted_sent_s") or 0.0) <= k["bound_s"]
            for k in report["keys"]
        ),
        f"responses: only the documented ones ({DOCUMENTED})": not report["requests"][
            "undocumented"
        ],
        MEMORY_VERDICT: all(
            j["verdict"] in ("under", "too short")
            for name, j in judged.items()
            if not is_data_store(name)
        ),
        "faults: every one recovered": all(f["recovered_s"] is not None for f in report["faults"]),
    }


def memory_judgments(report: dict[str, Any]) -> dict[str, Any]:
    """Per process, whether its memory grows (loadtests/soak/memory.py `judge`)."""
    return judgments(report["memory"], report["window_s"], report["warmup_s"])


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def fault_at(faults: list[dict[str, Any]], due_s: float, margin_s: float = 1.0) -> str:
    """The faults under way at `due_s` (from `margin_s` before each one's start until it
    had recovered), as `name@start s`; "none" when there was none."""
    under_way = [
        f"{f['name']}@{f['started']:.1f} s"
        for f in faults
        if f["started"] - margin_s <= due_s <= f["ended"] + (f["recovered_s"] or 0.0) + margin_s
    ]
    return ", ".join(under_way) or "none"


def render_markdown(report: dict[str, Any]) -> str:
    r = report
    lines = [
        "# Soak",
        "",
        (
            f"{r['duration_s']:.0f} s of open-loop load at {r['rate']:.1f} requests/s "
            f"({r['share']:.0%} of the mix's measured peak of {r['peak_rps']:.1f} answers/s), with "
            f"{len(r['faults'])} faults; measured {r['measured_at']} on {r['machine']}. "
            f"Command: `{r['command']}`. {r['replicas']} RankIngress replica(s), "
            f"`audit.before_answer: {str(r['audit_before_answer']).lower()}`."
            + (
                f" A Ray cluster on this host: a head and {r['nodes']} worker nodes, one "
                "replica each (loadtests/soak/cluster.py)."
                if r.get("nodes")
                else ""
            )
        ),
        "",
        "## Verdicts",
        "",
    ]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in r["verdicts"].items()]
    req = r["requests"]
    lines += [
        "",
        "## Requests",
        "",
        (
            f"Sent {req['sent']:,}, answered {req['answered']:,} ({req['per_second']}/s), "
            f"not sent (backlog) {req['not_sent_backlog']}. The driver sent "
            f"{r['driver_late']['late_share']:.1%} of requests late (p99 {r['driver_late']['p99_ms']} ms, "
            f"max {r['driver_late']['max_ms']} ms past due)."
        ),
        "",
    ]
    lines += table(
        ["kind and status", "count"], [[k, f"{v:,}"] for k, v in req["by_kind_and_status"].items()]
    )
    lines += ["", "Every answer other than 200/202, by status and cause:", ""]
    lines += table(
        ["status and cause", "count"],
        [[k, v] for k, v in req["other_than_200"].items()] or [["none", 0]],
    )
    if req["undocumented_examples"]:
        lines += [
            "",
            "Answers outside the documented ones (the first 50), with the fault under way:",
            "",
        ]
        lines += table(
            ["due at s", "kind", "status", "cause", "fault under way"],
            [
                [x["due_s"], x["kind"], x["status"], x["what"], fault_at(r["faults"], x["due_s"])]
                for x in req["undocumented_examples"]
            ],
        )
    if req.get("failed_on_loss"):
        lines += [
            "",
            (
                f"Of these, {req['failed_on_loss']} were 500s that came back within "
                f"{NODE_LOSS_WINDOW_S:.0f} s of the loss of a node or a replica behind Ray "
                "Serve's proxy: requests in flight on it (docs/cluster.md, Node loss)."
            ),
        ]
    lines += ["", "## Counted to the last record", ""]
    a, e, c, w = r["audit"], r["events"], r["consent"], r["withdrawals_before_kills"]
    lines += table(
        ["ledger", "figures"],
        [
            [
                "audit",
                (
                    f"{a['answered']:,} ranks answered 200 → {a['records']:,} records; "
                    f"missing {a['missing']}, duplicated {a['duplicated']}"
                ),
            ],
            [
                "events",
                (
                    f"{e['accepted']:,} accepted (202), {e['refused']} refused "
                    f"({e.get('refused_joined', 0)} of them written all the same, joined once); joined "
                    f"{e['joined']:,}, lost {e['lost']}, applied twice "
                    f"{e['applied_twice']}; consumer pending {e['consumer_pending']}, lag {e['consumer_lag']}"
                ),
            ],
            [
                "consent",
                (
                    f"{c['writes_acknowledged']:,} writes acknowledged; {c['people_checked']} "
                    f"people read back, lost {c['lost']} ({c['uncertain_people']} with a write not "
                    "acknowledged set aside)"
                ),
            ],
            [
                "withdrawals right before Redis kills",
                (
                    f"{w['acknowledged']} acknowledged, "
                    f"{w['read_back']} read back after the restart, lost {w['lost']}"
                ),
            ],
        ],
    )
    lines += ["", "## Keys", ""]
    lines += table(
        [
            "created at s",
            "accepted after s",
            "revoked at s",
            "last accepted request sent after s",
            "first refusal back after s",
            "bound s",
        ],
        [
            [
                k["created_at_s"],
                k["accepted_after_s"],
                k["revoked_at_s"],
                k.get("last_accepted_sent_s"),
                k["refused_after_s"],
                k["bound_s"],
            ]
            for k in r["keys"]
        ],
    )
    lines += ["", "## Faults and recovery", ""]
    lines += table(
        ["fault", "at s", "injected for s", "recovered after s", "detail"],
        [
            [
                f["name"],
                round(f["started"]),
                round(f["ended"] - f["started"], 1),
                "not within limit" if f["recovered_s"] is None else round(f["recovered_s"], 1),
                (f["error"] or f["detail"]).replace("|", "/")[:160],
            ]
            for f in r["faults"]
        ],
    )
    lines += ["", f"## Latency and answers per {r['window_s']:.0f}-second window (ranks)", ""]
    lines += table(
        ["from s", "ranks", "p50 ms", "p99 ms", "p99.9 ms", "answers"],
        [
            [
                x["from_s"],
                x["ranks"],
                x["p50_ms"],
                x["p99_ms"],
                x["p999_ms"],
                ", ".join(f"{k} {v}" for k, v in x["answers"].items()),
            ]
            for x in r["windows"]
        ],
    )
    lines += ["", "## Resident memory (MB) per process per window", ""]
    mem = r["memory"]
    judged = memory_judgments(r)
    basis = "its means per minute" if mem.get("minutes") else "its window means"
    lines += [
        (
            f"Judged on {basis}: the slope over the second half of each process's life "
            "after warm-up, with a 95 % interval widened for autocorrelation "
            "(loadtests/soak/memory.py); `too short`: less than half an hour after warm-up."
        ),
        "",
    ]
    count = max((len(v) for v in mem["windows"].values()), default=0)
    lines += table(
        [
            "process",
            *[f"w{i}" for i in range(count)],
            "growth per hour after warm-up",
            "over its second half [95 % interval]",
            "judged",
        ],
        [
            [
                name,
                *[("" if v is None else v) for v in row],
                *growth_cells(mem["growth"], name),
                *judgment_cells(judged.get(name, {})),
            ]
            for name, row in mem["windows"].items()
        ],
    )
    lines += ["", "## Redis per window", ""]
    lines += table(
        ["from s", "dataset MB", "forks", "longest fork ms", "saving (RDB)", "rewriting (AOF)"],
        [
            [
                w["from_s"],
                w["used_mb"],
                w["forks"],
                w["longest_fork_ms"],
                f"{w['saving_share']:.0%}",
                f"{w['rewriting_share']:.0%}",
            ]
            for w in r.get("redis", [])
        ],
    )
    return "\n".join(lines) + "\n"


def growth_cells(growth: dict[str, dict[str, Any]], name: str) -> list[str]:
    g = growth.get(name, {})
    if "growth_percent_per_hour" not in g:
        return [f"lived {g.get('lived_s', 0)} s after warm-up"]
    return [f"{g['growth_percent_per_hour']:+.2f} % ({g['growth_mb_per_hour']:+.1f} MB)"]


def judgment_cells(j: dict[str, Any]) -> list[str]:
    if "percent_per_hour" not in j:
        return ["", j.get("verdict", "")]
    return [
        (
            f"{j['percent_per_hour']:+.2f} % [{j['low']:+.2f}, {j['high']:+.2f}] "
            f"({j['mb_per_hour']:+.1f} MB)"
        ),
        j["verdict"],
    ]
