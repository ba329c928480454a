"""The scale project of `rankgate bench --scale`: the template's sample shop at a size,
plus what the measurement needs and the template leaves out (loadtests/scale.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Say = Callable[[str], None]


@dataclass(frozen=True)
class Size:
    people: int
    items: int
    impressions: int

    @property
    def label(self) -> str:
        return f"{short(self.people)}/{short(self.items)}/{short(self.impressions)}"

    def sample_size(self) -> str:
        return f"people={self.people},items={self.items},impressions={self.impressions}"


DEFAULT_SIZES = (Size(10**5, 10**4, 10**6), Size(10**6, 10**5, 10**7))


def short(number: int) -> str:
    """10^6 as 1e6, 2,000 as 2e3: how sizes are named in the report."""
    text = f"{number:.0e}".replace("e+0", "e").replace("e+", "e")
    return text if float(text) == number else str(number)


def parse_size(text: str) -> Size:
    """`1e5,1e4,1e6` (people, items, impressions) as a Size; ValueError says why."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"{text!r}: three numbers, people,items,impressions (e.g. 1e5,1e4,1e6)")
    numbers = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{text!r}: {part!r} is not a number") from None
        if not value.is_integer() or value < 1:
            raise ValueError(f"{text!r}: {part!r} is not a whole number of at least 1")
        numbers.append(int(value))
    return Size(*numbers)


STREAMING_VIEW = "recent_activity"
STREAMING_FIELD = "recent_clicks"

_DEFINITIONS = f'''

# Added by `rankgate bench --scale`: each person's decayed count of their recent
# clicks, kept fresh from the event stream (rankgate.yaml `streaming`, per: total).
# The batch source behind the push source has no rows (Feast needs it for its
# registry); training computes the count at each logged impression from the log.
from feast import PushSource  # noqa: E402
from feast.types import Float32  # noqa: E402

{STREAMING_VIEW}_push = PushSource(
    name="{STREAMING_VIEW}_push",
    batch_source=FileSource(
        name="{STREAMING_VIEW}_source",
        path=str(Path(__file__).parent / "{STREAMING_VIEW}.parquet"),
        timestamp_field="event_timestamp",
    ),
)
{STREAMING_VIEW} = FeatureView(
    name="{STREAMING_VIEW}",
    entities=[shopper],
    ttl=timedelta(days=2),
    schema=[Field(name="{STREAMING_FIELD}", dtype=Float32)],
    source={STREAMING_VIEW}_push,
    online=True,
    tags={{"group": "activity"}},
)
'''

_V3 = f"""# Added by `rankgate bench --scale`: v2's inputs and the person's recent clicks.
inputs:
  - {{name: segment, feature: shopper_profile:segment, encoding: hash, group: profile}}
  - {{name: visits_30d, feature: shopper_profile:visits_30d, group: profile}}
  - {{name: category, feature: item_attributes:category, encoding: hash, group: item}}
  - {{name: price, feature: item_attributes:price, group: item}}
  - {{name: device, context: device, encoding: hash, group: context}}
  - {{name: recent_clicks, feature: {STREAMING_VIEW}:{STREAMING_FIELD}, group: activity}}
"""


def write_scale_project(folder: Path, size: Size) -> None:
    """`rankgate init --sample-size` into `folder`, then the streaming view, events,
    model v3 and the log's propensity the measurement needs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from rankgate.ops.scaffold import parse_sample_size, write_skeleton

    write_skeleton(folder, "scale", parse_sample_size(size.sample_size()))
    repo = folder / "feature_repo"
    with (repo / "definitions.py").open("a") as handle:
        handle.write(_DEFINITIONS)
    empty = pa.table(
        {
            "shopper_key": pa.array([], pa.string()),
            "event_timestamp": pa.array([], pa.timestamp("ns", tz="UTC")),
            STREAMING_FIELD: pa.array([], pa.float32()),
        }
    )
    pq.write_table(empty, repo / f"{STREAMING_VIEW}.parquet")
    (folder / "models" / "FEATURES.recent.yaml").write_text(_V3)

    path = folder / "rankgate.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["interactions"]["propensity_column"] = "propensity"
    spec["events"] = {
        "types": {"impression": {}, "click": {}},
        "outcomes": {"impression": "impression", "click": "click"},
    }
    spec["streaming"] = [
        {
            "view": STREAMING_VIEW,
            "push_source": f"{STREAMING_VIEW}_push",
            "events": ["click"],
            "per": "total",
            "field": STREAMING_FIELD,
            "half_life_s": 3600,
        }
    ]
    spec["setup_models"].append(
        {
            "version": "v3",
            "features": "models/FEATURES.recent.yaml",
            # The trainer's defaults: a richer ranker than v1/v2 (at 10^5 items its
            # scores span ~60 dimensions across items), which retrieval's recall is
            # measured on.
            "params": {"num_boost_round": 100, "num_leaves": 15, "min_child_samples": 5},
        }
    )
    path.write_text(
        "# The scale project of `rankgate bench --scale` (rankgate init --sample-size "
        f"{size.sample_size()}, then a streaming view, events and model v3).\n"
        + yaml.safe_dump(spec, sort_keys=False)
    )
    policy_path = folder / "policies" / "policy.yaml"
    policy = policy_path.read_text()
    policy_path.write_text(
        policy.replace(
            "feature_views: [shopper_profile, item_attributes]",
            f"feature_views: [shopper_profile, item_attributes, {STREAMING_VIEW}]",
            1,
        )
    )
    reasons = folder / "policies" / "reasons.yaml"
    reasons.write_text(
        reasons.read_text().replace(
            "templates:\n", 'templates:\n  activity: "You clicked on items here recently"\n', 1
        )
    )
