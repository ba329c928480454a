"""The project's prepare step: write the tables Feast and training read.

`rankgate setup` calls `prepare(data_dir)` with the home's data folder (the
`${RANKGATE_DATA_DIR}` of rankgate.yaml and of the Feast definitions) whenever
a source of the project changed. `rankgate setup --demo-consent` (and only it)
calls `demo_user_ids()` to make up consent for the sample's users; never return
real people's ids from it. `rankgate project check` calls `prepare` with a
temporary folder.

This one generates a sample shop, the same on every machine: users in a few
segments, items in a few categories, and logged impressions whose clicks depend
on segment, category, price and device, so a model has something to learn.
Its size is the three numbers below (`rankgate init --sample-size` writes them);
it is generated column by column, the log in chunks of CHUNK rows appended to
the Parquet file, so a million people and ten million impressions fit in a few
hundred MB. Replace it with a step that exports your own tables, written the same
way (a warehouse export in chunks, appended with pyarrow's ParquetWriter):

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
from rankgate.core.settings import get_settings

N_SHOPPERS = 300
N_PRODUCTS = 40
N_IMPRESSIONS = 6000
SEGMENTS = ["new", "regular", "loyal", "bargain"]
CATEGORIES = ["books", "garden", "kitchen", "sports", "toys"]
DEVICES = ["mobile", "desktop", "app"]
# Impression times: the 30 days before this date (fixed, so the data is too).
LOG_END = datetime(2026, 1, 1, tzinfo=UTC)
SEED = 20260101
# Log rows generated and written at a time (bounds the memory a large log takes).
CHUNK = 1_000_000


def demo_user_ids() -> list[str]:
    """The generated sample's user ids (the kind your application would send), for
    `rankgate setup --demo-consent` only: it writes made-up consent for each (about
    half granted, source 'rankgate-demo'). Never real people's ids: their consent
    comes from them (`rankgate consent import`, POST /v1/consent). With your own
    data, delete this function."""
    return [f"user-{n:04d}" for n in range(N_SHOPPERS)]


def shopper_keys(ids: list[str]) -> object:
    """The pseudonymous keys of `ids`, as one Arrow string array (built 100,000 at a time,
    so a million keys never sit in memory as Python strings)."""
    import pyarrow as pa

    secret = get_settings().user_key_secret
    step = 100_000
    return pa.concat_arrays(
        [
            pa.array([user_key(i, secret) for i in ids[start : start + step]], pa.string())
            for start in range(0, len(ids), step)
        ]
        or [pa.array([], pa.string())]
    )


def prepare(data_dir: Path) -> dict[str, int]:
    """Write the sample's tables into `data_dir`; returns their row counts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data_dir.mkdir(parents=True, exist_ok=True)
    # Feature rows carry the time they were prepared: a view's TTL counts from it.
    updated = pa.scalar(datetime.now(UTC).replace(microsecond=0), pa.timestamp("us", tz="UTC"))
    rng = np.random.default_rng(SEED)

    segment_of = rng.integers(0, len(SEGMENTS), N_SHOPPERS)
    category_of = rng.integers(0, len(CATEGORIES), N_PRODUCTS)
    visits = rng.poisson(4, N_SHOPPERS)
    price = rng.lognormal(3.0, 0.6, N_PRODUCTS).round(2)
    keys = shopper_keys(demo_user_ids())
    users = pa.table(
        {
            "shopper_key": keys,
            "updated_at": pa.repeat(updated, N_SHOPPERS),
            "segment": pc.take(pa.array(SEGMENTS), segment_of),
            "visits_30d": visits.astype("int64"),
        }
    )
    product_ids = np.arange(1, N_PRODUCTS + 1, dtype="int64")
    items = pa.table(
        {
            "product_id": product_ids,
            "updated_at": pa.repeat(updated, N_PRODUCTS),
            "category": pc.take(pa.array(CATEGORIES), category_of),
            "price": price,
        }
    )
    pq.write_table(users, data_dir / "shopper_profile.parquet")
    pq.write_table(items, data_dir / "item_attributes.parquet")

    # Who saw what, and whether they clicked: each segment has its taste for each
    # category; cheaper items, frequent visitors and the app click a little more.
    # Chunk c holds the impressions of its share of the 30 days, so the log is in
    # time order; a log of one chunk is drawn exactly as it always was.
    taste = rng.normal(0.0, 1.0, (len(SEGMENTS), len(CATEGORIES)))
    start = epoch_ns(LOG_END - timedelta(days=30))
    span = 30 * 24 * 3600
    chunks = max(1, -(-N_IMPRESSIONS // CHUNK))
    schema = pa.schema(
        [
            ("shopper_key", pa.string()),
            ("product_id", pa.int64()),
            ("clicked", pa.int64()),
            ("shown_at", pa.timestamp("ns", tz="UTC")),
            ("device", pa.string()),
        ]
    )
    with pq.ParquetWriter(data_dir / "interactions.parquet", schema) as writer:
        for chunk in range(chunks):
            rows = N_IMPRESSIONS * (chunk + 1) // chunks - N_IMPRESSIONS * chunk // chunks
            user_at = rng.integers(0, N_SHOPPERS, rows)
            item_at = rng.integers(0, N_PRODUCTS, rows)
            device = rng.choice(len(DEVICES), rows, p=[0.5, 0.3, 0.2])
            logit = (
                -1.8
                + 2.0 * taste[segment_of[user_at], category_of[item_at]]
                - 0.01 * (price[item_at] - 20.0)
                + 0.05 * visits[user_at]
                + 0.3 * (device == DEVICES.index("app"))
            )
            click = rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))
            seconds = np.sort(
                rng.integers(span * chunk // chunks, span * (chunk + 1) // chunks, rows)
            )
            shown_at = start + seconds.astype("int64") * 1_000_000_000
            writer.write_table(
                pa.table(
                    {
                        "shopper_key": pc.take(keys, user_at),
                        "product_id": product_ids[item_at],
                        "clicked": click.astype("int64"),
                        "shown_at": pa.array(shown_at, pa.timestamp("ns", tz="UTC")),
                        "device": pc.take(pa.array(DEVICES), device),
                    },
                    schema=schema,
                )
            )
    return {"users": N_SHOPPERS, "items": N_PRODUCTS, "interactions": N_IMPRESSIONS}


def epoch_ns(moment: datetime) -> int:
    """`moment` in nanoseconds since the epoch."""
    return int(moment.timestamp()) * 1_000_000_000
