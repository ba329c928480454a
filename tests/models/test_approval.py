"""Model approval: the policy's rules, the approvals file, the promote check, and the
commands against a copy of serve_config.yaml whose policy requires approval (no server)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from model_store.approvals import Approval, ApprovalLog
from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.config_files import parse_yaml_model
from rankgate.core.errors import ConfigError, ModelStoreError
from rankgate.core.home import Home
from rankgate.governance.approval import ApprovalRules
from rankgate.governance.notifications import Notification
from rankgate.governance.policy import Policy, load_policy
from rankgate.ops.environment import Environment
from serving.contract.config import RoutingConfig
from serving.ops.approvals import NotApproved, approval_guard
from serving.ops.promotion import Move, permitted_views, plan, write_policy
from tests.serving_support import SERVE_CONFIG, ingress_user_config, model_commands

EXAMPLE_POLICIES = Path(__file__).resolve().parents[2] / "examples" / "default" / "policies"
ONSITE, EMAIL = "onsite_personalization", "email_marketing"
RULES = ApprovalRules.model_validate(
    {"approvers": ["dpo", "ml.lead"], "purposes": {ONSITE: {}, EMAIL: {"approvers": ["dpo"]}}}
)


def approval(version: str, purpose: str, by: str = "dpo") -> Approval:
    return Approval(
        version=version, purpose=purpose, by=by, at=datetime.now(UTC), policy_version="t"
    )


def test_rules_name_who_may_approve_what() -> None:
    assert RULES.required(ONSITE) and RULES.required(EMAIL) and not RULES.required("other")
    assert RULES.approvers_of(ONSITE) == ["dpo", "ml.lead"]
    assert RULES.approvers_of(EMAIL) == ["dpo"]


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"approvers": ["dpo"], "purposes": {EMAIL: {"approvers": ["mallory"]}}}, "mallory"),
        ({"purposes": {EMAIL: {}}}, "approvers"),
        ({"approvers": ["dpo", "dpo"]}, "listed twice"),
        ({"approvers": ["dpo"], "purposes": {"newsletters": {}}}, "unknown purpose"),
    ],
)
def test_a_bad_approvals_section_is_refused_naming_the_field(
    section: dict[str, object], field: str
) -> None:
    text = (EXAMPLE_POLICIES / "policy.yaml").read_text().split("\napprovals:")[0]
    text += "\n" + json.dumps({"approvals": section})[1:-1] + "\n"
    with pytest.raises(ConfigError) as refused:
        parse_yaml_model(text.encode(), Path("policy.yaml"), Policy)
    assert "policy.yaml" in refused.value.message and "approvals" in refused.value.message
    assert field in refused.value.message


def test_the_example_requires_approval_for_email() -> None:
    rules = load_policy(EXAMPLE_POLICIES / "policy.yaml").approvals
    assert rules.required(EMAIL) and not rules.required(ONSITE)
    assert rules.approvers_of(EMAIL) == ["dpo.office", "crm.lead"]


def test_the_log_appends_and_reads_back_and_names_a_damaged_line(tmp_path: Path) -> None:
    log = ApprovalLog(tmp_path)
    assert log.read() == [] and log.latest(EMAIL) is None
    log.append(approval("v3", EMAIL))
    log.append(approval("v3", ONSITE, by="ml.lead"))
    log.append(approval("v3", EMAIL, by="ml.lead"))
    assert [(a.purpose, a.by) for a in log.read()] == [
        (EMAIL, "dpo"),
        (ONSITE, "ml.lead"),
        (EMAIL, "ml.lead"),
    ]
    latest = log.latest(EMAIL)
    assert latest is not None and latest.by == "ml.lead"
    with log.path.open("ab") as broken:
        broken.write(b'{"version": "v3", "purp\n')
    with pytest.raises(ModelStoreError, match=r"approvals.jsonl:4: not an approval"):
        log.read()


def test_promote_checks_only_purposes_a_version_starts_to_answer(tmp_path: Path) -> None:
    routing = RoutingConfig.model_validate(ingress_user_config()["routing"])  # v2, v1 alternate
    purposes = permitted_views(load_policy(EXAMPLE_POLICIES / "policy.yaml"))
    views: dict[str, frozenset[str] | None] = {
        "v1": frozenset({"visitor_profile", "item_context"}),
        "v2": frozenset({"visitor_profile", "item_context", "user_item_affinity"}),
    }
    # v1 answers e-mail already (alternate); as a canary it starts answering on-site.
    planned = plan(routing, Move("v1", "canary", 10), purposes, views)
    log, said = ApprovalLog(tmp_path), []
    new = {s.purpose for s in planned.served_after if s.version == "v1"} - {
        s.purpose for s in planned.served_before if s.version == "v1"
    }
    assert new == {ONSITE}
    with pytest.raises(NotApproved, match=r"v1 has no approval for onsite_personalization"):
        approval_guard(RULES, new, "v1", log, False, said.append)
    overrode = approval_guard(RULES, new, "v1", log, True, said.append)
    assert overrode == [
        "approval: v1 has no approval for onsite_personalization, which the policy requires"
    ]
    log.append(approval("v1", ONSITE, by="ml.lead"))
    assert approval_guard(RULES, new, "v1", log, False, said.append) == []
    assert said[-1].startswith("v1 approved for onsite_personalization by ml.lead at ")
    assert approval_guard(RULES, {"other"}, "v1", ApprovalLog(tmp_path / "x"), False, print) == []


def test_approve_then_promote_on_a_policy_that_requires_it(
    ready_home: Home, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policies)
    text = (policies / "policy.yaml").read_text()
    (policies / "policy.yaml").write_text(
        text.replace(
            "email_marketing: {approvers: [dpo.office, crm.lead]}",
            "email_marketing: {approvers: [dpo.office, crm.lead]}\n"
            "    onsite_personalization: {approvers: [ml.lead]}",
        )
    )
    config = tmp_path / "serve_config.yaml"
    config.write_text(SERVE_CONFIG.read_text())
    write_policy(config, policies, "approval-test")
    runner = CliRunner()
    model = model_commands(config)

    before = config.read_text()
    code, output = model("promote", "v3", "--canary", "10")
    assert code == 1, output
    assert "refused: v3 has no approval for onsite_personalization" in output
    assert "rankgate model approve v3 --by NAME --purpose onsite_personalization" in output
    assert config.read_text() == before

    code, output = model("approve", "v3", "--by", "dpo.office", "--purpose", ONSITE)
    assert code == 1 and "--by 'dpo.office': not an approver for onsite_personalization" in output
    code, output = model("approve", "v3", "--by", "ml.lead", "--purpose", "newsletters")
    assert code == 1 and "--purpose 'newsletters': not a purpose of the policy" in output
    code, output = model("approve", "v9", "--by", "ml.lead", "--purpose", ONSITE)
    assert code == 1 and "'v9' not found" in output
    assert not (ready_home.models_dir / "ranker" / "v3" / "approvals.jsonl").exists()

    code, output = model("approve", "v3", "--by", "ml.lead", "--purpose", ONSITE, "--note", "ok")
    assert code == 0, output
    assert "v3 approved for onsite_personalization by ml.lead at " in output
    stored = ApprovalLog(ready_home.models_dir / "ranker" / "v3").read()[-1]
    assert (stored.by, stored.purpose, stored.note) == ("ml.lead", ONSITE, "ok")
    assert stored.evidence and stored.drift  # figures, or why there are none
    assert stored.evidence.get("baseline") == "v2" or "unavailable" in stored.evidence

    code, output = model("promote", "v3", "--canary", "10")
    assert code == 0, output
    assert "v3 approved for onsite_personalization by ml.lead" in output
    assert "{version: v3, role: canary, weight: 10}" in config.read_text()

    history = runner.invoke(main, ["model", "history", "--count", "2"])
    assert history.exit_code == 0, history.output
    assert "approve v3 for onsite_personalization by ml.lead" in history.output

    # The approval went to the outbox for the webhooks that take approvals.
    env = Environment.open()
    entries = env.redis.xrevrange(redis_keys.notifications(env.home.namespace), count=5)
    sent = [Notification.read(i, f) for i, f in entries]  # type: ignore[union-attr]
    approved = next(n for n in sent if n.kind == "approval")
    assert approved.text.startswith(
        "v3 was approved for onsite_personalization by ml.lead with `rankgate model approve`"
    )
    assert (
        approved.data["by"] == "ml.lead"
        and approved.data["evidence"].keys() == stored.evidence.keys()
    )
