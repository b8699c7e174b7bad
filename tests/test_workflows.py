"""The GitHub workflows: valid against GitHub's workflow schema, and doing what the README promises.

actionlint cannot be installed here (its PyPI wrapper downloads the binary from GitHub at build
time), so validity is checked with check-jsonschema's vendored GitHub workflow schema, and the
behaviour (which jobs, which stacks, which commands, which permissions) by reading the YAML.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.settings import ENVIRONMENTS

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
STACKS = list(ENVIRONMENTS)


def _load(name: str) -> dict:
    document = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the bare key `on` as True.
    document["on"] = document.pop(True, document.get("on"))
    return document


def _steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def _runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in _steps(job))


def _uses(job: dict, action: str) -> list[dict]:
    return [step for step in _steps(job) if step.get("uses", "").split("@")[0] == action]


def _schema_check(*paths: Path) -> subprocess.CompletedProcess:
    command = str(CHECK_JSONSCHEMA) if CHECK_JSONSCHEMA.exists() else shutil.which("check-jsonschema")
    assert command, "check-jsonschema is not installed: pip install check-jsonschema==0.39.0"
    return subprocess.run([command, "--builtin-schema", "vendor.github-workflows", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_every_workflow_is_valid_for_github():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"pull-request.yml", "deploy.yml", "pulumi-up.yml", "drift.yml"}
    result = _schema_check(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text((WORKFLOWS / "drift.yml").read_text().replace("runs-on:", "runs_on:"))
    result = _schema_check(broken)
    assert result.returncode != 0 and "runs-on" in result.stdout


def test_pull_requests_get_an_offline_job_per_stack_that_needs_no_secret():
    workflow = _load("pull-request.yml")
    assert "pull_request" in workflow["on"]
    assert "pull_request_target" not in workflow["on"]  # never run fork code with this repository's secrets
    offline = workflow["jobs"]["offline"]
    assert offline["strategy"]["matrix"]["stack"] == STACKS
    assert "secrets." not in yaml.safe_dump(offline) and "id-token" not in yaml.safe_dump(offline)
    runs = _runs(offline)
    assert "bash .ci/run" in runs  # the README's tests
    assert re.search(r"infra plan \"\$\{\{ matrix.stack \}\}\"", runs)
    assert re.search(r"infra diff \"\$\{\{ matrix.stack \}\}\"", runs)
    assert "python -m infra.plan_diff" in runs and "GITHUB_STEP_SUMMARY" in runs


def test_pull_requests_from_this_repository_get_a_preview_with_the_policy_pack():
    preview = _load("pull-request.yml")["jobs"]["preview"]
    assert preview["if"].replace(" ", "") == "github.event.pull_request.head.repo.full_name==github.repository"
    assert preview["strategy"]["matrix"]["stack"] == STACKS
    assert preview["permissions"]["pull-requests"] == "write"
    (pulumi,) = _uses(preview, "pulumi/actions")
    settings = pulumi["with"]
    assert settings["command"] == "preview"
    assert settings["stack-name"] == "${{ matrix.stack }}"
    assert settings["diff"] is True and settings["comment-on-pr"] is True
    assert settings["policyPacks"] == "policies"
    assert settings["policyPackConfigs"] == "policies/config/${{ matrix.stack }}.json"
    assert settings["cloud-url"].startswith("${{ vars.")  # a self-managed backend, configured per repository


def test_pushes_to_main_update_dev_then_staging_then_prod_behind_their_environments():
    deploy = _load("deploy.yml")
    assert deploy["on"]["push"]["branches"] == ["main"]
    jobs = deploy["jobs"]
    assert [jobs[s]["with"]["stack"] for s in STACKS] == STACKS
    assert "needs" not in jobs["dev"] and jobs["staging"]["needs"] == "dev" and jobs["prod"]["needs"] == "staging"
    assert deploy["concurrency"]["cancel-in-progress"] is False
    assert {jobs[s]["uses"] for s in STACKS} == {"./.github/workflows/pulumi-up.yml"}
    up = _load("pulumi-up.yml")["jobs"]["up"]
    assert up["environment"] == "${{ inputs.stack }}"
    (pulumi,) = _uses(up, "pulumi/actions")
    assert pulumi["with"]["command"] == "up"
    assert pulumi["with"]["policyPacks"] == "policies"
    assert pulumi["with"]["policyPackConfigs"] == "policies/config/${{ inputs.stack }}.json"
    # The offline gate runs the same policies before anything touches the cloud.
    steps = _steps(up)
    gate = next(i for i, s in enumerate(steps) if "infra plan" in s.get("run", ""))
    assert gate < steps.index(pulumi)


def test_a_nightly_drift_check_per_stack_opens_or_updates_an_issue():
    drift = _load("drift.yml")
    assert drift["on"]["schedule"] and "workflow_dispatch" in drift["on"]
    job = drift["jobs"]["drift"]
    assert job["strategy"]["matrix"]["stack"] == STACKS
    assert job["permissions"]["issues"] == "write"
    runs = _runs(job)
    assert re.search(r"pulumi preview .*--refresh --expect-no-changes", runs)
    assert "--policy-pack policies" in runs
    scripts = "\n".join(step["with"]["script"] for step in _uses(job, "actions/github-script"))
    assert "issues.create(" in scripts and "issues.createComment(" in scripts and 'state: "closed"' in scripts


def test_every_action_is_pinned_to_a_version():
    for path in WORKFLOWS.glob("*.yml"):
        for line in path.read_text().splitlines():
            match = re.search(r"uses:\s*(\S+)", line)
            if match and not match.group(1).startswith("./"):
                assert re.search(r"@(v\d+|[0-9a-f]{40})$", match.group(1)), f"{path.name}: {match.group(1)}"


@pytest.mark.parametrize("stack", STACKS)
def test_what_the_workflows_reference_exists(stack):
    assert (ROOT / "stacks" / f"Pulumi.{stack}.yaml").exists()
    assert (ROOT / "policies" / "config" / f"{stack}.json").exists()
    assert (ROOT / "policies" / "PulumiPolicy.yaml").exists()
    assert (ROOT / ".ci" / "run").exists()
    assert (WORKFLOWS / "pulumi-up.yml").exists()
