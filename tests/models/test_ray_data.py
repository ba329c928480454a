"""The log's builder on Ray Data: a Parquet log read and built a block at a time
(`map_batches`), as a log larger than one machine is, gives the rows training builds."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.spec import load_features_file, resolve
from model_store.export import MatrixBatches
from model_store.logged import LoggedRows
from rankgate.ops.environment import Environment


def test_map_batches_builds_the_training_rows(env: Environment) -> None:
    import ray

    project, views = env.project, env.views()
    specs = resolve(
        load_features_file(project.path("models/v2.yaml")).inputs, env.view_infos(), project
    )
    names = [s.name for s in specs]
    order = ["user_key", "timestamp", "item_id", "position"]
    logged = LoggedRows.read(project, views, env.data_dir, specs)
    expected = logged.logs.assign(**dict(zip(names, logged.matrix(specs).T, strict=True)))
    expected = expected.sort_values(order, kind="stable").reset_index(drop=True)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        built = (
            ray.data.read_parquet(str(env.data_dir / "impressions.parquet"))
            .map_batches(
                MatrixBatches,
                fn_constructor_args=(project.root, views, specs),
                batch_format="pandas",
                batch_size=2500,
                concurrency=1,
                num_cpus=0.5,
            )
            .to_pandas()
        )
    finally:
        if started:
            ray.shutdown()
    built = built.sort_values(order, kind="stable").reset_index(drop=True)
    assert len(built) == len(expected) == 10_000
    np.testing.assert_array_equal(
        built[names].to_numpy(dtype=np.float32), expected[names].to_numpy(dtype=np.float32)
    )
    pd.testing.assert_series_equal(built["click"], expected["click"], check_dtype=False)
