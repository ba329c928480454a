"""The project's prepare step: write the tables Feast and training read.

`rankgate setup` calls `prepare(data_dir)` with the home's data folder (the
`${RANKGATE_DATA_DIR}` of rankgate.yaml and of the Feast definitions) whenever
a source of the project changed, and `demo_user_ids()` to write demo consent
records. `rankgate project check` calls it with a temporary folder.

This one generates a small sample shop, the same on every machine: users in a few
segments, items in a few categories, and logged impressions whose clicks depend
on segment, category, price and device, so a model has something to learn.
Replace it with a step that exports your own tables, written the same way:

  shopper_profile.parquet     shopper_key, updated_at, <user view fields>
  item_attributes.parquet     product_id, updated_at, <item view fields>
  interactions.parquet        shopper_key, product_id, clicked, shown_at, <context columns>

The column names are this sample's own (rankgate.yaml declares them). User tables
hold the pseudonymous key `rankgate.core.pseudonym.user_key(user_id)`, never the raw id.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from rankgate.core.pseudonym import user_key

N_SHOPPERS = 300
N_PRODUCTS = 40
N_IMPRESSIONS = 6000
SEGMENTS = ["new", "regular", "loyal", "bargain"]
CATEGORIES = ["books", "garden", "kitchen", "sports", "toys"]
DEVICES = ["mobile", "desktop", "app"]
# Impression times: the 30 days before this date (fixed, so the data is too).
LOG_END = datetime(2026, 1, 1, tzinfo=UTC)
SEED = 20260101


def demo_user_ids() -> list[str]:
    """The sample's user ids: the ids your application would send."""
    return [f"user-{n:04d}" for n in range(N_SHOPPERS)]


def prepare(data_dir: Path) -> dict[str, int]:
    """Write the sample's tables into `data_dir`; returns their row counts."""
    import numpy as np
    import pandas as pd

    data_dir.mkdir(parents=True, exist_ok=True)
    # Feature rows carry the time they were prepared: a view's TTL counts from it.
    updated = datetime.now(UTC).replace(microsecond=0)
    rng = np.random.default_rng(SEED)

    segment_of = rng.integers(0, len(SEGMENTS), N_SHOPPERS)
    category_of = rng.integers(0, len(CATEGORIES), N_PRODUCTS)
    visits = rng.poisson(4, N_SHOPPERS)
    price = rng.lognormal(3.0, 0.6, N_PRODUCTS).round(2)
    users = pd.DataFrame(
        {
            "shopper_key": [user_key(user_id) for user_id in demo_user_ids()],
            "updated_at": updated,
            "segment": np.array(SEGMENTS)[segment_of],
            "visits_30d": visits.astype("int64"),
        }
    )
    items = pd.DataFrame(
        {
            "product_id": np.arange(1, N_PRODUCTS + 1, dtype="int64"),
            "updated_at": updated,
            "category": np.array(CATEGORIES)[category_of],
            "price": price,
        }
    )

    # Who saw what, and whether they clicked: each segment has its taste for each
    # category; cheaper items, frequent visitors and the app click a little more.
    taste = rng.normal(0.0, 1.0, (len(SEGMENTS), len(CATEGORIES)))
    user_at = rng.integers(0, N_SHOPPERS, N_IMPRESSIONS)
    item_at = rng.integers(0, N_PRODUCTS, N_IMPRESSIONS)
    device = rng.choice(DEVICES, N_IMPRESSIONS, p=[0.5, 0.3, 0.2])
    logit = (
        -1.8
        + 2.0 * taste[segment_of[user_at], category_of[item_at]]
        - 0.01 * (price[item_at] - 20.0)
        + 0.05 * visits[user_at]
        + 0.3 * (device == "app")
    )
    click = rng.random(N_IMPRESSIONS) < 1.0 / (1.0 + np.exp(-logit))
    seconds = np.sort(rng.integers(0, 30 * 24 * 3600, N_IMPRESSIONS))
    interactions = pd.DataFrame(
        {
            "shopper_key": users["shopper_key"].to_numpy()[user_at],
            "product_id": items["product_id"].to_numpy()[item_at],
            "clicked": click.astype("int64"),
            "shown_at": pd.Timestamp(LOG_END - timedelta(days=30))
            + pd.to_timedelta(seconds, unit="s"),
            "device": device,
        }
    )

    users.to_parquet(data_dir / "shopper_profile.parquet", index=False)
    items.to_parquet(data_dir / "item_attributes.parquet", index=False)
    interactions.to_parquet(data_dir / "interactions.parquet", index=False)
    return {"users": len(users), "items": len(items), "interactions": len(interactions)}
