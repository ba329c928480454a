"""Model approval rules (the policy's `approvals` section).

A purpose may require that a person approve a model version before it takes traffic
for it: `rankgate model approve VERSION --by NAME --purpose P` records who, when and
the evidence they saw (model_store/approvals.py), and `rankgate model promote` refuses
a version that would answer such a purpose without one, unless `--force` (recorded in
the audit of routing changes).

    approvals:
      approvers: [dana.okafor, lee.ml-lead]      # who may approve anything
      purposes:
        email_marketing: {}                      # required; anyone on the list
        onsite_personalization: {approvers: [dana.okafor]}   # only these

Names are the organisation's own (a login, an e-mail address): the policy is where
privacy says whose word counts, so a name not on `approvers` is refused at load.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints, model_validator

from rankgate.core.config_files import Strict

ApproverName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)
]


class PurposeApproval(Strict):
    """A purpose that needs an approval before a version answers it."""

    approvers: list[ApproverName] | None = None
    """Who may approve for this purpose (names from `approvals.approvers`); None: any of them."""
    description: str = ""


class ApprovalRules(Strict):
    approvers: list[ApproverName] = Field(default_factory=list)
    """Everyone whose approval counts, by name."""
    purposes: dict[str, PurposeApproval] = Field(default_factory=dict)
    """The purposes that require an approval (the policy's purpose names)."""

    @model_validator(mode="after")
    def _approvers_on_the_list(self) -> ApprovalRules:
        if self.purposes and not self.approvers:
            raise ValueError("approvers: a purpose requires approval, so name who may approve")
        known = set(self.approvers)
        if len(known) != len(self.approvers):
            raise ValueError("approvers: a name is listed twice")
        for purpose, rule in self.purposes.items():
            for name in rule.approvers or []:
                if name not in known:
                    raise ValueError(
                        f"purposes.{purpose}.approvers: {name!r} is not on approvals.approvers"
                    )
        return self

    def required(self, purpose: str) -> bool:
        return purpose in self.purposes

    def approvers_of(self, purpose: str) -> list[str]:
        """Who may approve a version for `purpose`."""
        rule = self.purposes.get(purpose)
        return list(rule.approvers if rule is not None and rule.approvers else self.approvers)
