"""Model store: manifests, validation, immutability, bad artifacts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from features.spec import FeaturesFile, load_features_file
from model_store.manifest import MANIFEST_FILE, ONNX_FILE, REFERENCE_FILE, RETRIEVAL_FILE
from model_store.reference import DriftReference
from model_store.train import TrainParams, parse_params
from rankgate.cli.main import main
from rankgate.core.errors import ModelStoreError, RankgateError, VersionExists
from rankgate.ops.environment import Environment
from tests.serving_support import train_version


def v2_inputs(env: Environment) -> FeaturesFile:
    return load_features_file(env.project.path("models/v2.yaml"))


@pytest.fixture
def scratch_version(env: Environment) -> Iterator[str]:
    """A copy of v1 registered as a throw-away version, removed afterwards."""
    name = "scratch"
    shutil.copytree(env.models.path("v1"), env.models.path(name))
    yield name
    shutil.rmtree(env.models.path(name), ignore_errors=True)


def test_setup_registers_two_different_versions(env: Environment) -> None:
    v1, v2 = env.models.manifest("v1"), env.models.manifest("v2")
    assert v1.feature_names != v2.feature_names
    assert v1.params != v2.params
    assert v2.feature_names == [i.name for i in v2_inputs(env).inputs]
    for manifest in (v1, v2):
        assert set(manifest.artifacts) == {
            "model.onnx",
            "booster.txt",
            "parity_inputs.npy",
            "drift_reference.json",
            "retrieval.npz",
        }
        assert manifest.onnx.parity_max_abs_diff is not None
        assert manifest.onnx.parity_max_abs_diff <= 1e-5
        assert manifest.training_data is not None and manifest.metrics is not None
        assert manifest.training_data.rows == 10_000 and manifest.training_data.positives == 38
        assert 0 < manifest.metrics.log_loss < 1
        assert manifest.lineage.made_by == "rankgate model train"
        assert manifest.lineage.project == "open_bandit"
        assert manifest.booster is not None and manifest.booster.kind == "lightgbm"
        assert {f.view for f in manifest.features} <= {
            "visitor_profile",
            "item_context",
            "user_item_affinity",
        }
    # Same data, same builder: the training matrices differ only by v2's extra column.
    assert v1.training_data is not None and v2.training_data is not None
    assert v1.training_data.fingerprint != v2.training_data.fingerprint


def test_setup_registers_v3_a_logistic_regression_that_reads_recent_clicks(
    env: Environment,
) -> None:
    """v3 = v2's inputs + the streaming view, fitted by LogisticRegression, converted with
    skl2onnx and registered like the others; the recent-clicks count raises the score."""
    from model_store.native import contributions, load_native, tree_explainer
    from tests.serving_support import serve_config

    v2, v3 = env.models.manifest("v2"), env.models.manifest("v3")
    assert v3.feature_names == [*v2.feature_names, "recent_clicks"]
    assert v3.features[-1].view == "recent_clicks" and v3.features[-1].group == "activity"
    assert v3.params["trainer"] == "logistic_regression"
    assert v3.booster is not None and v3.booster.kind == "sklearn"
    assert v3.onnx.input_name == "features"
    assert v3.onnx.parity_max_abs_diff is not None and v3.onnx.parity_max_abs_diff <= 1e-5
    assert v3.training_data is not None and v3.training_data.rows == 10_000
    assert v3.training_data.positives == 38
    native = load_native(env.models.path("v3") / v3.booster.file, "sklearn")
    coefficients = dict(zip(v3.feature_names, native.steps[-1][1].coef_[0], strict=True))
    assert coefficients["recent_clicks"] > 0
    # SHAP explains it: the contributions and the base value add up to the log-odds.
    rows = np.load(env.models.path("v3") / "parity_inputs.npy")[:5]
    rows[0, -1] = 1.0  # a click on the item a moment ago
    explainer = tree_explainer(native)
    values = contributions(explainer, rows)
    p = native.predict_proba(rows)[:, 1]
    np.testing.assert_allclose(
        values.sum(axis=1) + explainer.expected_value, np.log(p / (1 - p)), atol=1e-4
    )
    assert values[0, -1] > 0 and values[0, -1] == values[0].max()
    # Registered, not routed: serve_config.yaml's routing names v2 and v1 only.
    ingress = next(
        d for d in serve_config()["applications"][0]["deployments"] if d["name"] == "RankIngress"
    )
    routed = {v["version"] for v in ingress["user_config"]["routing"]["versions"]}
    assert routed == {"v2", "v1"}


def test_trained_versions_keep_a_drift_reference(env: Environment) -> None:
    """Bins per input and of the scores over the training matrix, and mean |SHAP|
    per feature group, in a file the manifest hashes."""
    for version in ("v1", "v2", "v3"):
        manifest = env.models.manifest(version)
        reference = DriftReference.load(env.models.path(version))
        assert reference is not None and reference.source == "training matrix"
        assert reference.rows == 10_000 and list(reference.features) == manifest.feature_names
        for bins in [*reference.features.values(), reference.score]:
            assert len(bins.proportions) == len(bins.edges) + 2
            assert sum(bins.proportions) == pytest.approx(1.0)
        assert len(reference.score.edges) >= 5  # scores spread over quantile bins
        assert reference.shap_groups is not None and reference.shap_rows == 500
        assert set(reference.shap_groups) == {f.group for f in manifest.features}
        assert REFERENCE_FILE in manifest.artifacts


def test_model_reference_gives_an_older_version_one(env: Environment, scratch_version: str) -> None:
    folder = env.models.path(scratch_version)
    (folder / REFERENCE_FILE).unlink()
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["artifacts"][REFERENCE_FILE]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert env.models.validate(scratch_version, env.view_infos()).ok

    result = CliRunner().invoke(main, ["model", "reference", scratch_version])
    assert result.exit_code == 0, result.output
    reference = DriftReference.load(folder)
    assert reference is not None and reference.source == "project interaction log"
    assert reference.rows == 10_000 and reference.shap_groups is not None
    assert REFERENCE_FILE in env.models.manifest(scratch_version).artifacts
    assert env.models.validate(scratch_version, env.view_infos()).ok
    again = CliRunner().invoke(main, ["model", "reference", scratch_version])
    assert again.exit_code == 1 and "already has a drift reference" in again.output


def test_register_builds_the_reference_from_the_interaction_log(env: Environment) -> None:
    v1 = env.models.path("v1")
    features = env.models.manifest("v1").lineage.features_source
    assert features is not None
    try:
        result = CliRunner().invoke(
            main,
            [
                *("model", "register", "registered-ref", "--onnx", str(v1 / ONNX_FILE)),
                *("--features", features, "--booster", str(v1 / "booster.txt")),
            ],
        )
        assert result.exit_code == 0, result.output
        assert "drift reference from the interaction log" in result.output
        reference = DriftReference.load(env.models.path("registered-ref"))
        assert reference is not None and reference.source == "project interaction log"
        # The same rows as v1's training matrix: the same bins.
        trained = DriftReference.load(v1)
        assert trained is not None and reference.features == trained.features
    finally:
        shutil.rmtree(env.models.path("registered-ref"), ignore_errors=True)


def test_the_onnx_file_carries_its_version_and_inputs(env: Environment) -> None:
    import onnx

    model = onnx.load(str(env.models.path("v2") / ONNX_FILE))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["rankgate.version"] == "v2"
    assert [f["name"] for f in json.loads(meta["rankgate.features"])] == env.models.manifest(
        "v2"
    ).feature_names


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_registered_versions_validate(env: Environment, version: str) -> None:
    report = env.models.validate(version, env.view_infos())
    assert report.ok, report.failures()
    assert [name for name, _, _ in report.checks][-2:] == ["onnx/native parity", "features"]


def test_one_changed_byte_of_model_onnx_fails_validation(
    env: Environment, scratch_version: str
) -> None:
    path = env.models.path(scratch_version) / ONNX_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["model", "validate", scratch_version])
    assert result.exit_code == 1
    assert "FAIL sha256 model.onnx" in result.output
    assert "model version 'scratch' is invalid" in result.output


def test_missing_artifact_is_named(env: Environment, scratch_version: str) -> None:
    (env.models.path(scratch_version) / "booster.txt").unlink()
    report = env.models.validate(scratch_version, env.view_infos())
    assert not report.ok
    assert any("booster.txt is missing" in f for f in report.failures())


def test_manifest_hash_mismatch_is_reported(env: Environment, scratch_version: str) -> None:
    manifest_path = env.models.path(scratch_version) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["model.onnx"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    report = env.models.validate(scratch_version, env.view_infos())
    detail = next(d for name, _, d in report.checks if name == "sha256 model.onnx")
    assert report.failures() == ["sha256 model.onnx: is " + detail.split("is ")[1]]
    assert "manifest says 000000000000" in report.failures()[0]


def test_corrupted_manifest_names_file_and_field(env: Environment, scratch_version: str) -> None:
    manifest_path = env.models.path(scratch_version) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    del manifest["lineage"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match=r"manifest.json: field 'lineage': Field required"):
        env.models.manifest(scratch_version)


def test_feature_unknown_to_the_repository_fails(env: Environment, scratch_version: str) -> None:
    manifest_path = env.models.path(scratch_version) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["features"][0]["view"] = "shoe_size"
    manifest_path.write_text(json.dumps(manifest))
    report = env.models.validate(scratch_version, env.view_infos())
    assert report.failures() == ["features: unknown: user_feature_0 (view 'shoe_size' not defined)"]


def test_registering_an_existing_version_is_refused_and_changes_nothing(env: Environment) -> None:
    before = {p.name: p.read_bytes() for p in env.models.path("v1").iterdir()}
    with pytest.raises(ModelStoreError, match="'v1' already exists"):
        train_version(env, "v1", TrainParams(num_boost_round=2))
    staged = env.models.staging_dir()
    with pytest.raises(VersionExists):
        env.models.register("v1", staged)
    assert not staged.exists()
    assert {p.name: p.read_bytes() for p in env.models.path("v1").iterdir()} == before
    assert not [p for p in env.models.root.iterdir() if p.name.startswith(".staging")]


def test_train_cli_registers_a_new_version(env: Environment) -> None:
    try:
        result = CliRunner().invoke(
            main,
            ["model", "train", "--version", "v9", "--params", "num_boost_round=5,num_leaves=3"],
        )
        assert result.exit_code == 0, result.output
        assert "v9: held-out AUC" in result.output
        assert env.models.manifest("v9").params["num_boost_round"] == 5
        assert env.models.validate("v9", env.view_infos()).ok
        listed = CliRunner().invoke(main, ["model", "list"]).output
        assert any(line.startswith("v9 ") and " ok " in line for line in listed.splitlines())
    finally:
        shutil.rmtree(env.models.path("v9"), ignore_errors=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num_leaves=1", "num_leaves: Input should be greater than or equal to 2"),
        ("colour=blue", "colour: Extra inputs are not permitted"),
        ("num_leaves", "'num_leaves' is not key=value"),
    ],
)
def test_bad_params_name_the_parameter(text: str, message: str) -> None:
    with pytest.raises(RankgateError, match=message):
        parse_params(text)


def test_bad_version_name_and_unknown_feature(env: Environment) -> None:
    from rankgate.core.errors import FeatureRepoError

    with pytest.raises(ModelStoreError, match="version '../x'"):
        train_version(env, "../x", TrainParams())
    shoe = FeaturesFile.model_validate(
        {"inputs": [{"name": "shoe", "feature": "visitor_profile:shoe_size"}]}
    )
    with pytest.raises(FeatureRepoError, match="view 'visitor_profile' has no field 'shoe_size'"):
        train_version(env, "v8", TrainParams(), shoe)
    assert not env.models.exists("v8")


def test_list_marks_a_corrupt_version(env: Environment, scratch_version: str) -> None:
    (env.models.path(scratch_version) / ONNX_FILE).write_bytes(b"not onnx")
    rows = {row[0]: row for row in env.model_rows()}
    assert rows["scratch"][1].startswith("corrupt: sha256 model.onnx")
    assert rows["v1"][1] == "ok"


def test_parity_inputs_are_real_training_rows(env: Environment) -> None:
    inputs = np.load(Path(env.models.path("v2")) / "parity_inputs.npy")
    assert inputs.shape == (512, len(v2_inputs(env).inputs)) and inputs.dtype == np.float32


def test_a_manifest_that_disagrees_with_the_onnx_input_fails(
    env: Environment, scratch_version: str
) -> None:
    manifest_path = env.models.path(scratch_version) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["features"].append(
        {
            **manifest["features"][0],
            "name": "user_item_affinity",
            "view": "user_item_affinity",
            "field": "affinity_{item_id}",
        }
    )
    manifest_path.write_text(json.dumps(manifest))
    report = env.models.validate(scratch_version, env.view_infos())
    assert any("model.onnx takes 8 features, the manifest lists 9" in f for f in report.failures())


def test_logistic_regression_params_are_its_own() -> None:
    from model_store.train import LogisticParams

    params = parse_params("C=0.5,class_weight=balanced", "logistic_regression")
    assert params == LogisticParams(C=0.5, class_weight="balanced")
    assert params.sklearn() == {"C": 0.5, "class_weight": "balanced", "max_iter": 1000, "tol": 1e-4}
    with pytest.raises(RankgateError, match="num_leaves: Extra inputs are not permitted"):
        parse_params("num_leaves=7", "logistic_regression")
    with pytest.raises(RankgateError, match="C: Input should be greater than 0"):
        parse_params("C=0", "logistic_regression")


def test_train_cli_fits_a_logistic_regression(env: Environment) -> None:
    features = env.project.path("models/v1.yaml")
    try:
        result = CliRunner().invoke(
            main,
            [
                "model",
                "train",
                "--version",
                "v9-lr",
                "--trainer",
                "logistic_regression",
                "--params",
                "C=0.5",
                "--features",
                str(features),
            ],
        )
        assert result.exit_code == 0, result.output
        assert "v9-lr: coefficients (standardized inputs): user_feature_0 " in result.output
        manifest = env.models.manifest("v9-lr")
        assert manifest.params["trainer"] == "logistic_regression" and manifest.params["C"] == 0.5
        assert manifest.booster is not None and manifest.booster.kind == "sklearn"
        assert env.models.validate("v9-lr", env.view_infos()).ok
    finally:
        shutil.rmtree(env.models.path("v9-lr"), ignore_errors=True)


def test_trained_versions_carry_item_embeddings_distilled_from_their_ranker(
    env: Environment,
) -> None:
    from model_store.embeddings import ItemEmbeddings

    for version in ("v1", "v2", "v3"):
        embeddings = ItemEmbeddings.load(env.models.path(version))
        assert embeddings is not None and embeddings.source == "distilled"
        assert len(embeddings.item_ids) == 80 and embeddings.vectors.shape[0] == 80
        assert 1 <= embeddings.dims <= 64 and len(embeddings.anchors) >= embeddings.dims
        assert len(embeddings.popular[""]) == 80  # every item of the log, by clicks
        assert RETRIEVAL_FILE in env.models.manifest(version).artifacts


def test_register_takes_item_embeddings_made_elsewhere(env: Environment, tmp_path: Path) -> None:
    import pandas as pd

    from model_store.embeddings import ItemEmbeddings

    v1 = env.models.path("v1")
    features = env.models.manifest("v1").lineage.features_source
    assert features is not None
    vectors = np.random.default_rng(0).normal(size=(80, 8)).astype(np.float32)
    table = pd.DataFrame({"item_id": range(80), "vector": list(vectors)})
    table.to_parquet(tmp_path / "vectors.parquet")
    table.iloc[1:].to_parquet(tmp_path / "short.parquet")
    command = [*("model", "register"), "with-vectors", *("--onnx", str(v1 / ONNX_FILE))]
    command += ["--features", features]
    try:
        short = CliRunner().invoke(
            main, [*command, "--item-embeddings", str(tmp_path / "short.parquet")]
        )
        assert short.exit_code == 1
        assert (
            "--item-embeddings" in short.output
            and "no vector for 1 catalogue items" in short.output
        )
        assert not env.models.exists("with-vectors")
        result = CliRunner().invoke(
            main, [*command, "--item-embeddings", str(tmp_path / "vectors.parquet")]
        )
        assert result.exit_code == 0, result.output
        assert "item embeddings for retrieval" in result.output
        embeddings = ItemEmbeddings.load(env.models.path("with-vectors"))
        assert embeddings is not None and embeddings.source == "vectors.parquet"
        np.testing.assert_array_equal(embeddings.vectors, vectors)
        assert env.models.validate("with-vectors", env.view_infos()).ok
    finally:
        shutil.rmtree(env.models.path("with-vectors"), ignore_errors=True)


def test_model_retrieval_gives_an_older_version_item_embeddings(
    env: Environment, scratch_version: str
) -> None:
    from model_store.embeddings import ItemEmbeddings

    folder = env.models.path(scratch_version)
    (folder / RETRIEVAL_FILE).unlink()
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["artifacts"][RETRIEVAL_FILE]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert ItemEmbeddings.load(folder) is None

    result = CliRunner().invoke(main, ["model", "retrieval", scratch_version])
    assert result.exit_code == 0, result.output
    embeddings = ItemEmbeddings.load(folder)
    assert embeddings is not None and len(embeddings.item_ids) == 80
    assert env.models.validate(scratch_version, env.view_infos()).ok
    again = CliRunner().invoke(main, ["model", "retrieval", scratch_version])
    assert again.exit_code == 1 and "already has item embeddings" in again.output


def test_register_keeps_the_engineers_own_metrics(env: Environment, tmp_path: Path) -> None:
    v1 = env.models.path("v1")
    features = env.models.manifest("v1").lineage.features_source
    assert features is not None
    command = [*("model", "register", "with-metrics", "--onnx", str(v1 / ONNX_FILE))]
    command += ["--features", features, "--metrics"]
    (tmp_path / "bad.yaml").write_text("auc: 2.0\nndcg@10: lots\n")
    (tmp_path / "metrics.yaml").write_text("auc: 0.61\nndcg@10: 0.31\nrecall@20: 0.42\n")
    try:
        bad = CliRunner().invoke(main, [*command, str(tmp_path / "bad.yaml")])
        assert bad.exit_code == 1 and not env.models.exists("with-metrics")
        # Every failing field is named, not the first and a count.
        assert "field 'auc'" in bad.output and "field 'others.ndcg@10'" in bad.output
        result = CliRunner().invoke(main, [*command, str(tmp_path / "metrics.yaml")])
        assert result.exit_code == 0, result.output
        metrics = env.models.manifest("with-metrics").metrics
        assert metrics is not None and metrics.auc == 0.61 and metrics.log_loss is None
        assert metrics.others == {"ndcg@10": 0.31, "recall@20": 0.42}
        listed = CliRunner().invoke(main, ["model", "list"]).output
        row = next(line for line in listed.splitlines() if line.startswith("with-metrics"))
        assert "auc 0.61, ndcg@10 0.31, recall@20 0.42" in row
    finally:
        shutil.rmtree(env.models.path("with-metrics"), ignore_errors=True)
