"""Projects: `rankgate init` writes a skeleton, `rankgate project check` validates a
project without starting anything, and each bad input is refused with its file and
field, with nothing written.

All but the last test are fast: they read copies of the example or of a fresh
skeleton (the check prepares their data into a temporary folder). The last one
runs `rankgate setup` on a skeleton in a subprocess, with its own home.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper

from features.spec import load_features_file
from rankgate.cli.main import main
from rankgate.core.errors import ConfigError, FeatureRepoError, ModelStoreError
from rankgate.core.home import Home
from rankgate.core.project import load_project
from rankgate.ops.project_check import check_project
from rankgate.ops.scaffold import write_skeleton
from serving.ops.launch import SERVE_CONFIG
from serving.ranking.explainer import load_reason_templates
from tests import REPO

EXAMPLE = REPO / "examples" / "open_bandit"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A copy of the Open Bandit example (without anything a hand run left in it)."""
    copy = tmp_path / "open_bandit"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.db"))
    return copy


@pytest.fixture
def skeleton(tmp_path: Path) -> Path:
    folder = tmp_path / "shop"
    write_skeleton(folder, None)
    return folder


def edit_yaml(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def refused(folder: Path) -> str:
    """The message of the check's refusal; the project folder is left as it was."""
    before = files_of(folder)
    with pytest.raises(ConfigError) as caught:
        check_project(folder)
    assert files_of(folder) == before
    return caught.value.message


# -- the check passes ----------------------------------------------------------


def test_check_passes_on_the_example(example: Path) -> None:
    before = files_of(example)
    lines = check_project(example)
    assert all(line.startswith(("✓", "!")) for line in lines), lines
    assert "✓ catalogue: 80 items (int ids) from item_context" in lines
    assert any(line.startswith("✓ model v2: models/v2.yaml resolves (9 inputs)") for line in lines)
    assert (
        "✓ streaming: recent_clicks (push source recent_clicks_push, click per item, "
        "half-life 3600 s)"
    ) in lines
    assert (
        "✓ model v3: models/v3.yaml resolves (10 inputs); purposes that may use it: "
        "onsite_personalization"
    ) in lines
    assert not [line for line in lines if "reason group" in line], lines
    assert files_of(example) == before  # prepared into a temporary folder, not the project


def test_check_passes_on_a_fresh_skeleton_from_the_command_line(skeleton: Path) -> None:
    result = CliRunner().invoke(main, ["project", "check", str(skeleton)])
    assert result.exit_code == 0, result.output
    assert "✓ catalogue: 40 items (int ids) from item_attributes" in result.output
    assert "model v1: models/FEATURES.items_only.yaml resolves (3 inputs)" in result.output
    assert "model v2: models/FEATURES.yaml resolves (5 inputs)" in result.output
    assert "error" not in result.output
    assert "reason group" not in result.output


def test_the_skeletons_reasons_speak_of_the_person_only_for_data_about_them(
    skeleton: Path,
) -> None:
    """The item-only model (v1, the one e-mail may use) knows nothing of the person: its
    reasons must not tell them what they tend to choose."""
    project = load_project(skeleton)
    templates = load_reason_templates(project.policies / "reasons.yaml")
    seen = {}
    for model in project.spec.setup_models:
        for item in load_features_file(project.path(model.features)).inputs:
            view = item.feature.split(":")[0] if item.feature else None
            about_person = view is not None and view != project.spec.item_view
            text = templates.text(item.group or view or "context", item.name)
            seen[text] = about_person
            if not about_person:
                words = set(re.findall(r"[a-z]+", text.lower()))
                assert not words & {"you", "your", "yours"}, (model.version, item.name, text)
    assert "Items with this price are often chosen" in seen
    assert seen["People with a profile like yours often choose this"] is True


def test_a_reason_group_mixing_the_person_with_item_attributes_is_named(skeleton: Path) -> None:
    edit_yaml(
        skeleton / "models" / "FEATURES.yaml",
        lambda raw: raw["inputs"][0].update(group="item"),  # segment, of shopper_profile
    )
    lines = check_project(skeleton)
    assert (
        "! model v2: reason group item holds inputs about the person (a user view) and "
        "inputs that are not"
    ) in "\n".join(lines), lines


def test_the_skeleton_is_named_after_its_folder_and_teaches(tmp_path: Path) -> None:
    lines = write_skeleton(tmp_path / "My-Shop.v2", None)
    folder = tmp_path / "My-Shop.v2"
    project = load_project(folder)
    assert project.name == "my_shop_v2"
    assert "project: my_shop_v2" in (folder / "feature_repo" / "feature_store.yaml").read_text()
    assert (
        "connection_string: ${RANKGATE_FEAST_REDIS}"
        in (folder / "feature_repo" / "feature_store.yaml").read_text()
    )
    for name in ("policy.yaml", "fallback.yaml", "reasons.yaml"):
        assert (folder / "policies" / name).read_bytes() == (
            REPO / "rankgate" / "project_template" / "policies" / name
        ).read_bytes()
    # The project owns its serve config (routing), a copy of the one rankgate ships.
    assert (folder / "serve_config.yaml").read_bytes() == SERVE_CONFIG.read_bytes()
    # Every file explains itself (YAML comments, Python docstrings and comments).
    for path in folder.rglob("*"):
        if path.suffix in {".yaml", ".py"}:
            assert path.read_text().lstrip().startswith(("#", '"""')), path
    assert any("rankgate project check" in line for line in lines)


# -- init refuses --------------------------------------------------------------


def test_init_refuses_a_non_empty_folder_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    result = CliRunner().invoke(main, ["init", str(folder)])
    assert result.exit_code == 1
    assert f"error: {folder}: the folder is not empty" in result.output
    assert files_of(folder) == {"notes.txt": b"mine\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging left behind


def test_init_refuses_a_bad_name_and_writes_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["init", str(tmp_path / "new"), "--name", "Bad-Name"])
    assert result.exit_code == 1
    assert "error: --name 'Bad-Name': lower-case letters" in result.output
    assert list(tmp_path.iterdir()) == []


def test_init_fills_an_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    result = CliRunner().invoke(main, ["init", str(folder), "--name", "store"])
    assert result.exit_code == 0, result.output
    assert load_project(folder).name == "store"


# -- bad input: file and field, nothing written --------------------------------


def test_an_unknown_key_in_the_project_file(skeleton: Path) -> None:
    with (skeleton / "rankgate.yaml").open("a") as handle:
        handle.write("colour: blue\n")
    message = refused(skeleton)
    assert message.startswith(f"{skeleton / 'rankgate.yaml'}: field 'colour': Extra inputs")
    result = CliRunner().invoke(main, ["project", "check", str(skeleton)])
    assert result.exit_code == 1
    assert "field 'colour'" in result.output


def test_an_unknown_key_nested_in_the_project_file(example: Path) -> None:
    edit_yaml(example / "rankgate.yaml", lambda raw: raw["item"].update(idtype="string"))
    assert "rankgate.yaml: field 'item.idtype': Extra inputs" in refused(example)


def test_a_missing_feast_repo(skeleton: Path) -> None:
    shutil.rmtree(skeleton / "feature_repo")
    message = refused(skeleton)
    assert message == (
        f"{skeleton / 'rankgate.yaml'}: field 'feast_repo': "
        f"{skeleton / 'feature_repo'} is not a folder"
    )


def test_a_feast_repo_without_feature_store_yaml(skeleton: Path) -> None:
    (skeleton / "feature_repo" / "feature_store.yaml").unlink()
    assert refused(skeleton) == (
        f"{skeleton / 'rankgate.yaml'}: field 'feast_repo': "
        f"{skeleton / 'feature_repo'} has no feature_store.yaml"
    )


def test_a_feature_reference_the_registry_lacks(skeleton: Path) -> None:
    features = skeleton / "models" / "FEATURES.yaml"
    features.write_text(
        features.read_text().replace("shopper_profile:visits_30d", "shopper_profile:visits_90d")
    )
    message = refused(skeleton)
    assert (
        f"{features}: inputs.1 (visits_30d): view 'shopper_profile' has no field 'visits_90d'"
        in message
    )


def test_a_feature_view_the_registry_lacks(skeleton: Path) -> None:
    features = skeleton / "models" / "FEATURES.yaml"
    features.write_text(features.read_text().replace("shopper_profile:segment", "user_history:seg"))
    assert f"{features}: inputs.0 (segment): no feature view 'user_history'" in refused(skeleton)


def test_a_context_feature_the_project_does_not_declare(skeleton: Path) -> None:
    features = skeleton / "models" / "FEATURES.items_only.yaml"
    features.write_text(features.read_text().replace("context: device", "context: weather"))
    message = refused(skeleton)
    assert f"{features}: inputs.2 (device): context feature 'weather' is not declared" in message


def tiny_onnx(width: int) -> onnx.ModelProto:
    """sigmoid(x · w): one float input `width` columns wide, one score per row."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [width, 1], [0.1] * width)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["score"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [weights],
    )
    # IR version 8 goes with opset 15 (onnx.helper would write its newest).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def test_an_onnx_input_width_that_does_not_match_the_declaration() -> None:
    from model_store.register import check_onnx

    assert check_onnx(tiny_onnx(5), 5) == ("x", "score", 15)
    with pytest.raises(ModelStoreError) as caught:
        check_onnx(tiny_onnx(3), 5)
    assert caught.value.status_code == 422
    assert caught.value.message == (
        "--onnx: input 'x' is 3 columns wide, but --features declares 5 inputs"
    )


def register_on(skeleton: Path, home: Path, onnx_model: onnx.ModelProto, features: Path) -> None:
    """`rankgate model register v9` of `onnx_model` into a model store in `home`."""
    from feast import FeatureView

    from features.spec import load_features_file
    from features.store import read_definitions, view_infos
    from model_store.register import Candidate, register
    from model_store.store import ModelStore

    project = load_project(skeleton)
    views = [o for o in read_definitions(project, home / "data") if isinstance(o, FeatureView)]
    onnx_path = home.parent / "model.onnx"
    onnx.save_model(onnx_model, str(onnx_path))
    candidate = Candidate("v9", onnx_path, load_features_file(features))
    register(ModelStore(Home(home)), project, view_infos(views, project), candidate)


def test_register_refuses_a_wrong_width_and_writes_nothing(skeleton: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    with pytest.raises(ModelStoreError, match="is 3 columns wide, but --features declares 5"):
        register_on(skeleton, home, tiny_onnx(3), skeleton / "models" / "FEATURES.yaml")
    assert not home.exists()


def test_register_refuses_a_reference_the_registry_lacks(skeleton: Path, tmp_path: Path) -> None:
    features = tmp_path / "FEATURES.yaml"
    features.write_text("inputs:\n  - {name: colour, feature: item_attributes:colour}\n")
    home = tmp_path / "home"
    with pytest.raises(FeatureRepoError, match="view 'item_attributes' has no field 'colour'"):
        register_on(skeleton, home, tiny_onnx(1), features)
    assert not home.exists()


def test_register_accepts_a_model_that_fits_the_skeleton(skeleton: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    register_on(skeleton, home, tiny_onnx(5), skeleton / "models" / "FEATURES.yaml")
    assert (home / "models" / "ranker" / "v9" / "manifest.json").is_file()


def test_a_policy_item_rule_naming_an_item_the_catalogue_lacks(skeleton: Path) -> None:
    edit_yaml(
        skeleton / "policies" / "policy.yaml",
        lambda raw: raw.update(item_rules=[{"name": "gone", "items": [7, 404]}]),
    )
    assert refused(skeleton).endswith(
        f"{skeleton / 'policies' / 'policy.yaml'}: field 'item_rules.0.items': "
        "not in the catalogue: 404"
    )


def test_an_item_id_of_the_wrong_type_in_a_policy_rule(skeleton: Path) -> None:
    edit_yaml(
        skeleton / "policies" / "policy.yaml",
        lambda raw: raw.update(item_rules=[{"name": "typo", "items": ["7"]}]),
    )
    assert refused(skeleton).endswith(
        f"{skeleton / 'policies' / 'policy.yaml'}: field 'item_rules.0.items': "
        "item ids of this catalogue are integers; '7' is not"
    )


def test_fallback_boosts_naming_items_the_catalogue_lacks(skeleton: Path) -> None:
    edit_yaml(
        skeleton / "policies" / "fallback.yaml",
        lambda raw: raw.update(boosts=[{"name": "spring", "items": [3, 41], "factor": 1.5}]),
    )
    assert refused(skeleton).endswith(
        f"{skeleton / 'policies' / 'fallback.yaml'}: field 'boosts.0.items': "
        "not in the catalogue: 41"
    )


def test_the_example_boosts_on_a_catalogue_without_their_items(example: Path) -> None:
    """The example's winter campaign boosts items 2, 11 and 17: a catalogue without
    item 11 refuses it instead of boosting a stranger."""
    items = example / "data" / "random_all" / "item_context.csv"
    lines = items.read_text().splitlines(keepends=True)
    header = lines[0].split(",")
    column = header.index("item_id")
    items.write_text("".join(line for line in lines if line.split(",")[column] != "11"))
    message = refused(example)
    assert "✓" not in message
    assert message.endswith(
        f"{example / 'policies' / 'fallback.yaml'}: field 'boosts.0.items': "
        "not in the catalogue: 11"
    )


def test_an_empty_catalogue(skeleton: Path) -> None:
    (skeleton / "items.csv").write_text("product_id\n")
    edit_yaml(skeleton / "rankgate.yaml", lambda raw: raw.update(catalogue={"file": "items.csv"}))
    message = refused(skeleton)
    assert (
        f"{skeleton / 'rankgate.yaml'}: field 'catalogue.file': {skeleton / 'items.csv'} "
        "lists no items (empty catalogue)"
    ) in message


def test_a_purpose_naming_a_view_the_repository_lacks(skeleton: Path) -> None:
    edit_yaml(
        skeleton / "policies" / "policy.yaml",
        lambda raw: raw["purposes"]["email_marketing"].update(
            feature_views=["item_attributes", "user_history"]
        ),
    )
    assert (
        f"{skeleton / 'policies' / 'policy.yaml'}: field 'purposes.email_marketing.feature_views': "
        "the Feast repository defines no view 'user_history'"
    ) in refused(skeleton)


def test_an_entity_the_repository_lacks(skeleton: Path) -> None:
    edit_yaml(skeleton / "rankgate.yaml", lambda raw: raw["user"].update(entity="customer"))
    assert (
        f"{skeleton / 'rankgate.yaml'}: field 'user.entity': the repository defines no entity "
        "'customer'"
    ) in refused(skeleton)


def test_string_item_ids_declared_for_an_integer_entity(skeleton: Path) -> None:
    edit_yaml(skeleton / "rankgate.yaml", lambda raw: raw["item"].update(id_type="string"))
    assert "field 'item.id_type': string ids, but entity 'product' is INT64" in refused(skeleton)


def test_setup_model_settings_training_would_refuse(skeleton: Path) -> None:
    edit_yaml(
        skeleton / "rankgate.yaml", lambda raw: raw["setup_models"][1]["params"].update(leaves=7)
    )
    assert (
        f"{skeleton / 'rankgate.yaml'}: field 'setup_models.1.params.leaves' (v2): Extra inputs"
    ) in refused(skeleton)


def test_problems_are_reported_together(skeleton: Path) -> None:
    edit_yaml(
        skeleton / "policies" / "fallback.yaml",
        lambda raw: raw.update(boosts=[{"name": "spring", "items": [99], "factor": 2}]),
    )
    features = skeleton / "models" / "FEATURES.yaml"
    features.write_text(
        features.read_text().replace("item_attributes:price", "item_attributes:cost")
    )
    message = refused(skeleton)
    assert message.startswith(f"{skeleton}: 2 problems:\n")
    assert "field 'boosts.0.items': not in the catalogue: 99" in message
    assert f"{features}: inputs.3 (price): view 'item_attributes' has no field 'cost'" in message


def test_a_failing_prepare_step_is_named(skeleton: Path) -> None:
    prepare = skeleton / "prepare.py"
    prepare.write_text(prepare.read_text().replace("N_SHOPPERS = 300", "N_SHOPPERS = -1"))
    assert (
        f"{skeleton / 'rankgate.yaml'}: field 'prepare': prepare.py failed: ValueError"
        in refused(skeleton)
    )


def test_an_interaction_log_without_its_declared_column(skeleton: Path) -> None:
    edit_yaml(
        skeleton / "rankgate.yaml", lambda raw: raw["interactions"].update(outcome_column="buy")
    )
    assert (
        f"{skeleton / 'rankgate.yaml'}: field 'interactions.outcome_column': "
        "interactions.parquet has no column 'buy'"
    ) in refused(skeleton)


def edit_streaming(folder: Path, **changes: Any) -> None:
    edit_yaml(folder / "rankgate.yaml", lambda raw: raw["streaming"][0].update(changes))


def test_a_streaming_view_the_repository_lacks(example: Path) -> None:
    edit_streaming(example, view="recent_taps")
    assert (
        f"{example / 'rankgate.yaml'}: field 'streaming.0.view': the repository defines no "
        "feature view 'recent_taps'"
    ) in refused(example)


def test_a_streaming_view_fed_by_another_push_source(example: Path) -> None:
    edit_streaming(example, push_source="clicks_push")
    assert (
        f"{example / 'rankgate.yaml'}: field 'streaming.0.push_source': view 'recent_clicks' "
        "is fed by the push source 'recent_clicks_push', not 'clicks_push'"
    ) in refused(example)


def test_a_streaming_view_without_a_push_source(example: Path) -> None:
    edit_streaming(example, view="user_item_affinity", field="affinity_{item_id}")
    assert (
        f"{example / 'rankgate.yaml'}: field 'streaming.0.push_source': view "
        "'user_item_affinity' has no PushSource as its source (FileSource)"
    ) in refused(example)


def test_a_streaming_view_keyed_by_items(example: Path) -> None:
    edit_streaming(example, view="item_context", per="total", field="item_feature_1")
    message = refused(example)
    assert (
        f"{example / 'rankgate.yaml'}: field 'streaming.0.view': view 'item_context' is keyed "
        "by item, not by the user entity 'user' alone"
    ) in message
    # A string field is no count.
    assert (
        f"{example / 'rankgate.yaml'}: field 'streaming.0.field': view 'item_context' has no "
        "float field 'item_feature_1'"
    ) in message


def test_a_streaming_view_without_a_field_for_every_item(example: Path) -> None:
    definitions = example / "feature_repo" / "definitions.py"
    definitions.write_text(
        definitions.read_text().replace(
            'RECENT_CLICK_COLUMNS = [f"clicks_{i}" for i in range(N_ITEMS)]',
            'RECENT_CLICK_COLUMNS = [f"clicks_{i}" for i in range(73)]',
        )
    )
    assert (
        f"{example / 'rankgate.yaml'}: field 'streaming.0.field': view 'recent_clicks' lacks a "
        "float field for 7 of the 80 catalogue items: clicks_73, clicks_74, clicks_75, "
        "clicks_76, clicks_77 and 2 more"
    ) in refused(example)


def test_setup_refuses_a_bad_streaming_declaration_before_touching_anything(
    example: Path, tmp_path: Path
) -> None:
    """The definitions setup applies are checked with the streaming declarations."""
    from features.store import checked_definitions

    edit_streaming(example, push_source="clicks_push")
    with pytest.raises(FeatureRepoError, match=r"field 'streaming\.0\.push_source'"):
        checked_definitions(load_project(example), tmp_path)


def test_a_streaming_event_type_that_is_not_declared(example: Path) -> None:
    edit_streaming(example, events=["tap"])
    message = refused(example)
    assert message.startswith(f"{example / 'rankgate.yaml'}: field ")
    assert "streaming.0.events: 'tap' is not a declared event type" in message


def test_logistic_regression_settings_training_would_refuse(example: Path) -> None:
    edit_yaml(
        example / "rankgate.yaml", lambda raw: raw["setup_models"][2]["params"].update(leaves=7)
    )
    assert (
        f"{example / 'rankgate.yaml'}: field 'setup_models.2.params.leaves' (v3): Extra inputs"
    ) in refused(example)


# -- end to end (slower: about 20 s) ---------------------------------------------


@pytest.mark.slow
def test_setup_on_a_fresh_skeleton_trains_and_registers_its_models(tmp_path: Path) -> None:
    """`rankgate --project <skeleton> setup` in its own home: sample data, Feast,
    materialization and both setup models, as a new user would run it."""
    from rankgate.core.redis_server import EmbeddedRedis

    folder = tmp_path / "shop"
    write_skeleton(folder, None)
    home = tmp_path / "home"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"REDIS_URL", "RANKGATE_REDIS_URL", "RANKGATE_PROJECT"}
    }
    env.update(RANKGATE_HOME=str(home), PYTHONPATH=str(REPO))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "rankgate.cli", "--project", str(folder), "setup"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            check=False,
            text=True,
            timeout=180,
        )
    finally:
        EmbeddedRedis(Home(home)).stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"project: shop ({folder})" in result.stdout
    assert "✓ catalogue: 40 items" in result.stdout
    for version, inputs in (("v1", 3), ("v2", 5)):
        assert f"{version}: registered at {home / 'models' / 'ranker' / version}" in result.stdout
        manifest = yaml.safe_load(
            (home / "models" / "ranker" / version / "manifest.json").read_text()
        )
        assert manifest["lineage"]["project"] == "shop"
        assert len(manifest["features"]) == inputs
        assert manifest["training_data"]["rows"] == 6000
        assert manifest["metrics"]["auc"] > 0.6
    assert result.stdout.rstrip().endswith("setup complete.")


# -- the sample's size ---------------------------------------------------------------


def test_init_writes_the_sample_size_into_prepare(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    result = CliRunner().invoke(
        main, ["init", str(folder), "--sample-size", "people=2e3,items=60,impressions=5_000"]
    )
    assert result.exit_code == 0, result.output
    assert "sample size: people=2,000, items=60, impressions=5,000" in result.output
    prepare = (folder / "prepare.py").read_text()
    for line in ("N_SHOPPERS = 2_000", "N_PRODUCTS = 60", "N_IMPRESSIONS = 5_000"):
        assert f"\n{line}\n" in prepare
    # The rest of the project is the template's, and the check passes at that size.
    assert "✓ catalogue: 60 items (int ids) from item_attributes" in check_project(folder)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("people=0", "--sample-size: people='0': a whole number from 1 to 100,000,000"),
        ("people=1.5", "--sample-size: people='1.5': a whole number"),
        ("shoppers=10", "--sample-size: 'shoppers=10': expected NAME=COUNT with NAME one of"),
        ("items=5,items=6", "--sample-size: items given twice"),
        (
            "impressions=1e10",
            "--sample-size: impressions='1e10': a whole number from 1 to 1,000,000,000",
        ),
    ],
)
def test_init_refuses_a_bad_sample_size_and_writes_nothing(
    tmp_path: Path, size: str, message: str
) -> None:
    result = CliRunner().invoke(main, ["init", str(tmp_path / "shop"), "--sample-size", size])
    assert result.exit_code == 1
    assert f"error: {message}" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_log_of_several_chunks_is_complete_and_in_time_order(tmp_path: Path) -> None:
    import importlib.util

    import pyarrow.parquet as pq

    folder = tmp_path / "shop"
    write_skeleton(folder, None, {"people": 500, "items": 30, "impressions": 10_001})
    loader = importlib.util.spec_from_file_location("sized_prepare", folder / "prepare.py")
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    module.CHUNK = 2_500  # five chunks
    counts = module.prepare(tmp_path / "data")
    assert counts == {"users": 500, "items": 30, "interactions": 10_001}
    log = pq.ParquetFile(tmp_path / "data" / "interactions.parquet")
    assert log.metadata.num_row_groups == 5
    table = log.read().to_pandas()
    assert len(table) == 10_001
    assert table["shown_at"].is_monotonic_increasing
    assert table["product_id"].between(1, 30).all()
    people = pq.read_table(tmp_path / "data" / "shopper_profile.parquet").to_pandas()
    assert set(table["shopper_key"]) <= set(people["shopper_key"])
    assert people["shopper_key"].is_unique and len(people) == 500
    assert 0.05 < table["clicked"].mean() < 0.6
