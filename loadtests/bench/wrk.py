"""Closed-loop load from `wrk` (a C load generator), for the benchmark.

`wrk` runs with one thread and `-c` connections, each sending its next request
as soon as the previous one is answered. A Lua script written per run rotates
the request bodies, sets the API key, counts the answers by status and by
`fallback.reason` (a `string.match` on each body) and prints one JSON line from
`done()`: requests, duration, socket errors, the counts, and latency percentiles
(wrk measures in microseconds). `summarize` turns it into the figures the Python
driver (loadtests.drive) reports, so either driver fills the same tables.

When `wrk` is missing, `ensure_wrk` installs Debian's package if that is
permitted (root, apt-get present, not refused); otherwise the benchmark uses the
Python driver and says so.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

MARKER = "RANKGATE_WRK "
"""Prefix of the JSON line the script's done() prints."""

PERCENTILES = (50.0, 99.0, 99.9)

LUA_TEMPLATE = r"""
-- Written by loadtests/bench/wrk.py for one run: rotating bodies, outcome counts, JSON summary.
local bodies = {
%(bodies)s
}
local auth = %(auth)s
local threads = {}

function setup(thread)
  thread:set("offset", #threads * 7919)
  table.insert(threads, thread)
end

function init(args)
  sent = 0
  counts = {}
end

function request()
  sent = sent + 1
  local headers = { ["Content-Type"] = "application/json" }
  if auth ~= "" then headers["Authorization"] = "Bearer " .. auth end
  return wrk.format("POST", nil, headers, bodies[(sent + offset) %% #bodies + 1])
end

local function count(key)
  counts[key] = (counts[key] or 0) + 1
end

function response(status, headers, body)
  if status ~= 200 then
    count("http_" .. status)
    return
  end
  local fallback = string.match(body, '"fallback"%%s*:%%s*(%%b{})')
  if fallback then
    count("fallback:" .. (string.match(fallback, '"reason"%%s*:%%s*"([^"]*)"') or "unknown"))
  elseif string.find(body, '"fallback"%%s*:%%s*null') then
    count("personalized")
  else
    count("ranked")  -- a baseline: it ranks, it has no notion of fallback
  end
end

local function quote(text)
  return '"' .. string.gsub(text, '["\\]', '\\%%0') .. '"'
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for key, value in pairs(thread:get("counts") or {}) do
      total[key] = (total[key] or 0) + value
    end
  end
  local outcomes = {}
  for key, value in pairs(total) do
    table.insert(outcomes, quote(key) .. ":" .. string.format("%%d", value))
  end
  local percentiles = {}
  for _, q in ipairs({ %(percentiles)s }) do
    table.insert(percentiles, quote(tostring(q)) .. ":" .. string.format("%%.1f", latency:percentile(q)))
  end
  local e = summary.errors
  io.write(%(marker)s .. "{"
    .. '"requests":' .. string.format("%%d", summary.requests)
    .. ',"duration_us":' .. string.format("%%d", summary.duration)
    .. ',"socket_errors":{"connect":' .. e.connect .. ',"read":' .. e.read
    .. ',"write":' .. e.write .. ',"timeout":' .. e.timeout .. '}'
    .. ',"status_errors":' .. e.status
    .. ',"latency_us":{' .. table.concat(percentiles, ",") .. '}'
    .. ',"latency_mean_us":' .. string.format("%%.1f", latency.mean)
    .. ',"latency_max_us":' .. string.format("%%.1f", latency.max)
    .. ',"outcomes":{' .. table.concat(outcomes, ",") .. "}}\n")
end
"""


def lua_long_string(text: str) -> str:
    """`text` as a Lua long bracket string that no `]=...=]` inside it can close."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def lua_script(bodies: list[bytes], api_key: str | None) -> str:
    """The Lua script of one wrk run (see LUA_TEMPLATE)."""
    return LUA_TEMPLATE % {
        "bodies": ",\n".join(f"  {lua_long_string(b.decode())}" for b in bodies),
        "auth": lua_long_string(api_key or ""),
        "percentiles": ", ".join(f"{q:g}" for q in PERCENTILES),
        "marker": json.dumps(MARKER),
    }


def parse_output(stdout: str) -> dict[str, Any]:
    """The JSON summary the script printed among wrk's own lines."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            parsed: dict[str, Any] = json.loads(line[len(MARKER) :])
            return parsed
    raise ValueError(f"wrk printed no summary line ({MARKER.strip()}): {stdout[-500:]!r}")


def _ms(microseconds: float) -> float:
    return round(microseconds / 1000.0, 2) if math.isfinite(microseconds) else float("nan")


def summarize(raw: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """wrk's summary as the figures of loadtests.drive: requests, errors (non-2xx
    answers + socket errors), throughput, p50/p99/p99.9 in ms, outcomes."""
    duration_s = raw["duration_us"] / 1e6
    outcomes: dict[str, int] = dict(raw.get("outcomes") or {})
    socket_errors = sum(raw["socket_errors"].values())
    if socket_errors:
        outcomes["socket_error"] = socket_errors
    http_errors = sum(v for k, v in outcomes.items() if k.startswith("http_"))
    latency = raw["latency_us"]
    requests = int(raw["requests"])
    return {
        "driver": "wrk",
        "concurrency": concurrency,
        "duration_s": round(duration_s, 2),
        "requests": requests,
        "ok": requests - http_errors,
        "errors": http_errors + socket_errors,
        "throughput_rps": round(requests / duration_s, 1) if duration_s > 0 else 0.0,
        "p50_ms": _ms(float(latency["50"])),
        "p99_ms": _ms(float(latency["99"])),
        "p999_ms": _ms(float(latency["99.9"])),
        "outcomes": outcomes,
        "server_stage_median_ms": {},
    }


def wrk_command(wrk: str, url: str, concurrency: int, duration_s: float, script: Path) -> list[str]:
    # wrk reads whole seconds.
    seconds = max(1, math.ceil(duration_s))
    return [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
    ]


def run_wrk(
    wrk: str,
    url: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    bodies: list[bytes],
    api_key: str | None,
) -> dict[str, Any]:
    """A warm-up run (discarded), then the measured one; the measured one's figures."""
    with tempfile.TemporaryDirectory(prefix="rankgate-wrk-") as folder:
        script = Path(folder) / "bench.lua"
        script.write_text(lua_script(bodies, api_key))
        runs = [warmup_s, duration_s] if warmup_s > 0 else [duration_s]
        for seconds in runs:
            result = subprocess.run(
                wrk_command(wrk, url, concurrency, seconds, script),
                capture_output=True,
                text=True,
                timeout=seconds * 4 + 60,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr[-500:]}")
        return summarize(parse_output(result.stdout), concurrency)


def wrk_version() -> str | None:
    """The first line `wrk --version` prints, when wrk is installed."""
    path = shutil.which("wrk")
    if path is None:
        return None
    result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    lines = (result.stdout or result.stderr).splitlines()
    return lines[0].strip() if lines else None


def install_permitted() -> bool:
    """Installing Debian's wrk is possible here: root, with apt-get."""
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def ensure_wrk(allow_install: bool, say: Any) -> tuple[str | None, str]:
    """wrk's path (None: use the Python driver) and why."""
    found = shutil.which("wrk")
    if found:
        return found, "wrk found on PATH"
    if not allow_install:
        return None, "wrk not installed and installing was refused (--no-install)"
    if not install_permitted():
        return None, "wrk not installed and not installable here (needs root and apt-get)"
    say("• wrk not found: installing Debian's package (apt-get install wrk)")
    quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]):
        result = subprocess.run(command, capture_output=True, text=True, env=quiet, check=False)
        if result.returncode != 0:
            return None, f"installing wrk failed ({' '.join(command)}): {result.stderr[-300:]}"
    found = shutil.which("wrk")
    return (found, "wrk installed with apt-get") if found else (None, "wrk still missing")
