"""A second rankgate project, generated: Trail Outfitters, an outdoor-gear shop.

It differs from the Open Bandit example wherever a project can: 37 products with
string SKUs ("sku-1001" ...), a `customer` entity joined on `customer_key` and a
`product` entity joined on `sku`, its own view, field and timestamp names, a
catalogue read from a file, a request-context feature (`device`), its own
purposes, regions, item rules and fallback, and models trained outside rankgate
with scikit-learn and converted with skl2onnx.

`write_project(folder)` writes the shop's raw exports (customers, products and an
impression log keyed by raw customer ids) and the project around them: the
prepare step pseudonymises the exports into the tables its Feast repository
reads. `train_models(raw, out)` is the shop's own training job: it encodes
each input as the model declarations say (number: the value; hash: the first 5
hex digits of the sha256 of the text; missing: -1), independently of rankgate's
code, so the served scores check that both sides read the contract alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

N_PRODUCTS = 37
N_CUSTOMERS = 240
IMPRESSIONS_PER_CUSTOMER = 24
SKUS = [f"sku-{1001 + n}" for n in range(N_PRODUCTS)]
CATEGORIES = ["tents", "boots", "jackets", "packs", "stoves"]
BRANDS = ["alpina", "northfold", "ridgeway"]
TIERS = ["bronze", "silver", "gold"]
DEVICES = ["mobile", "desktop", "tablet"]

# Policy facts the tests assert on.
RESTRICTED_IN_EEA = "sku-1007"
CLEARANCE = ["sku-1033", "sku-1034"]
BOOSTED = ["sku-1036", "sku-1037"]
BOOST_FACTOR = 3.0
PRIOR_CLICKS, PRIOR_IMPRESSIONS = 2.0, 60.0

# The models' inputs, in ONNX column order: (name, kind, reference, encoding, group),
# written into models/*.yaml as the project's declarations.
GB_INPUTS = [
    ("customer_age", "feature", "customer_profile:age", "number", "profile"),
    ("loyalty_tier", "feature", "customer_profile:loyalty_tier", "hash", "profile"),
    ("sessions_30d", "feature", "customer_activity:sessions_30d", "number", "activity"),
    ("orders_90d", "feature", "customer_activity:orders_90d", "number", "activity"),
    ("avg_basket_eur", "feature", "customer_activity:avg_basket_eur", "number", "activity"),
    ("price_eur", "feature", "product_catalog:price_eur", "number", "product"),
    ("category", "feature", "product_catalog:category", "hash", "product"),
    ("brand", "feature", "product_catalog:brand", "hash", "product"),
    ("rating", "feature", "product_catalog:rating", "number", "product"),
    ("device", "context", "device", "hash", "context"),
]
# The newsletter model may read profile and catalogue only (the newsletter purpose
# does not permit activity data); it is a linear model, so it has no tree to explain.
LR_INPUTS = [i for i in GB_INPUTS if i[4] in {"profile", "product"}]


def hash_code(text: str) -> float:
    """The `hash` encoding, as the declaration documents it (features/vector.py)."""
    return float(int(hashlib.sha256(text.encode()).hexdigest()[:5], 16))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def favourite_category(age: int, tier: str) -> str:
    """Who likes what: the pattern the models have to find in the features."""
    if age < 30:
        return "packs" if tier == "gold" else "boots"
    if age < 50:
        return "tents" if tier != "bronze" else "jackets"
    return "stoves"


@dataclass
class RawData:
    customers: pd.DataFrame
    products: pd.DataFrame
    impressions: pd.DataFrame


def generate(seed: int = 11) -> RawData:
    """Synthetic but shaped like a shop's exports; deterministic."""
    rng = np.random.default_rng(seed)
    products = pd.DataFrame(
        {
            "sku": SKUS,
            "name": [f"Item {n}" for n in range(N_PRODUCTS)],
            "category": [CATEGORIES[n % len(CATEGORIES)] for n in range(N_PRODUCTS)],
            "brand": rng.choice(BRANDS, N_PRODUCTS),
            "price_eur": np.round(rng.lognormal(4.2, 0.6, N_PRODUCTS), 2),
            "rating": np.round(rng.uniform(2.8, 5.0, N_PRODUCTS), 1),
        }
    )
    ages = rng.integers(18, 76, N_CUSTOMERS)
    tiers = rng.choice(TIERS, N_CUSTOMERS, p=[0.5, 0.35, 0.15])
    customers = pd.DataFrame(
        {
            "customer_id": [f"cust-{n:04d}" for n in range(N_CUSTOMERS)],
            "age": ages,
            "loyalty_tier": tiers,
            "sessions_30d": rng.poisson(6, N_CUSTOMERS),
            "orders_90d": rng.poisson(1.5, N_CUSTOMERS),
            "avg_basket_eur": np.round(rng.gamma(4.0, 25.0, N_CUSTOMERS), 2),
        }
    )
    n = N_CUSTOMERS * IMPRESSIONS_PER_CUSTOMER
    who = np.repeat(np.arange(N_CUSTOMERS), IMPRESSIONS_PER_CUSTOMER)
    shown = products.iloc[rng.integers(0, N_PRODUCTS, n)].reset_index(drop=True)
    device = rng.choice(DEVICES, n, p=[0.55, 0.35, 0.10])
    favourite = np.array([favourite_category(a, t) for a, t in zip(ages, tiers, strict=True)])
    cheap = shown["price_eur"].to_numpy() < 60
    logit = (
        -2.6
        + 2.0 * (shown["category"].to_numpy() == favourite[who])
        + 0.9 * ((device == "mobile") & cheap)
        - 0.7 * ((device == "desktop") & cheap)
        + 0.5 * (shown["rating"].to_numpy() - 4.0)
        + 0.08 * (customers["sessions_30d"].to_numpy()[who] - 6)
    )
    start = datetime(2026, 9, 1, tzinfo=UTC)
    minutes = rng.integers(0, 90 * 24 * 60, n)
    rows = {
        "customer_id": customers["customer_id"].to_numpy()[who],
        "sku": shown["sku"].to_numpy(),
        "device": device,
        "shown_at": [(start + timedelta(minutes=int(m))).isoformat() for m in minutes],
        "clicked": (rng.random(n) < sigmoid(logit)).astype(int),
        # One slot, filled uniformly at random: what off-policy evaluation reads.
        "propensity": np.full(n, 1.0 / N_PRODUCTS),
    }
    impressions = pd.DataFrame(rows).sort_values("shown_at", kind="stable")
    return RawData(customers, products, impressions.reset_index(drop=True))


# -- the project's files ---------------------------------------------------------

RANKGATE_YAML = """\
# Trail Outfitters: 37 outdoor products with string SKUs, shoppers known to the
# feature store only by an HMAC of their customer id.
name: trail_outfitters
description: "Synthetic outdoor-gear shop (tests/second_project.py)"
feast_repo: feature_repo
policies: policies

user: {entity: customer, join_key: customer_key}
item: {entity: product, join_key: sku, id_type: string}

# Product attributes, read whole into each replica's memory.
item_view: product_catalog
# The catalogue is the shop's product export.
catalogue: {file: raw/products.csv, column: sku}

interactions:
  path: ${RANKGATE_DATA_DIR}/impressions.parquet
  item_column: sku
  outcome_column: clicked
  user_column: customer_key
  time_column: shown_at
  # One product per impression, chosen uniformly at random (probability 1/37).
  propensity_column: propensity

# The shopper's device, sent with each request; the storefront model reads it.
context:
  - name: device
    values: [mobile, desktop, tablet]
    description: "Device class of the shopper's session"

prepare: prepare.py
"""

FEATURE_STORE_YAML = """\
project: trail_outfitters
provider: local
registry: data/registry.db
online_store:
  type: redis
  connection_string: ${RANKGATE_FEAST_REDIS}
offline_store:
  type: file
entity_key_serialization_version: 3
"""

DEFINITIONS = '''\
"""Feast definitions of Trail Outfitters: two customer views and the product catalogue.

The sources are the tables prepare.py writes into RANKGATE_DATA_DIR.
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Float64, Int64, String

DATA = Path(os.environ.get("RANKGATE_DATA_DIR") or Path(__file__).parent / "data")

# A shopper, keyed by the HMAC of their customer id: the id never reaches Feast.
customer = Entity(
    name="customer",
    join_keys=["customer_key"],
    value_type=ValueType.STRING,
    description="A shopper, keyed by the HMAC of their customer id.",
)

# A product, keyed by its SKU (a string such as "sku-1001").
product = Entity(
    name="product",
    join_keys=["sku"],
    value_type=ValueType.STRING,
    description="A product of the catalogue.",
)

# What the shopper told us: profile data.
customer_profile = FeatureView(
    name="customer_profile",
    entities=[customer],
    ttl=timedelta(days=400),
    schema=[Field(name="age", dtype=Int64), Field(name="loyalty_tier", dtype=String)],
    source=FileSource(
        name="customer_profile_export",
        path=str(DATA / "customer_profile.parquet"),
        timestamp_field="updated_at",
    ),
    online=True,
)

# What the shopper did lately: behavioural data (not for the newsletter).
customer_activity = FeatureView(
    name="customer_activity",
    entities=[customer],
    ttl=timedelta(days=30),
    schema=[
        Field(name="sessions_30d", dtype=Int64),
        Field(name="orders_90d", dtype=Int64),
        Field(name="avg_basket_eur", dtype=Float64),
    ],
    source=FileSource(
        name="customer_activity_export",
        path=str(DATA / "customer_activity.parquet"),
        timestamp_field="updated_at",
    ),
    online=True,
)

# Product attributes: no personal data.
product_catalog = FeatureView(
    name="product_catalog",
    entities=[product],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="price_eur", dtype=Float64),
        Field(name="category", dtype=String),
        Field(name="brand", dtype=String),
        Field(name="rating", dtype=Float32),
    ],
    source=FileSource(
        name="product_export",
        path=str(DATA / "product_catalog.parquet"),
        timestamp_field="listed_at",
    ),
    online=True,
)
'''

PREPARE = '''\
"""Trail Outfitters' prepare step: pseudonymise the shop's exports for Feast.

The exports in raw/ carry raw customer ids; the tables written here carry only
their pseudonymous key (rankgate.core.pseudonym.user_key), and a snapshot time.
"""

from pathlib import Path

import pandas as pd

from rankgate.core.pseudonym import user_key

RAW = Path(__file__).resolve().parent / "raw"


def prepare(data_dir: Path) -> dict[str, int]:
    data_dir.mkdir(parents=True, exist_ok=True)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    customers = pd.read_csv(RAW / "customers.csv")
    customers.insert(0, "customer_key", [user_key(c) for c in customers.pop("customer_id")])
    customers["updated_at"] = now
    customers[["customer_key", "updated_at", "age", "loyalty_tier"]].to_parquet(
        data_dir / "customer_profile.parquet", index=False
    )
    activity = ["sessions_30d", "orders_90d", "avg_basket_eur"]
    customers[["customer_key", "updated_at", *activity]].to_parquet(
        data_dir / "customer_activity.parquet", index=False
    )
    products = pd.read_csv(RAW / "products.csv")
    products["listed_at"] = now
    products["rating"] = products["rating"].astype("float32")
    products[["sku", "listed_at", "price_eur", "category", "brand", "rating"]].to_parquet(
        data_dir / "product_catalog.parquet", index=False
    )
    log = pd.read_csv(RAW / "impressions.csv")
    log.insert(0, "customer_key", [user_key(c) for c in log.pop("customer_id")])
    log["shown_at"] = pd.to_datetime(log["shown_at"], utc=True)
    log.to_parquet(data_dir / "impressions.parquet", index=False)
    return {"customers": len(customers), "products": len(products), "impressions": len(log)}
'''

POLICY_YAML = f"""\
version: "trail-2026.1"
regions:
  EEA: {{regime: opt_in, description: "Consent before profiling"}}
  NA: {{regime: opt_out, description: "Personalized unless the shopper objected"}}
purposes:
  storefront:
    description: "Rank products in the shop for the shopper."
    explicit_consent: false
    feature_views: [customer_profile, customer_activity, product_catalog]
  newsletter:
    description: "Pick products for the weekly newsletter."
    explicit_consent: true
    feature_views: [customer_profile, product_catalog]
item_rules:
  - name: clearance-not-mailed
    purposes: [newsletter]
    items: {json.dumps(CLEARANCE)}
  - name: eea-restricted
    regions: [EEA]
    items: ["{RESTRICTED_IN_EEA}"]
"""

FALLBACK_YAML = f"""\
version: "trail-2026.1"
strategy: popularity
prior_clicks: {PRIOR_CLICKS}
prior_impressions: {PRIOR_IMPRESSIONS}
boosts:
  - name: new-arrivals
    items: {json.dumps(BOOSTED)}
    factor: {BOOST_FACTOR}
"""

REASONS_YAML = """\
version: "trail-2026.1"
max_reasons_per_item: 2
templates:
  profile: "Shoppers like you ({feature}) often pick this"
  activity: "Matches your recent activity ({feature})"
  product: "Its {feature} suits you"
  context: "Fits how you shop ({feature})"
"""


def features_yaml(inputs: list[tuple[str, str, str, str, str]]) -> str:
    lines = ["# Inputs in ONNX column order.", "inputs:"]
    for name, kind, ref, encoding, group in inputs:
        lines.append(
            f"  - {{name: {name}, {kind}: {json.dumps(ref)}, encoding: {encoding}, group: {group}}}"
        )
    return "\n".join(lines) + "\n"


def write_project(folder: Path, raw: RawData | None = None) -> RawData:
    """The whole project in `folder`; returns the raw data it was generated from."""
    raw = raw or generate()
    files = {
        "rankgate.yaml": RANKGATE_YAML,
        "prepare.py": PREPARE,
        "feature_repo/feature_store.yaml": FEATURE_STORE_YAML,
        "feature_repo/shop.py": DEFINITIONS,
        "policies/policy.yaml": POLICY_YAML,
        "policies/fallback.yaml": FALLBACK_YAML,
        "policies/reasons.yaml": REASONS_YAML,
        "models/gb.yaml": features_yaml(GB_INPUTS),
        "models/lr.yaml": features_yaml(LR_INPUTS),
    }
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (folder / "raw").mkdir(exist_ok=True)
    raw.customers.to_csv(folder / "raw" / "customers.csv", index=False)
    raw.products.to_csv(folder / "raw" / "products.csv", index=False)
    raw.impressions.to_csv(folder / "raw" / "impressions.csv", index=False)
    return raw


# -- the shop's own training job -------------------------------------------------


def encode(value: Any, encoding: str) -> float:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return -1.0
    return hash_code(str(value)) if encoding == "hash" else float(value)


def encoded(frame: pd.DataFrame, inputs: list[tuple[str, str, str, str, str]]) -> np.ndarray:
    """Model rows of a frame with a column per input field (context keys included)."""
    columns = []
    for _, kind, ref, encoding, _ in inputs:
        field = ref if kind == "context" else ref.split(":")[1]
        values = frame[field] if field in frame else [None] * len(frame)
        columns.append([encode(v, encoding) for v in values])
    return np.array(columns, dtype=np.float32).T.reshape(len(frame), len(inputs))


def rows_for(
    raw: RawData,
    inputs: list[tuple[str, str, str, str, str]],
    customer_id: str | None,
    skus: list[str],
    context: dict[str, str],
) -> np.ndarray:
    """Model rows of one customer (None: unknown) for `skus`, as the declaration says."""
    frame = raw.products.set_index("sku").loc[skus].reset_index()
    if customer_id is not None:
        customer = raw.customers.set_index("customer_id").loc[customer_id]
        for field, value in customer.items():
            frame[field] = value
    for key, value in context.items():
        frame[key] = value
    return encoded(frame, inputs)


def training_matrix(
    raw: RawData, inputs: list[tuple[str, str, str, str, str]]
) -> tuple[np.ndarray, np.ndarray]:
    log = raw.impressions.merge(raw.customers, on="customer_id", how="left").merge(
        raw.products, on="sku", how="left"
    )
    return encoded(log, inputs), log["clicked"].to_numpy()


def train_models(raw: RawData, out: Path) -> dict[str, Path]:
    """gb.onnx + gb.joblib (GradientBoostingClassifier) and lr.onnx (LogisticRegression),
    converted with skl2onnx; metrics of each on the latest fifth of the log."""
    import joblib
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, inputs, model in (
        (
            "gb",
            GB_INPUTS,
            GradientBoostingClassifier(n_estimators=80, max_depth=3, random_state=0),
        ),
        ("lr", LR_INPUTS, make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))),
    ):
        x, y = training_matrix(raw, inputs)
        split = int(len(y) * 0.8)
        model.fit(x[:split], y[:split])
        held = model.predict_proba(x[split:])[:, 1]
        metrics = {
            "auc": float(roc_auc_score(y[split:], held)),
            "log_loss": float(log_loss(y[split:], held)),
        }
        classifier = model.steps[-1][1] if hasattr(model, "steps") else model
        onnx_model = to_onnx(
            model, x[:1], options={type(classifier): {"zipmap": False}}, target_opset=15
        )
        paths[f"{name}.onnx"] = out / f"{name}.onnx"
        paths[f"{name}.onnx"].write_bytes(onnx_model.SerializeToString())
        paths[f"{name}.metrics"] = out / f"{name}.metrics.json"
        paths[f"{name}.metrics"].write_text(json.dumps(metrics))
        if name == "gb":
            paths["gb.joblib"] = out / "gb.joblib"
            joblib.dump(model, paths["gb.joblib"])
    return paths


def train_shuffled(raw: RawData, out: Path, seed: int = 3) -> dict[str, Path]:
    """A deliberately worse storefront model: the same inputs and learner as `gb`,
    fitted to the clicks shuffled across impressions (it learns no preference)."""
    import joblib
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier

    out.mkdir(parents=True, exist_ok=True)
    x, y = training_matrix(raw, GB_INPUTS)
    model = GradientBoostingClassifier(n_estimators=80, max_depth=3, random_state=0)
    model.fit(x, np.random.default_rng(seed).permutation(y))
    onnx_model = to_onnx(model, x[:1], options={type(model): {"zipmap": False}}, target_opset=15)
    paths = {"onnx": out / "gb-shuffled.onnx", "joblib": out / "gb-shuffled.joblib"}
    paths["onnx"].write_bytes(onnx_model.SerializeToString())
    joblib.dump(model, paths["joblib"])
    return paths


def popularity(raw: RawData, skus: list[str]) -> dict[str, float]:
    """The fallback scores the project's rules describe, computed from the raw log:
    smoothed click rate, times the boost."""
    stats = raw.impressions.groupby("sku")["clicked"].agg(["sum", "count"])
    return {
        sku: (stats["sum"].get(sku, 0) + PRIOR_CLICKS)
        / (stats["count"].get(sku, 0) + PRIOR_IMPRESSIONS)
        * (BOOST_FACTOR if sku in BOOSTED else 1.0)
        for sku in skus
    }


def popularity_order(raw: RawData, skus: list[str]) -> list[str]:
    score = popularity(raw, skus)
    return sorted(skus, key=lambda s: (-score[s], s))
