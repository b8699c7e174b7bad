"""The Pulumi program under Pulumi's mock engine: what each component declares, per stack."""

from __future__ import annotations

import functools
import json
import re
import shlex

import pytest
import yaml

from infra.engine import SECRET_MASK, evaluate
from infra.settings import load_settings
from infra.topology import build_topology
from tests.conftest import STACKS, stack_config

SENTINELS = {
    "pagerdutyRoutingKey": "SENTINEL-pagerduty-key",
    "slackCriticalWebhook": "https://example.invalid/SENTINEL-critical",
    "slackWarningsWebhook": "https://example.invalid/SENTINEL-warnings",
    "deadmanHeartbeatKey": "SENTINEL-heartbeat-key",
}
SSD = {"gp3", "gp2", "io1", "io2"}


@functools.cache
def plan(stack: str):
    evaluation = evaluate(stack, stack_config(stack), secret_values=SENTINELS)
    assert evaluation.error is None, evaluation.error
    return evaluation


def of_type(stack: str, suffix: str):
    return [r for r in plan(stack).resources if r.type.endswith(suffix)]


def named(stack: str, name: str):
    (resource,) = [r for r in plan(stack).resources if r.name == name]
    return resource


def bundle_of(instance, resources=None) -> dict:
    """The bundle published for the host (its user data is only the stub), from `resources` or the stack's plan."""
    host = instance.props["tags"]["Host"]
    resources = resources if resources is not None else plan(instance.props["tags"]["Stack"]).resources
    (obj,) = [r for r in resources if r.type.endswith("s3/bucketObjectv2:BucketObjectv2") and r.props["tags"]["Host"] == host]
    return json.loads(obj.props["content"])


def write_files(instance, resources=None) -> dict[str, str]:
    """Every file the host runs, from its bundle."""
    return {entry["path"]: entry["content"] for entry in bundle_of(instance, resources)["files"]}


def settings_of(stack: str):
    return load_settings(stack_config(stack), stack)


EXPECTED_HOSTS = {
    "dev": {"etcd": 1, "postgres": 2, "clickhouse": 1, "monitoring": 1, "grafana": 1},
    "staging": {"etcd": 3, "postgres": 3, "clickhouse": 1, "monitoring": 2, "grafana": 1},
    "prod": {"etcd": 3, "postgres": 3, "clickhouse": 1, "monitoring": 2, "grafana": 1},
}


@pytest.mark.parametrize("stack", STACKS)
def test_hosts_per_role(stack):
    instances = of_type(stack, "ec2/instance:Instance")
    counts: dict[str, int] = {}
    for instance in instances:
        counts[instance.props["tags"]["Role"]] = counts.get(instance.props["tags"]["Role"], 0) + 1
    assert counts == EXPECTED_HOSTS[stack]


def test_prod_spreads_patroni_and_etcd_over_three_zones():
    for role in ("postgres", "etcd"):
        subnets = {i.props["subnetId"] for i in of_type("prod", "ec2/instance:Instance") if i.props["tags"]["Role"] == role}
        assert subnets == {f"network-private-eu-west-1{z}_id" for z in "abc"}, role


@pytest.mark.parametrize("stack", STACKS)
def test_instances_are_private_with_imdsv2_and_encrypted_root(stack):
    for instance in of_type(stack, "ec2/instance:Instance"):
        assert instance.props["associatePublicIpAddress"] is False
        assert instance.props["metadataOptions"]["httpTokens"] == "required"
        assert instance.props["rootBlockDevice"]["encrypted"] is True
        assert instance.props["rootBlockDevice"]["kmsKeyId"].endswith("key/data-key")
        assert "keyName" not in instance.props  # no SSH key: Session Manager only
        assert instance.props["tags"]["Environment"] == stack and instance.props["tags"]["ManagedBy"] == "pulumi"


@pytest.mark.parametrize("stack", STACKS)
def test_data_volumes_are_encrypted_ssd_of_the_configured_size(stack):
    settings = settings_of(stack)
    expected = {
        "postgres-data": settings.patroni.data_volume,
        "etcd-data": settings.etcd.data_volume,
        "clickhouse-data": settings.clickhouse.data_volume,
        "prometheus-tsdb": settings.monitoring.prometheus.volume,
    }
    volumes = of_type(stack, "ebs/volume:Volume")
    assert len(volumes) == sum(EXPECTED_HOSTS[stack][r] for r in ("etcd", "postgres", "clickhouse", "monitoring"))
    for volume in volumes:
        wanted = expected[volume.props["tags"]["Role"]]
        assert volume.props["encrypted"] is True and volume.props["kmsKeyId"].endswith("key/data-key")
        assert volume.props["type"] == wanted.type and volume.props["type"] in SSD
        assert volume.props["size"] == wanted.size_gib


@pytest.mark.parametrize("stack", STACKS)
def test_every_prometheus_has_its_own_50gib_ssd_volume_in_its_zone(stack):
    instances = {i.name: i for i in of_type(stack, "ec2/instance:Instance") if i.props["tags"]["Role"] == "monitoring"}
    attachments = {a.props["volumeId"]: a.props["instanceId"] for a in of_type(stack, "volumeAttachment:VolumeAttachment")}
    tsdb = [v for v in of_type(stack, "ebs/volume:Volume") if v.props["tags"]["Role"] == "prometheus-tsdb"]
    assert len(tsdb) == len(instances) == settings_of(stack).monitoring.prometheus.replicas
    attached_to = {attachments[f"{v.name}_id"] for v in tsdb}
    assert attached_to == {f"{name}_id" for name in instances}
    for volume in tsdb:
        assert volume.props["size"] >= 50 and volume.props["type"] in SSD
        instance = instances[volume.name.removesuffix("-prometheus-tsdb")]
        assert instance.props["subnetId"].endswith(f"{volume.props['availabilityZone']}_id")


@pytest.mark.parametrize("stack", STACKS)
def test_prometheus_runs_with_the_retention_flags(stack):
    settings = settings_of(stack).monitoring.prometheus
    for instance in of_type(stack, "ec2/instance:Instance"):
        if instance.props["tags"]["Role"] != "monitoring":
            continue
        defaults = write_files(instance)["/etc/default/prometheus"]
        (line,) = [x for x in defaults.splitlines() if x.startswith("ARGS=")]
        flags = shlex.split(line.removeprefix("ARGS=").strip('"'))
        assert f"--storage.tsdb.retention.time={settings.retention_time}" in flags
        assert f"--storage.tsdb.retention.size={settings.retention_size}" in flags
        assert any(f.startswith("--storage.tsdb.path=/var/lib/prometheus") for f in flags)


@pytest.mark.parametrize("stack", STACKS)
def test_no_service_port_is_open_to_a_cidr(stack):
    for rule in of_type(stack, "securityGroupIngressRule:SecurityGroupIngressRule"):
        if rule.name == "network-endpoints-https":  # the SSM endpoints, from inside the VPC only
            assert rule.props["cidrIpv4"] == settings_of(stack).vpc_cidr and rule.props["fromPort"] == 443
            continue
        assert "cidrIpv4" not in rule.props and "cidrIpv6" not in rule.props, rule.name
        assert rule.props["referencedSecurityGroupId"].startswith("network-")


def _sources(stack: str, role: str, port: int) -> set[str]:
    return {
        r.props["referencedSecurityGroupId"].removeprefix("network-").removesuffix("_id")
        for r in of_type(stack, "securityGroupIngressRule:SecurityGroupIngressRule")
        if r.props["securityGroupId"] == f"network-{role}_id" and r.props["fromPort"] == port
    }


def test_each_port_admits_only_the_groups_that_need_it():
    assert _sources("prod", "postgres", 5432) == {"postgres", "clients"}
    assert _sources("prod", "postgres", 8008) == {"postgres", "monitoring"}  # HAProxy checks Patroni, the NLB does not
    assert _sources("prod", "postgres", 9187) == {"monitoring"}
    # The client path: the load balancer (and, as it keeps the client's address, the clients) reach HAProxy;
    # only the nodes' HAProxy reach PgBouncer; the NLB checks HAProxy's health endpoints on the stats port.
    assert _sources("prod", "postgres", 5000) == _sources("prod", "postgres", 5001) == {"postgres-lb", "clients"}
    assert _sources("prod", "postgres", 7000) == {"postgres-lb", "monitoring"}
    assert _sources("prod", "postgres", 6432) == {"postgres"}
    assert _sources("prod", "postgres", 9127) == {"monitoring"}
    assert _sources("prod", "postgres-lb", 5000) == _sources("prod", "postgres-lb", 5001) == {"clients"}
    assert not _sources("prod", "postgres-lb", 5432) and not _sources("prod", "postgres-lb", 5433)
    assert _sources("prod", "etcd", 2379) == {"postgres", "monitoring", "etcd"}  # etcd: a joining member
    assert _sources("prod", "etcd", 2380) == {"etcd"}
    assert _sources("prod", "redis", 6379) == {"clients", "monitoring"}
    assert _sources("prod", "clickhouse", 9363) == {"monitoring"}
    assert _sources("prod", "monitoring", 9090) == {"monitoring", "grafana"}
    assert _sources("prod", "grafana", 3000) == {"clients", "monitoring"}


def _policy(stack: str, name: str) -> dict:
    return json.loads(named(stack, name).props["policy"])


@pytest.mark.parametrize("stack", STACKS)
def test_instance_roles_have_no_wildcard_action_or_resource(stack):
    # The flow-log role is not a host's: it writes the streams of one log group (a test below).
    for policy in [p for p in of_type(stack, "iam/rolePolicy:RolePolicy") if p.name != "network-flow-logs-write"]:
        for statement in json.loads(policy.props["policy"])["Statement"]:
            for action in statement["Action"]:
                assert "*" not in action, (policy.name, action)
            for resource in statement["Resource"]:
                assert resource != "*" and not resource.endswith(":*"), (policy.name, resource)


def test_postgres_role_reads_only_its_secrets_and_writes_only_its_prefix():
    statements = _policy("prod", "postgres-pg-1-access")["Statement"]
    by_sid = {s.get("Sid"): s for s in statements}
    parameters = {r.rsplit("parameter", 1)[1] for r in by_sid["ReadOwnSecrets"]["Resource"]}
    assert parameters == {f"/betting/prod/{n}" for n in (
        "postgres_superuser_password", "postgres_replication_password", "postgres_rewind_password", "postgres_exporter_password",
        "pgbackrest_tls_key", "pgbackrest_tls_cert", "tls_ca_cert", "hosts/pg-1/tls_key", "hosts/pg-1/tls_cert",
        "patroni_restapi_username", "patroni_restapi_password", "metrics_aggregator_password")}
    objects = {s["Resource"][0]: s["Action"] for s in statements if "s3:PutObject" in s["Action"]}
    bucket = "arn:aws:s3:::betting-prod-pg-backups-eu-west-1"
    # pgBackRest's repository: read, write, expire; the verification records and the host's own audit
    # logs: written only, never read or deleted.
    assert objects == {f"{bucket}/pgbackrest/*": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                       f"{bucket}/verification/*": ["s3:PutObject"],
                       "arn:aws:s3:::betting-prod-audit-logs-eu-west-1/postgres/pg-1/*": ["s3:PutObject"]}
    (listing,) = [s for s in statements if s["Action"] == ["s3:ListBucket"]]
    assert listing["Resource"] == [bucket] and listing["Condition"] == {"StringLike": {"s3:prefix": ["pgbackrest/*"]}}


def test_monitoring_role_reads_alerting_secrets_and_nothing_of_postgres():
    statements = {s.get("Sid"): s for s in _policy("prod", "monitoring-monitoring-1-access")["Statement"]}
    names = {r.rsplit("/", 1)[1] for r in statements["ReadOwnSecrets"]["Resource"]}
    assert names == {"pagerduty_routing_key", "slack_critical_webhook", "slack_warnings_webhook", "deadman_heartbeat_key",
                     "redis_auth_token", "tls_ca_cert", "tls_key", "tls_cert", "monitoring_password", "monitoring_web_config",
                     # The aggregates job's login: its role may write only the aggregates database.
                     "metrics_aggregator_password"}
    # etcd members read no secret but their TLS identity, and no backup bucket: only their own bundles.
    for policy in (p for p in of_type("prod", "iam/rolePolicy:RolePolicy") if p.name.startswith("postgres-etcd")):
        statements = {s.get("Sid"): s for s in json.loads(policy.props["policy"])["Statement"]}
        assert set(statements) == {"ReadOwnBundleDigest", "ReadOwnBundles", "DecryptOwnBundles", "ReadOwnSecrets",
                                   "DecryptOwnSecrets"}, policy.name
        host = policy.name.removeprefix("postgres-").removesuffix("-access")
        assert {r.rsplit("parameter", 1)[1] for r in statements["ReadOwnSecrets"]["Resource"]} == {
            "/betting/prod/tls_ca_cert", f"/betting/prod/hosts/{host}/tls_key", f"/betting/prod/hosts/{host}/tls_cert"}
    attachments = of_type("prod", "rolePolicyAttachment:RolePolicyAttachment")
    assert len([a for a in attachments if a.name.startswith("postgres-etcd")]) == 3


@pytest.mark.parametrize("stack", STACKS)
def test_secrets_stay_secret(stack):
    evaluation = plan(stack)
    text = json.dumps([r.props for r in evaluation.resources])
    for value in SENTINELS.values():
        assert value not in text
    parameters = [p for p in of_type(stack, "ssm/parameter:Parameter") if "/bundles/" not in p.props["name"]]
    assert {p.props["name"].rsplit("/", 1)[1] for p in parameters} == {
        "pagerduty_routing_key", "slack_critical_webhook", "slack_warnings_webhook", "deadman_heartbeat_key",
        "grafana_admin_password",
        "postgres_superuser_password", "postgres_replication_password", "postgres_rewind_password",
        "postgres_exporter_password", "metrics_aggregator_password", "redis_auth_token", "pgbackrest_tls_key",
        "pgbackrest_tls_cert",
        "tls_ca_cert", "tls_ca_key", "tls_key", "tls_cert", "monitoring_password", "monitoring_web_config",
        "clickhouse_default_password", "patroni_restapi_username", "patroni_restapi_password"}
    for parameter in parameters:
        assert parameter.props["type"] == "SecureString" and parameter.props["value"] == SECRET_MASK
        assert parameter.props["name"].startswith(f"/betting/{stack}/")
    (group,) = of_type(stack, "replicationGroup:ReplicationGroup")
    assert group.props["authToken"] == SECRET_MASK
    assert evaluation.outputs["grafana_admin_password"] == SECRET_MASK


@pytest.mark.parametrize("stack", STACKS)
def test_rendered_boot_files_hold_no_secret(stack):
    for instance in of_type(stack, "ec2/instance:Instance"):
        content = instance.props["userData"]
        assert "offline-" not in content  # the mock engine's password and placeholder values
        assert not re.search(r"password:\s*\S", content, re.IGNORECASE), instance.name


def test_backup_bucket_is_private_encrypted_versioned_and_tls_only():
    bucket = named("prod", "backups-backups")
    assert bucket.props["bucket"] == "betting-prod-pg-backups-eu-west-1"
    bucket_id = "betting-prod-pg-backups-eu-west-1"
    configs = {r.type.split(":")[-1]: r for r in plan("prod").resources if r.props.get("bucket") == bucket_id and r is not bucket}
    assert configs["BucketVersioning"].props["versioningConfiguration"]["status"] == "Enabled"
    (rule,) = configs["BucketServerSideEncryptionConfiguration"].props["rules"]
    assert rule["applyServerSideEncryptionByDefault"] == {"sseAlgorithm": "aws:kms", "kmsMasterKeyId": rule[
        "applyServerSideEncryptionByDefault"]["kmsMasterKeyId"]}
    assert rule["applyServerSideEncryptionByDefault"]["kmsMasterKeyId"].endswith("key/backups-key")
    block = configs["BucketPublicAccessBlock"].props
    assert all(block[k] is True for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"))
    (statement,) = json.loads(configs["BucketPolicy"].props["policy"])["Statement"]
    assert statement["Effect"] == "Deny" and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    rules = {r["id"]: r for r in configs["BucketLifecycleConfiguration"].props["rules"]}
    assert rules["backup-verification"]["filter"]["prefix"] == "verification/"
    assert rules["backup-verification"]["expiration"]["days"] == 90
    assert rules["archive-to-glacier"]["transitions"][0]["storageClass"] == "GLACIER"
    assert "transitions" not in rules["base-backups-and-wal"]  # restores must not wait for a Glacier thaw
    assert rules["base-backups-and-wal"]["filter"]["prefix"] == "pgbackrest/"
    # pgBackRest leaves unfinished multipart uploads when a push dies half-way: the whole bucket aborts them.
    assert rules["abort-incomplete-uploads"]["filter"]["prefix"] == ""
    assert rules["abort-incomplete-uploads"]["abortIncompleteMultipartUpload"]["daysAfterInitiation"] == 7


def test_audit_bucket_keeps_seven_years_under_compliance_lock():
    bucket = named("prod", "backups-audit")
    assert bucket.props["objectLockEnabled"] is True
    lock = named("prod", "backups-audit-object-lock").props["rule"]["defaultRetention"]
    assert lock == {"mode": "COMPLIANCE", "years": 7}
    rule, abort = named("prod", "backups-audit-lifecycle").props["rules"]
    assert abort["id"] == "abort-incomplete-uploads"
    assert rule["transitions"][0]["storageClass"] == "DEEP_ARCHIVE"
    assert rule["expiration"]["days"] >= 7 * 365


@pytest.mark.parametrize(("stack", "multi_az"), [("dev", False), ("staging", True), ("prod", True)])
def test_redis_encryption_and_failover(stack, multi_az):
    (group,) = of_type(stack, "replicationGroup:ReplicationGroup")
    props = group.props
    assert props["transitEncryptionEnabled"] is True and props["atRestEncryptionEnabled"] is True
    assert props["multiAzEnabled"] is multi_az and props["automaticFailoverEnabled"] is multi_az
    assert props["numCacheClusters"] == settings_of(stack).redis.num_cache_clusters
    record = named(stack, "redis-dns").props
    assert record["name"] == f"redis.{stack}.betting.internal" and record["type"] == "CNAME"


@pytest.mark.parametrize("stack", STACKS)
def test_load_balancer_targets_every_nodes_haproxy_checked_by_its_health_endpoints(stack):
    """Every node is a target of both groups, on HAProxy's writer and reader ports, healthy while its HAProxy sees
    a primary (a replica). Under the mock engine: that HAProxy serves those paths on that port is what
    tests/postgres/test_cluster_live.py shows with the real HAProxy; AWS's own health checking is not seen."""
    groups = {g.name: g.props for g in of_type(stack, "targetGroup:TargetGroup")}
    assert set(groups) == {"postgres-primary", "postgres-replicas"}
    assert groups["postgres-primary"]["healthCheck"]["path"] == "/health/writer"
    assert groups["postgres-replicas"]["healthCheck"]["path"] == "/health/reader"
    for group in groups.values():
        check = group["healthCheck"]
        assert (check["protocol"], check["port"]) == ("HTTP", "7000")
        # AWS's minimums (5 s, 2 checks): the checks only drop a lost node; HAProxy follows a failover.
        assert (check["interval"], check["healthyThreshold"], check["unhealthyThreshold"]) == (5, 2, 2)
        assert group["protocol"] == "TCP" and group["connectionTermination"] is True
    assert (groups["postgres-primary"]["port"], groups["postgres-replicas"]["port"]) == (5000, 5001)
    listeners = {listener.name: listener.props for listener in of_type(stack, "lb/listener:Listener")}
    assert {name: props["port"] for name, props in listeners.items()} == {"postgres-primary": 5000, "postgres-replicas": 5001}
    for name, props in listeners.items():
        assert props["defaultActions"][0]["targetGroupArn"].endswith(f"targetgroup/{name}")
    nodes = {i.name: i for i in of_type(stack, "ec2/instance:Instance") if i.props["tags"]["Role"] == "postgres"}
    attachments = {a.name: a.props for a in of_type(stack, "targetGroupAttachment:TargetGroupAttachment")}
    assert set(attachments) == {f"postgres-{purpose}-{n.props['tags']['Host']}" for purpose in ("primary", "replicas")
                                for n in nodes.values()}
    for name, props in attachments.items():
        purpose = name.split("-")[1]
        assert props["port"] == {"primary": 5000, "replicas": 5001}[purpose]
        assert props["targetGroupArn"].endswith(f"targetgroup/postgres-{purpose}")
        assert props["targetId"] == f"postgres-{name.removeprefix(f'postgres-{purpose}-')}_id"
    (lb,) = of_type(stack, "lb/loadBalancer:LoadBalancer")
    assert lb.props["internal"] is True and lb.props["loadBalancerType"] == "network"
    assert lb.props["securityGroups"] == ["network-postgres-lb_id"]
    zone = settings_of(stack).dns_zone
    for purpose, alias in (("primary", f"pg-primary.{zone}"), ("replicas", f"pg-replicas.{zone}")):
        record = named(stack, f"postgres-{purpose}-dns").props
        assert record["name"] == alias and record["type"] == "A"
        assert record["aliases"][0]["name"] == "postgres-lb.elb.eu-west-1.amazonaws.com"  # the mock's name of the NLB
    outputs = plan(stack).outputs
    assert (outputs["postgres_writer"], outputs["postgres_reader"]) == (f"pg-primary.{zone}:5000", f"pg-replicas.{zone}:5001")


def test_every_postgres_node_runs_pgbouncer_haproxy_and_the_pgbouncer_exporter():
    for instance in of_type("prod", "ec2/instance:Instance"):
        if instance.props["tags"]["Role"] != "postgres":
            continue
        bundle = bundle_of(instance)
        assert {"pgbouncer", "haproxy", "python3-psycopg2"} <= set(bundle["packages"])
        units = [s["unit"] for s in bundle["services"]]
        assert units.index("patroni") < units.index("pgbouncer") < units.index("haproxy")
        assert "betting-pgbouncer-exporter" in units
        files = write_files(instance)
        assert {"/etc/pgbouncer/pgbouncer.ini", "/etc/pgbouncer/pgbouncer_hba.conf", "/etc/pgbouncer/userlist.txt",
                "/etc/haproxy/haproxy.cfg", "/etc/default/betting-pgbouncer-exporter"} <= set(files)


@pytest.mark.parametrize("stack", STACKS)
def test_every_host_has_a_stable_name(stack):
    topology = build_topology(settings_of(stack))
    records = {r.props["name"] for r in of_type(stack, "route53/record:Record")}
    assert {h.fqdn for h in topology.hosts} | {topology.postgres_primary_endpoint, topology.postgres_replica_endpoint,
                                               topology.redis_endpoint} == records


@pytest.mark.parametrize("stack", STACKS)
def test_components_name_and_parent_their_children(stack):
    resources = plan(stack).resources
    components = {r.name: r.type for r in resources if not r.custom}
    assert set(components.values()) == {
        "betting:network:Network", "betting:backups:BackupStorage", "betting:postgres:PatroniCluster",
        "betting:cache:RedisCache", "betting:analytics:ClickHouse", "betting:monitoring:Monitoring",
        "betting:delivery:HostBundles", "betting:delivery:Rollout", "betting:security:CertificateAuthority"}
    for resource in resources:
        if resource.parent is not None:
            assert resource.name.startswith(resource.parent + "-"), resource.name
    top_level = {r.name for r in resources if r.parent is None and r.custom}
    assert top_level == {"data-key"}


def test_prod_postgres_nodes_run_synchronous_patroni_with_pg_stat_statements():
    for instance in of_type("prod", "ec2/instance:Instance"):
        if instance.props["tags"]["Role"] != "postgres":
            continue
        patroni = yaml.safe_load(write_files(instance)["/etc/patroni/config.yml"])
        dcs = patroni["bootstrap"]["dcs"]
        assert dcs["synchronous_mode"] is True
        parameters = {**dcs.get("postgresql", {}).get("parameters", {}), **patroni["postgresql"].get("parameters", {})}
        assert "pg_stat_statements" in parameters["shared_preload_libraries"]
        assert patroni["restapi"]["listen"].endswith(":8008")


def test_dev_patroni_is_asynchronous():
    (instance, *_) = [i for i in of_type("dev", "ec2/instance:Instance") if i.props["tags"]["Role"] == "postgres"]
    patroni = yaml.safe_load(write_files(instance)["/etc/patroni/config.yml"])
    assert patroni["bootstrap"]["dcs"].get("synchronous_mode", False) is False


def _with_smtp_login(stack: str) -> dict[str, str]:
    config = stack_config(stack)
    alerting = json.loads(config["betting-platform:alerting"])
    config["betting-platform:alerting"] = json.dumps({**alerting, "smtpAuthUsername": "ses-smtp-user"})
    return config


def test_smtp_login_is_wired_when_a_username_is_set():
    evaluation = evaluate("dev", _with_smtp_login("dev"), secret_values={**SENTINELS, "smtpAuthPassword": "SENTINEL-smtp"})
    assert evaluation.error is None, evaluation.error
    parameters = {r.props["name"]: r.props["value"] for r in evaluation.resources if r.type.endswith("ssm/parameter:Parameter")}
    assert parameters["/betting/dev/smtp_auth_password"] == SECRET_MASK
    (host,) = [r for r in evaluation.resources if r.name == "monitoring-monitoring-1"]
    alertmanager = yaml.safe_load(write_files(host, evaluation.resources)["/etc/prometheus/alertmanager.yml"])
    assert alertmanager["global"]["smtp_auth_username"] == "ses-smtp-user"
    assert alertmanager["global"]["smtp_auth_password_file"] == "/etc/betting/secrets/smtp_auth_password"
    bundle = bundle_of(host, evaluation.resources)
    assert "/betting/dev/smtp_auth_password" in {s["parameter"] for s in bundle["secret_files"]}
    assert "SENTINEL-smtp" not in json.dumps([r.props for r in evaluation.resources])


def test_smtp_username_without_its_password_is_a_clear_error():
    config = _with_smtp_login("dev")
    config["betting-platform:smtpAuthPassword"] = ""  # the CLI's default when the secret was never set
    evaluation = evaluate("dev", config, secret_values=SENTINELS)
    assert "betting-platform:smtpAuthPassword: missing; alerting.smtpAuthUsername is set" in str(evaluation.error)
    assert evaluation.resources == []


def test_without_smtp_login_no_password_is_provisioned():
    parameters = {r.props["name"] for r in of_type("dev", "ssm/parameter:Parameter")}
    assert "/betting/dev/smtp_auth_password" not in parameters
    (host,) = [i for i in of_type("dev", "ec2/instance:Instance") if i.name == "monitoring-monitoring-1"]
    assert "smtp_auth_username" not in yaml.safe_load(write_files(host)["/etc/prometheus/alertmanager.yml"])["global"]


@pytest.mark.parametrize("stack", STACKS)
def test_the_database_load_balancer_is_protected_from_deletion_outside_dev(stack):
    (lb,) = of_type(stack, "lb/loadBalancer:LoadBalancer")
    assert lb.props["enableDeletionProtection"] is (stack != "dev")
