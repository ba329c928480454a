"""`rankgate project check`: validate a project without starting anything.

It reads what `rankgate setup` and a serving replica read, in the same order, and
stops short of every side effect: no Redis, no Ray, no Feast registry, no model
store, nothing written in the home. A project with a prepare step has it run into
a temporary folder (the tables it writes are what the Feast sources, the catalogue
and the interaction log are then read from); a project without one is read from
the home's data folder, as setup would.

The checks go on past a problem where the next ones still make sense, and all the
problems found are reported together, each naming its file and field.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from rankgate.core.errors import ConfigError, RankgateError
from rankgate.core.home import Home
from rankgate.core.project import ItemId, Project, load_project
from rankgate.core.settings import default_home, get_project, get_settings
from rankgate.governance.policy import PolicySet, load_policy_set

if TYPE_CHECKING:
    from feast import FeatureView

    from features.spec import FeatureSpec, ViewInfo


class ProjectProblems(ConfigError):
    """One or more problems of a project, each naming its file and field."""

    def __init__(self, project: Project, problems: list[str]) -> None:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{project.root}: {count}:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


@dataclass
class Findings:
    """What a check found: lines for people, and the problems so far."""

    project: Project
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ok(self, line: str) -> None:
        self.lines.append(f"✓ {line}")

    def note(self, line: str) -> None:
        self.lines.append(f"! {line}")

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def stop_if_any(self) -> None:
        """Raise with every problem so far (the next checks need what failed)."""
        if self.problems:
            raise ProjectProblems(self.project, self.problems)


def check_project(folder: Path | None = None) -> list[str]:
    """Validate the project in `folder` (default: the selected one). Returns what was
    checked, one line each; raises ConfigError naming each problem's file and field."""
    project = load_project(folder) if folder is not None else get_project()
    found = Findings(project)
    found.ok(f"{project.file}: project {project.name!r}")
    check_feature_store_file(project, found)
    with data_folder(project, found) as data_dir:
        views, infos = check_definitions(project, data_dir, found)
        catalogue = check_catalogue(project, views, data_dir, found)
        check_streaming(project, views, catalogue, found)
        logged = check_interactions(project, data_dir, found)
        policies = check_policies(project, catalogue, infos, found)
        check_data_regions(project, data_dir, logged, policies, found)
        check_models(project, infos, policies, logged, found)
    found.stop_if_any()
    return found.lines


def shown(project: Project, path: Path) -> str:
    """A path as the project's lines show it: relative to the project where inside it."""
    try:
        return str(path.relative_to(project.root))
    except ValueError:
        return str(path)


def check_feature_store_file(project: Project, found: Findings) -> None:
    from features.store import repo_settings

    try:
        repo_settings(project)
    except ConfigError as exc:
        found.problem(exc.message)
        return
    found.ok(f"{shown(project, project.feast_repo / 'feature_store.yaml')}: Redis online store")


@contextmanager
def data_folder(project: Project, found: Findings) -> Iterator[Path]:
    """Where `${RANKGATE_DATA_DIR}` points during the check: a temporary folder the
    project's prepare step writes into, or (without one) the home's data folder."""
    if project.spec.prepare is None:
        # Not Home.from_settings(): that creates the home, and a check writes nothing.
        data_dir = Home(get_settings().home or default_home(project.root)).data_dir
        found.ok(f"data: no prepare step; sources read from {data_dir}")
        yield data_dir
        return
    with tempfile.TemporaryDirectory(prefix="rankgate-check-") as scratch:
        data_dir = Path(scratch)
        try:
            # Importing the step leaves no __pycache__ in the project.
            sys.dont_write_bytecode, before = True, sys.dont_write_bytecode
            try:
                prepare = project.prepare_function()
            finally:
                sys.dont_write_bytecode = before
            assert prepare is not None
            prepare(data_dir)
        except RankgateError as exc:
            found.problem(exc.message)
        except Exception as exc:  # noqa: BLE001 - any failure of the step is a finding
            found.problem(
                f"{project.file}: field 'prepare': {project.spec.prepare} failed: "
                f"{type(exc).__name__}: {exc}"
            )
        # Without the prepared tables, every later check would fail for the same reason.
        found.stop_if_any()
        written = sorted(p.name for p in data_dir.iterdir())
        found.ok(
            f"{project.spec.prepare}: wrote {', '.join(written) or 'nothing'} (a temporary folder)"
        )
        yield data_dir


def check_definitions(
    project: Project, data_dir: Path, found: Findings
) -> tuple[list[FeatureView], dict[str, ViewInfo]]:
    """The repository's views and what the builder knows of them; stops the check
    when the definitions do not load."""
    from feast import Entity, FeatureView

    from features.store import check_definitions as contradictions
    from features.store import read_definitions, view_infos

    try:
        objects = read_definitions(project, data_dir)
    except RankgateError as exc:
        found.problem(exc.message)
        raise ProjectProblems(project, found.problems) from exc
    views = [o for o in objects if isinstance(o, FeatureView)]
    # Feast adds a placeholder entity of its own for entity-less views.
    entities = [o.name for o in objects if isinstance(o, Entity) and not o.name.startswith("__")]
    problems = contradictions(project, objects)
    for problem in problems:
        found.problem(problem)
    if not views:
        found.problem(f"{project.feast_repo}: the repository defines no feature view")
    infos = view_infos(views, project)
    if not problems and views:
        described = ", ".join(
            f"{i.name} ({i.entity}, {len(i.fields)} fields)" for i in infos.values()
        )
        found.ok(
            f"{shown(project, project.feast_repo)}: entities {', '.join(sorted(entities))}; "
            f"views {described}"
        )
    return views, infos


def check_catalogue(
    project: Project, views: list[FeatureView], data_dir: Path, found: Findings
) -> list[ItemId] | None:
    from features.applied import of_feast
    from features.tables import load_catalogue

    try:
        catalogue = load_catalogue(project, of_feast(views), data_dir)
    except RankgateError as exc:
        found.problem(exc.message)
        return None
    source = project.spec.catalogue.view or project.spec.catalogue.file
    found.ok(f"catalogue: {len(catalogue)} items ({project.spec.item.id_type} ids) from {source}")
    return catalogue


def check_streaming(
    project: Project, views: list[FeatureView], catalogue: list[ItemId] | None, found: Findings
) -> None:
    """The per-item fields of each streaming view against the catalogue (the rest of a
    streaming declaration is checked with the definitions)."""
    from features.history import countable
    from features.store import check_streaming_fields

    if not project.spec.streaming:
        return
    problems = check_streaming_fields(project, views, catalogue) if catalogue is not None else []
    for problem in problems:
        found.problem(problem)
    names = {v.name for v in views}
    for streaming in project.spec.streaming:
        if streaming.view not in names:
            continue  # reported with the definitions
        if not any(countable(project, streaming)):
            found.note(
                f"streaming view {streaming.view}: the interaction log records none of its "
                f"events ({', '.join(streaming.events)}): a model trained on it sees its "
                f"default ({streaming.default:g})"
            )
    if not problems:
        found.ok(
            "streaming: "
            + "; ".join(
                f"{s.view} (push source {s.push_source}, {', '.join(s.events)} per {s.per}, "
                f"half-life {s.half_life_s:g} s)"
                for s in project.spec.streaming
            )
        )


def check_interactions(project: Project, data_dir: Path, found: Findings) -> set[str] | None:
    """The columns of the log the popularity fallback and training read (None: no log,
    or a log that cannot be read), each declared column present."""
    spec = project.spec.interactions
    if spec is None:
        return None
    path = project.path(spec.path, data_dir)
    try:
        columns = table_columns(path)
    except RankgateError as exc:
        found.problem(f"{project.file}: field 'interactions.path': {exc.message}")
        return None
    declared = {
        "item_column": spec.item_column,
        "outcome_column": spec.outcome_column,
        "user_column": spec.user_column,
        "time_column": spec.time_column,
    }
    missing = [
        (name, column) for name, column in declared.items() if column and column not in columns
    ]
    for name, column in missing:
        found.problem(
            f"{project.file}: field 'interactions.{name}': {path.name} has no column "
            f"{column!r} (it has: {', '.join(sorted(columns))})"
        )
    if not missing:
        found.ok(f"interactions: {path.name} has the declared columns")
    return columns


def check_data_regions(
    project: Project,
    data_dir: Path,
    logged: set[str] | None,
    policies: PolicySet | None,
    found: Findings,
) -> None:
    """Where each person's region is read (the lineage of trained versions): the
    people table's key and region columns, or the log's region column; a note when
    the policy has residency rules that trained versions could never satisfy."""
    spec = project.spec.data_regions
    field = f"{project.file}: field 'data_regions"
    if spec is None:
        if policies is not None and policies.policy.residency:
            found.note(
                f"{project.file}: no `data_regions`: trained versions record no regions, and "
                "the residency rules of policy.yaml accept none of them"
            )
        return
    if spec.path is None:
        if logged is not None and spec.column not in logged:
            found.problem(f"{field}.column': the interaction log has no column {spec.column!r}")
        elif logged is not None:
            found.ok(f"data_regions: the interaction log's column {spec.column!r}")
        return
    path = project.path(spec.path, data_dir)
    try:
        columns = table_columns(path)
    except RankgateError as exc:
        found.problem(f"{field}.path': {exc.message}")
        return
    wanted = [project.spec.user.join_key, spec.column]
    missing = [column for column in wanted if column not in columns]
    for column in missing:
        found.problem(f"{field}.path': {path.name} has no column {column!r}")
    if not missing:
        found.ok(f"data_regions: {path.name} has {' and '.join(wanted)}")


def table_columns(path: Path) -> set[str]:
    """The column names of a CSV or Parquet file, without reading its rows."""
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        if path.name.endswith((".csv", ".csv.gz")):
            return set(pd.read_csv(path, nrows=0).columns)
        return set(pq.read_schema(path).names)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def check_policies(
    project: Project,
    catalogue: list[ItemId] | None,
    infos: dict[str, ViewInfo],
    found: Findings,
) -> PolicySet | None:
    """policy.yaml and fallback.yaml (their item ids against the catalogue, their
    purposes' views against the repository) and reasons.yaml."""
    try:
        policies = load_policy_set(project.policies, catalogue, project.item_type)
    except RankgateError as exc:
        found.problem(exc.message)
        return None
    file = policies.folder / "policy.yaml"
    unknown = False
    for name, purpose in policies.policy.purposes.items():
        for view in purpose.feature_views:
            if view not in infos:
                found.problem(
                    f"{file}: field 'purposes.{name}.feature_views': the Feast repository "
                    f"defines no view {view!r} (it has: {', '.join(sorted(infos)) or 'none'})"
                )
                unknown = True
    if policies.fallback.strategy == "popularity" and project.spec.interactions is None:
        found.problem(
            f"{policies.folder / 'fallback.yaml'}: field 'strategy': popularity needs the "
            f"interaction log ({project.file}: interactions), or use strategy static"
        )
    reasons = check_reasons(project)
    if reasons is not None:
        found.problem(reasons)
    if not unknown and reasons is None:
        found.ok(
            f"{shown(project, policies.folder)}: policy {policies.policy.version} "
            f"({len(policies.policy.purposes)} purposes, {len(policies.policy.item_rules)} "
            f"item rules), fallback {policies.fallback.version} ({policies.fallback.strategy})"
            + (", item ids in the catalogue" if catalogue is not None else "")
        )
    return policies


def check_reasons(project: Project) -> str | None:
    """What is wrong with reasons.yaml (None: nothing)."""
    # The explainer owns the file's schema; importing it here costs no server.
    from serving.ranking.explainer import load_reason_templates

    try:
        load_reason_templates(project.policies / "reasons.yaml")
    except RankgateError as exc:
        return exc.message
    return None


def check_models(
    project: Project,
    infos: dict[str, ViewInfo],
    policies: PolicySet | None,
    logged: set[str] | None,
    found: Findings,
) -> None:
    """Each setup model: its FEATURES.yaml resolves against the repository's views and
    the declared context, its training settings are valid, and some purpose may use it."""
    from features.spec import load_features_file, resolve
    from model_store.train import trainer_params

    models = project.spec.setup_models
    if models and (project.spec.interactions is None or not project.spec.interactions.user_column):
        found.problem(
            f"{project.file}: field 'setup_models': training needs `interactions` with a "
            "user_column; register models trained elsewhere with `rankgate model register`"
        )
    for n, model in enumerate(models):
        try:
            trainer_params(model.trainer, model.params)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in ("setup_models", n, "params", *first["loc"]))
            found.problem(f"{project.file}: field {where!r} ({model.version}): {first['msg']}")
        path = project.path(model.features)
        try:
            specs = resolve(load_features_file(path).inputs, infos, project)
        except RankgateError as exc:
            message = exc.message if exc.message.startswith(str(path)) else f"{path}: {exc.message}"
            found.problem(message)
            continue
        usable = usable_for(specs, policies)
        line = f"model {model.version}: {shown(project, path)} resolves ({len(specs)} inputs)"
        if usable is None:
            found.ok(line)
        elif usable:
            found.ok(f"{line}; purposes that may use it: {', '.join(usable)}")
        else:
            found.note(
                f"{line}, but no purpose of policy.yaml permits all of its views "
                f"({', '.join(sorted({s.view for s in specs if s.view}))}): it would never serve"
            )
        mixed = groups_mixing_the_person_in(specs)
        if mixed:
            found.note(
                f"model {model.version}: reason group {', '.join(mixed)} holds inputs about "
                "the person (a user view) and inputs that are not (an item attribute, the "
                "request context): one text of reasons.yaml cannot be true of both; give "
                "them groups of their own in "
                f"{shown(project, path)}"
            )
        unlogged = [
            s.field for s in specs if s.source == "context" and s.field not in (logged or ())
        ]
        if logged is not None and unlogged:
            found.note(
                f"model {model.version}: the interaction log has no column for context "
                f"{', '.join(unlogged)}: training sees it as missing"
            )


def groups_mixing_the_person_in(specs: list[FeatureSpec]) -> list[str]:
    """Reason groups with inputs about the person (their profile, their clicks) and
    inputs that are not: a text about the person's taste would be shown for an item
    attribute, or one about the item for the person's data."""
    about_person: dict[str, set[bool]] = {}
    for spec in specs:
        about_person.setdefault(spec.group, set()).add(spec.source == "user")
    return sorted(group for group, kinds in about_person.items() if len(kinds) == 2)


def usable_for(specs: list[FeatureSpec], policies: PolicySet | None) -> list[str] | None:
    """Purposes whose permitted views include every view the model reads."""
    if policies is None:
        return None
    views = {s.view for s in specs if s.view is not None}
    return [
        name
        for name, purpose in policies.policy.purposes.items()
        if views <= set(purpose.feature_views)
    ]
