"""Every settings check: a bad value fails with an error naming the key, the value and what is allowed."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from infra.settings import SettingsError, load_settings
from infra.units import duration_seconds, size_bytes
from tests.conftest import ROOT

P = "betting-platform:"


def raw_stack(stack: str = "prod") -> dict:
    return yaml.safe_load((ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())["config"]


def load(raw: dict, stack: str = "prod"):
    config = {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}
    return load_settings(config, stack)


def problems_for(mutate, stack: str = "prod") -> list[str]:
    raw = copy.deepcopy(raw_stack(stack))
    mutate(raw)
    with pytest.raises(SettingsError) as caught:
        load(raw, stack)
    return caught.value.problems


def test_shipped_stacks_load(stack):
    settings = load(raw_stack(stack), stack)
    assert settings.environment == stack
    assert settings.monitoring.prometheus.retention_time == "30d"
    assert settings.monitoring.prometheus.volume.size_gib >= 50


def test_prod_shape():
    settings = load(raw_stack("prod"))
    assert settings.patroni.nodes == 3 and len(settings.availability_zones) == 3 and settings.etcd.members == 3
    assert settings.patroni.synchronous_mode is True
    assert settings.monitoring.prometheus.replicas == 2


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.update({P + "environment": "qa"}), "environment: unknown environment 'qa'; allowed: dev, staging, prod"),
        (lambda r: r.update({P + "patroniNodes": 3}), "patroniNodes: unknown setting"),
        (lambda r: r[P + "patroni"].update(nodes="three"), "patroni.nodes: Input should be a valid integer"),
        (lambda r: r[P + "patroni"].update(nodes=12), "patroni.nodes: Input should be less than or equal to 9 (found 12)"),
        (lambda r: r[P + "patroni"].update(ttl=10), "patroni.ttl: Input should be greater than or equal to 20 (found 10)"),
        (lambda r: r[P + "patroni"].update(ttl=20, loopWait=12, retryTimeout=7),
         "patroni: loopWait + 2 * retryTimeout must be <= ttl (Patroni's rule); found 12 + 2 * 7 = 26 > ttl 20"),
        (lambda r: r[P + "patroni"].update(watchdog="on"), "patroni.watchdog: Input should be 'off', 'automatic' or 'required'"),
        (lambda r: r[P + "patroni"].update(synchronousMode=False), "prod needs patroni.synchronousMode: true"),
        (lambda r: r[P + "patroni"]["dataVolume"].update(type="st1"),
         "patroni.dataVolume.type: Input should be 'gp3', 'gp2', 'io1' or 'io2' (found 'st1')"),
        (lambda r: r[P + "patroni"]["dataVolume"].update(type="io2", iops=None), "type io2 needs iops"),
        (lambda r: r[P + "patroni"]["dataVolume"].update(type="gp2", iops=None), "throughput is a gp3 setting; type is gp2"),
        (lambda r: r[P + "patroni"].update(instanceType="big"), "patroni.instanceType: String should match pattern"),
        (lambda r: r[P + "etcd"].update(members=2), "etcd.members: Input should be 1, 3 or 5"),
        (lambda r: r[P + "etcd"].update(heartbeatIntervalMs=400, electionTimeoutMs=1500),
         "etcd: electionTimeoutMs must be at least 5 x heartbeatIntervalMs (etcd refuses to start otherwise); "
         "found 1500 < 5 x 400"),
        (lambda r: r[P + "etcd"].update(electionTimeoutMs=60000),
         "etcd.electionTimeoutMs: Input should be less than or equal to 50000"),
        (lambda r: r[P + "redis"].update(multiAz=True, numCacheClusters=1), "multiAz needs numCacheClusters >= 2"),
        (lambda r: r[P + "redis"].update(maxmemoryPolicy="lru"), "redis.maxmemoryPolicy: Input should be"),
        (lambda r: r[P + "monitoring"]["prometheus"].update(retentionTime="7d"),
         "monitoring.prometheus.retentionTime: must keep at least 30d; found 7d"),
        (lambda r: r[P + "monitoring"]["prometheus"].update(retentionTime="30days"),
         "'30days' is not a duration like 15s, 5m, 1h30m or 30d"),
        (lambda r: r[P + "monitoring"]["prometheus"].update(retentionSize="95GB"),
         "retentionSize 95GB (Prometheus reads GB as GiB) leaves no room for the WAL on a 100 GiB volume; allowed at most 85GB"),
        (lambda r: r[P + "monitoring"]["prometheus"].update(retentionSize="85G"), "'85G' is not a size like 512MB or 40GB"),
        (lambda r: r[P + "monitoring"]["prometheus"]["volume"].update(sizeGiB=40),
         "Prometheus needs a volume of at least 50 GiB; found 40"),
        (lambda r: r[P + "monitoring"]["prometheus"].update(scrapeInterval="10m"), "must be between 1s and 5m; found 10m"),
        (lambda r: r[P + "backups"].update(verificationRetentionDays=30),
         "backups.verificationRetentionDays: Input should be greater than or equal to 90 (found 30)"),
        (lambda r: r[P + "backups"].update(auditRetentionYears=5),
         "backups.auditRetentionYears: Input should be greater than or equal to 7 (found 5)"),
        (lambda r: r[P + "backups"].update(backupTime="2am"),
         "backups.backupTime: must be a UTC time of day as HH:MM (00:00 to 23:59); found '2am'"),
        (lambda r: r[P + "backups"].update(backupTime="24:00"), "backups.backupTime: must be a UTC time of day as HH:MM"),
        (lambda r: r[P + "backups"].update(fullBackupDay="Sunday"),
         "backups.fullBackupDay: Input should be 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat' or 'Sun' (found 'Sunday')"),
        (lambda r: r[P + "backups"].update(retentionDays=3),
         "backups.retentionDays: Input should be greater than or equal to 7 (found 3)"),
        (lambda r: r[P + "backups"].update(archivePushQueueMaxGiB=200),
         "backups.archivePushQueueMaxGiB 200 would let queued WAL take more than 25% of the 500 GiB data volume; "
         "allowed at most 125"),
        (lambda r: r[P + "backups"].update(fullBackupSchedule="0 2 * * *"), "backups.fullBackupSchedule: unknown setting"),
        (lambda r: r.update({P + "vpcCidr": "10.0.0.0/8"}), "vpcCidr: prefix must be /16 to /24; found /8"),
        (lambda r: r.update({P + "vpcCidr": "10.0.0.300/16"}), "vpcCidr: not an IPv4 CIDR"),
        (lambda r: r.update({P + "availabilityZones": ["eu-west-1a", "eu-west-1a", "eu-west-1b"]}), "repeats a zone"),
        (lambda r: r.update({P + "availabilityZones": ["us-east-1a", "eu-west-1b", "eu-west-1c"]}),
         "availabilityZones ['us-east-1a'] are not zones of region eu-west-1"),
        (lambda r: r.update({P + "availabilityZones": ["eu-west-1a", "eu-west-1b"]}), "prod needs 3 availabilityZones; found 2"),
        (lambda r: r.pop("aws:region"), "aws:region: missing"),
        (lambda r: r.pop(P + "patroni"), "betting-platform:patroni: missing"),
        (lambda r: r[P + "alerting"].update(emailTo="nobody"), "alerting.emailTo: String should match pattern"),
        (lambda r: r[P + "application"].update(metricsTargets=["api:port"]), "application.metricsTargets.0"),
        (lambda r: r[P + "backups"].pop("replicaRegion"),
         "prod needs backups.replicaRegion: the backups' second copy, in another AWS region"),
        (lambda r: r[P + "backups"].update(replicaRegion="eu-centrl-1"),
         "backups.replicaRegion: not an AWS region; allowed: af-south-1, "),
        (lambda r: r[P + "backups"].update(replicaRegion="eu-west-1"),
         "backups.replicaRegion must be another region than the stack's own (eu-west-1); found eu-west-1"),
        (lambda r: r[P + "audit"].update(tables=["bets"]), "audit.tables.0: String should match pattern"),
        (lambda r: r[P + "audit"].update(tables=["public.Bets"]), "audit.tables.0: String should match pattern"),
        (lambda r: r[P + "audit"].update(tables=["public.bets", "public.bets"]),
         "audit.tables: names a table more than once: ['public.bets']"),
        (lambda r: r[P + "audit"].update(database="bet-ting"), "audit.database: String should match pattern"),
        (lambda r: r[P + "clientPath"].update(poolSize=377),
         "clientPath: 1 pooled database(s) x (poolSize 377 + 1 for logins) + 3 for aggregates.database = 381 server "
         "connections exceed patroni.maxConnections 400 - clientPath.reservedConnections 20 = 380"),
        (lambda r: r[P + "clientPath"].update(databases=["betting", "reports"], poolSize=200),
         "clientPath: 2 pooled database(s) x (poolSize 200 + 1 for logins) + 3 for aggregates.database = 405 server "
         "connections exceed"),
        (lambda r: r.update({P + "aggregates": {"database": "postgres"}}),
         "aggregates.database: must be a database of its own, not 'postgres' (its CONNECT is revoked from PUBLIC)"),
        (lambda r: r.update({P + "aggregates": {"database": "Metrics"}}), "aggregates.database: String should match pattern"),
        (lambda r: r.update({P + "aggregates": {"monthsKept": 6}}),
         "aggregates.monthsKept: Input should be greater than or equal to 12 (found 6)"),
        (lambda r: r[P + "clientPath"].update(databases=["metrics"]),
         "aggregates.database 'metrics' must be a database of its own, not one of clientPath.databases or audit.database"),
        (lambda r: r[P + "clientPath"].update(reservedConnections=5),
         "clientPath.reservedConnections: Input should be greater than or equal to 10 (found 5)"),
        (lambda r: r[P + "clientPath"].update(databases=[]),
         "clientPath.databases: must name at least one database (the application's)"),
        (lambda r: r[P + "clientPath"].update(databases=["Betting"]), "clientPath.databases.0: String should match pattern"),
        (lambda r: r[P + "clientPath"].update(databases=["betting", "betting"]),
         "clientPath.databases: names a database more than once: ['betting']"),
        (lambda r: r[P + "clientPath"].update(maxClientConnections=5),
         "clientPath.maxClientConnections: Input should be greater than or equal to 10 (found 5)"),
        (lambda r: r[P + "clientPath"].update(readerMaxLagBytes=-1),
         "clientPath.readerMaxLagBytes: Input should be greater than or equal to 0 (found -1)"),
        (lambda r: r[P + "clientPath"].update(poolMode="session"), "clientPath.poolMode: unknown setting"),
        (lambda r: r[P + "monitoring"].update(managedPrometheus={"enabled": "yes"}),
         "monitoring.managedPrometheus.enabled: Input should be a valid boolean (found 'yes')"),
        (lambda r: r[P + "monitoring"].update(managedPrometheus={"enabled": True, "send": "everything"}),
         "monitoring.managedPrometheus.send: Input should be 'aggregates' or 'all' (found 'everything')"),
        (lambda r: r[P + "monitoring"].update(managedPrometheus={"enabled": True, "region": "us-east-1"}),
         "monitoring.managedPrometheus.region: unknown setting"),
    ],
)
def test_bad_value_is_named(mutate, expected):
    problems = problems_for(mutate)
    assert any(expected in p for p in problems), problems


def test_every_problem_is_reported_at_once():
    def mutate(raw):
        raw[P + "patroni"].update(ttl=5)
        raw[P + "etcd"].update(members=4)
        raw[P + "monitoring"]["prometheus"].update(retentionTime="1d")

    problems = problems_for(mutate)
    assert len(problems) == 3
    assert [p.split(":")[1] for p in problems] == ["patroni.ttl", "etcd.members", "monitoring.prometheus.retentionTime"]


def test_error_message_names_stack_and_keys():
    raw = raw_stack()
    raw[P + "patroni"]["ttl"] = 5
    with pytest.raises(SettingsError) as caught:
        load(raw)
    assert str(caught.value).startswith("stack 'prod' has invalid settings:\n  - betting-platform:patroni.ttl:")


def test_settings_are_frozen():
    settings = load(raw_stack())
    with pytest.raises(Exception, match="frozen"):
        settings.patroni.ttl = 5


def test_dev_may_be_asynchronous_but_keeps_retention():
    settings = load(raw_stack("dev"), "dev")
    assert settings.patroni.synchronous_mode is False
    assert duration_seconds(settings.monitoring.prometheus.retention_time) == 30 * 86400


@pytest.mark.parametrize(("text", "seconds"), [("15s", 15), ("5m", 300), ("1h30m", 5400), ("30d", 2592000), ("1w", 604800)])
def test_durations(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("512MB", 512 * 2**20), ("42GB", 42 * 2**30), ("1TB", 2**40)])
def test_sizes_are_base_2_like_prometheus(text, size):
    assert size_bytes(text) == size


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_managed_prometheus_ships_off_with_aggregates(stack):
    """Off everywhere until Prometheus signs its remote writes (tests/monitoring/test_managed_prometheus_live.py)."""
    managed = load(raw_stack(stack), stack).monitoring.managed_prometheus
    assert (managed.enabled, managed.send) == (False, "aggregates")
