"""The example's prepare step: derive user ids and write the tables Feast reads.

`rankgate setup` calls `prepare(data_dir)` with the home's data folder (the
`${RANKGATE_DATA_DIR}` of rankgate.yaml and of the Feast definitions) whenever
the project's sources changed; `rankgate setup --demo-consent` (as `./run` runs it)
calls `demo_user_ids()` to make up consent for the example's visitors.

The logs have no visitor id column. A visitor is the combination of all visitor
columns (`user_feature_0..3` and the 80 `user-item_affinity_*` scores; 561 distinct
profiles), and their `user_id` is derived from it:

    user_id = "u-" + sha256("|".join(visitor column values, in file order))[:12]

so the same visitor gets the same id on every machine. The values are the file's
own text, read with the csv module. The ids are raw user ids like any
application's: only their pseudonymous key (rankgate.core.pseudonym) is written to
the tables, and so to Feast and Redis.

The sample does not say where its visitors live. For the lineage of the versions
trained on it (and the residency rules of the example's policy), `prepare` makes up a
region per visitor, EU or US, from their user id, as it makes up the ids themselves:

    region = ("EU", "US")[int(sha256("region|" + user_id)[:8], 16) % 2]

and writes it to `people.parquet` (the pseudonymous key and the region), the table
rankgate.yaml's `data_regions` names.

Feast needs an event time per feature row. The sample's logs are from November
2019; the prepared feature tables carry the time `prepare` ran (the snapshot
time of the features), so a feature view's TTL counts from preparation.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from rankgate.core.pseudonym import user_key

if TYPE_CHECKING:
    import pandas as pd

DATASET_DIR = Path(__file__).resolve().parent / "data"
IMPRESSIONS_CSV = DATASET_DIR / "random_all" / "all.csv.gz"
ITEMS_CSV = DATASET_DIR / "random_all" / "item_context.csv"

N_ITEMS = 80
PROFILE_COLUMNS = [f"user_feature_{i}" for i in range(4)]
RAW_AFFINITY_COLUMNS = [f"user-item_affinity_{i}" for i in range(N_ITEMS)]
# Feast field names: the raw "user-item_affinity_i" is renamed to "affinity_i".
AFFINITY_COLUMNS = [f"affinity_{i}" for i in range(N_ITEMS)]
ITEM_COLUMNS = [f"item_feature_{i}" for i in range(4)]
RECENT_CLICK_COLUMNS = [f"clicks_{i}" for i in range(N_ITEMS)]
VISITOR_COLUMNS = PROFILE_COLUMNS + RAW_AFFINITY_COLUMNS
REGIONS = ("EU", "US")


def derive_user_id(visitor_values: list[str]) -> str:
    joined = "|".join(visitor_values)
    return "u-" + hashlib.sha256(joined.encode()).hexdigest()[:12]


def visitor_region(user_id: str) -> str:
    """The region the example makes up for a visitor (the sample has none)."""
    return REGIONS[int(hashlib.sha256(f"region|{user_id}".encode()).hexdigest()[:8], 16) % 2]


@lru_cache(maxsize=1)
def impression_user_ids() -> tuple[str, ...]:
    """The user id of each logged impression, in file order."""
    with gzip.open(IMPRESSIONS_CSV, "rt", newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows)
        visitor = [header.index(name) for name in VISITOR_COLUMNS]
        return tuple(derive_user_id([row[i] for i in visitor]) for row in rows)


@lru_cache(maxsize=1)
def load_impressions() -> pd.DataFrame:
    """The 10,000 logged impressions, with the derived `user_id` column."""
    import pandas as pd

    frame = pd.read_csv(IMPRESSIONS_CSV, index_col=0)
    frame["user_id"] = list(impression_user_ids())
    return frame


@lru_cache(maxsize=1)
def load_items() -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(ITEMS_CSV, index_col=0)


def example_user_ids() -> list[str]:
    """Distinct example user ids, in order of first appearance in the logs."""
    return list(dict.fromkeys(impression_user_ids()))


def demo_user_ids() -> list[str]:
    """Distinct example user ids, in order of first appearance in the logs: the
    people `rankgate setup --demo-consent` makes up consent for."""
    return example_user_ids()


def prepare(data_dir: Path, snapshot_time: datetime | None = None) -> dict[str, int]:
    """Write the offline tables Feast and training read, keyed by pseudonymous user key
    (and the empty batch source of the streaming view `recent_clicks`), and the people
    table of the visitors' made-up regions."""
    import pandas as pd

    data_dir.mkdir(parents=True, exist_ok=True)
    snapshot = snapshot_time or datetime.now(UTC).replace(microsecond=0)
    impressions = load_impressions()

    visitors = impressions.drop_duplicates("user_id").copy()
    visitors["user_key"] = [user_key(uid) for uid in visitors["user_id"]]
    visitors["event_timestamp"] = snapshot
    profile = visitors[["user_key", "event_timestamp", *PROFILE_COLUMNS]]
    affinity = visitors[["user_key", "event_timestamp", *RAW_AFFINITY_COLUMNS]].rename(
        columns=dict(zip(RAW_AFFINITY_COLUMNS, AFFINITY_COLUMNS, strict=True))
    )
    affinity[AFFINITY_COLUMNS] = affinity[AFFINITY_COLUMNS].astype("float32")

    items = load_items().copy()
    items["event_timestamp"] = snapshot
    items = items[["item_id", "event_timestamp", *ITEM_COLUMNS]]

    people = pd.DataFrame(
        {
            "user_key": visitors["user_key"],
            "region": [visitor_region(uid) for uid in visitors["user_id"]],
        }
    )

    logs = impressions[["timestamp", "item_id", "position", "click", "propensity_score"]].copy()
    logs.insert(0, "user_key", [user_key(uid) for uid in impressions["user_id"]])
    logs["timestamp"] = pd.to_datetime(logs["timestamp"], utc=True)

    profile.to_parquet(data_dir / "user_profile.parquet", index=False)
    affinity.to_parquet(data_dir / "user_item_affinity.parquet", index=False)
    items.to_parquet(data_dir / "item_context.parquet", index=False)
    logs.to_parquet(data_dir / "impressions.parquet", index=False)
    people.to_parquet(data_dir / "people.parquet", index=False)
    recent_clicks_table().to_parquet(data_dir / "recent_clicks.parquet", index=False)
    return {"users": len(visitors), "items": len(items), "impressions": len(logs)}


def recent_clicks_table() -> pd.DataFrame:
    """The batch source behind the `recent_clicks` push source, with no rows: Feast needs
    the table for its registry and historical retrieval, but the view's online rows
    come only from the event stream (training computes its values from the log)."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "user_key": pd.Series([], dtype="string"),
            "event_timestamp": pd.Series([], dtype="datetime64[ns, UTC]"),
        }
    )
    for column in RECENT_CLICK_COLUMNS:
        frame[column] = pd.Series([], dtype="float32")
    return frame
