"""Baseline (a): one plain FastAPI process (uvicorn), no Ray, no gate, no budget.

python -m loadtests.baselines.plain_fastapi --port 8300
"""

import argparse
from typing import Any

import uvicorn
from fastapi import FastAPI

from loadtests.baselines.common import key_of, open_parts, top_k

app = FastAPI()
fetcher, model, fields = open_parts()


@app.post("/v1/rank")
async def rank(body: dict[str, Any]) -> dict[str, Any]:
    user = await fetcher.fetch_user(key_of(body), fields)
    return top_k(model, fetcher, user.values, body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
