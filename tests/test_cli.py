"""The `infra` command as a user runs it: plan, render, and their errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from infra import pki
from infra.cli import main
from infra.sandbox.platform import ca_identity, signed_identity
from infra.topology import Paths
from tests.conftest import ROOT


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_prod_lists_every_service(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "plan", "prod", "--json", str(tmp_path / "prod.json"))
    assert code == 0
    for expected in ("postgres-pg-1 ", "postgres-pg-3 ", "postgres-etcd-3 ", "clickhouse-clickhouse-1 ",
                     "monitoring-monitoring-2 ", "monitoring-grafana-1 ", "redis-group ", "backups-backups ",
                     "backups-audit ", "postgres-lb ",
                     "monitoring-monitoring-1-prometheus-tsdb ", "network-vpc "):
        assert expected in out, expected
    assert "resources in stack prod (prod)" in out
    assert "masked placeholders used" in out
    document = json.loads((tmp_path / "prod.json").read_text())
    keys = [(r["type"], r["name"]) for r in document["resources"]]
    assert keys == sorted(keys)
    assert "offline-" not in (tmp_path / "prod.json").read_text()


def test_plan_is_stable_across_runs(capsys, tmp_path):
    for name in ("a.json", "b.json"):
        assert run_cli(capsys, "plan", "dev", "--json", str(tmp_path / name))[0] == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_plan_with_a_bad_setting_exits_1_naming_it(capsys, tmp_path):
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.prod.yaml").read_text())
    document["config"]["betting-platform:monitoring"]["prometheus"]["retentionTime"] = "15d"
    (stacks / "Pulumi.prod.yaml").write_text(yaml.safe_dump(document))
    code, out, err = run_cli(capsys, "--stacks-dir", str(stacks), "plan", "prod")
    assert code == 1
    assert "betting-platform:monitoring.prometheus.retentionTime: must keep at least 30d; found 15d" in err
    assert out == ""  # nothing declared, nothing listed


def test_plan_of_an_unknown_stack_names_the_known_ones(capsys):
    code, _, err = run_cli(capsys, "plan", "qa")
    assert code == 1
    assert "unknown stack 'qa'" in err and "dev, prod, staging" in err


def test_console_script_is_installed():
    infra = shutil.which("infra", path=str(Path(ROOT / ".venv" / "bin"))) or shutil.which("infra")
    assert infra, "pip install -e . provides the infra command"
    result = subprocess.run([infra, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "infra plan STACK" in result.stdout


@pytest.fixture(scope="module")
def rendered_prod(tmp_path_factory):
    out = tmp_path_factory.mktemp("render")
    assert main(["render", "prod", "--out", str(out)]) == 0
    return out


def test_render_writes_one_folder_per_service(rendered_prod):
    files = {str(p.relative_to(rendered_prod)) for p in rendered_prod.rglob("*") if p.is_file()}
    for expected in ("prometheus/prometheus.yml", "alertmanager/alertmanager.yml", "patroni/pg-1.yml", "patroni/pg-3.yml",
                     "etcd/etcd-3.env", "pgbackrest/pg-3.conf",
                     "backup/betting-pg-backup-full.timer", "clickhouse/config.d/prometheus.xml",
                     "cloud-init/monitoring-2.yaml", "postgres_exporter/queries.yaml"):
        assert expected in files, expected
    assert any(f.startswith("prometheus/rules/") for f in files)
    assert any(f.startswith("grafana/dashboards/") and f.endswith(".json") for f in files)
    assert any(f.startswith("grafana/provisioning/datasources/") for f in files)


def test_promtool_accepts_the_rendered_prometheus_config_with_its_rules(rendered_prod, tmp_path):
    config = yaml.safe_load((rendered_prod / "prometheus/prometheus.yml").read_text())
    # Only the rule path is mapped, so promtool checks the rendered rules too.
    config["rule_files"] = [str(rendered_prod / "prometheus/rules/*.yml")]
    # promtool opens the TLS files a scrape job names: the host's, here a CA and a pair of the sandbox's.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    ca_cert, ca_key = ca_identity("test CA")
    cert, key = signed_identity(ca_cert, ca_key, common_name="monitoring-1")
    for name, pem in ((pki.CA_CERT, ca_cert), (pki.HOST_CERT, cert), (pki.HOST_KEY, key)):
        (secrets / name).write_text(pem)
    text = yaml.safe_dump(config).replace(Paths.SECRETS_DIR + "/", f"{secrets}/")
    (tmp_path / "prometheus.yml").write_text(text)
    result = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    checked_rules = (result.stdout + result.stderr).count("rules found")
    assert checked_rules == len(list((rendered_prod / "prometheus/rules").glob("*.yml")))


def test_clickhouse_config_is_well_formed_and_opens_the_prometheus_endpoint(rendered_prod):
    root = ET.parse(rendered_prod / "clickhouse/config.d/prometheus.xml").getroot()
    assert root.tag == "clickhouse"
    assert root.findtext("prometheus/port") == "9363" and root.findtext("prometheus/endpoint") == "/metrics"
    network = ET.parse(rendered_prod / "clickhouse/config.d/network.xml").getroot()
    assert network.findtext("listen_host") == "0.0.0.0"


def test_render_matches_what_the_hosts_receive(rendered_prod):
    bundle = json.loads((rendered_prod / "bundles/monitoring-1.json").read_text())
    written = {e["path"]: e["content"] for e in bundle["files"]}
    assert written["/etc/prometheus/prometheus.yml"] == (rendered_prod / "prometheus/prometheus.yml").read_text()
    assert written["/etc/prometheus/alertmanager.yml"] == (rendered_prod / "alertmanager/alertmanager.yml").read_text()


def test_plan_passes_every_policy_for_shipped_stacks(capsys):
    code, out, _ = run_cli(capsys, "plan", "staging")
    assert code == 0
    assert "policies: 0 mandatory and 0 advisory violations" in out


def test_plan_exits_1_on_a_mandatory_violation_and_prints_it(capsys, monkeypatch):
    import infra.platforms.aws as platform

    real = platform.aws.ec2.InstanceMetadataOptionsArgs
    # A program change that would let IMDSv1 back in: the policy, not the settings, must stop it.
    monkeypatch.setattr(platform.aws.ec2, "InstanceMetadataOptionsArgs", lambda **kw: real(**{**kw, "http_tokens": "optional"}))
    code, out, _ = run_cli(capsys, "plan", "prod")
    assert code == 1
    lines = [line for line in out.splitlines() if line.strip().startswith("[mandatory]")]
    assert len(lines) == 10  # every host of prod
    assert any("postgres-pg-1" in line and "optional" in line for line in lines)


def test_diff_shows_property_changes_against_the_snapshot(capsys, tmp_path):
    assert main(["plan", "dev", "--json", str(tmp_path / "dev.json")]) == 0
    snapshot = json.loads((tmp_path / "dev.json").read_text())
    volume = next(r for r in snapshot["resources"] if r["name"] == "postgres-pg-1-postgres-data")
    volume["props"]["size"] = 20
    snapshot["resources"] = [r for r in snapshot["resources"] if r["name"] != "redis-auth-token"]
    (tmp_path / "dev.json").write_text(json.dumps(snapshot))
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "diff", "dev", "--plans-dir", str(tmp_path), "--exit-code")
    assert code == 1
    assert "redis-auth-token" in out and "postgres-pg-1-postgres-data" in out
    assert "20" in out and "50" in out
    assert "1 to add, 0 to remove, 1 to change" in out


def test_sandbox_options_reach_the_sandbox_command(capsys):
    with pytest.raises(SystemExit) as leaving:
        main(["sandbox", "--help"])
    assert leaving.value.code == 0
    out = capsys.readouterr().out
    assert "up" in out and "down" in out and "status" in out


def test_sandbox_options_before_the_subcommand_arrive_in_order(capsys, tmp_path):
    # Before the fix --state-dir landed after `status` and the value was taken for the subcommand.
    assert main(["sandbox", "--state-dir", str(tmp_path), "--port-base", "26400", "status"]) == 1
    captured = capsys.readouterr()
    assert f"no sandbox running in {tmp_path}" in captured.out + captured.err


def test_unknown_options_of_other_commands_are_refused(capsys):
    with pytest.raises(SystemExit) as leaving:
        main(["plan", "dev", "--bogus"])
    assert leaving.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
