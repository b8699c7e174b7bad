"""The policy pack for `pulumi preview|up --policy-pack policies`: assembly only, the rules live in rules/.

The engine starts this file with policies/ as the working directory; the repository root goes on
the path so `policies.rules` (and `infra.units`) import the same way as in the tests.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pulumi_policy import EnforcementLevel, PolicyPack  # noqa: E402

from policies.rules.pack import PACK_NAME, build_policies  # noqa: E402

PolicyPack(
    name=PACK_NAME,
    policies=build_policies(),
    enforcement_level=EnforcementLevel.MANDATORY,
    description="Retention, storage, security and compute guardrails of the betting platform (see README, Guardrails).",
)
