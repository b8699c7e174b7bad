"""The Patroni, etcd, pgBackRest and redis.conf renderers: content that the deployment relies on."""

from __future__ import annotations

import configparser
import subprocess

import yaml

from infra import pki
from infra.render.etcd import render_etcd
from infra.render.patroni import (
    EXPORTER_PASSWORD_ENV,
    EXTENSIONS_SQL,
    PASSWORD_ENV,
    RESTAPI_CREDENTIALS_ENV,
    render_patroni,
)
from infra.render.pgbackrest import TLS_CLIENT_CN, render_pgbackrest
from infra.render.redis import render_redis
from infra.sandbox.mapping import Layout, map_file
from infra.topology import BackupLayout, Paths, Ports, secret_path
from tests.conftest import ROOT

SECRET_WORDS = ("password", "secret", "token")


def _patroni(settings, topology, node):
    (content,) = render_patroni(settings, topology, node).values()
    return yaml.safe_load(content), content


def test_one_patroni_file_per_node_named_after_it(settings, topology):
    for node in topology.postgres:
        files = render_patroni(settings, topology, node)
        assert list(files) == [f"patroni/{node.name}.yml"]
        config, _ = _patroni(settings, topology, node)
        assert config["name"] == node.name
        assert config["scope"] == topology.patroni_scope
        assert config["restapi"]["connect_address"] == f"{node.fqdn}:{Ports.PATRONI_API}"
        assert config["postgresql"]["connect_address"] == f"{node.fqdn}:{Ports.POSTGRES}"
        assert config["postgresql"]["data_dir"] == Paths.POSTGRES_DATA


def test_patroni_addresses_etcd_by_dns_name(settings, topology):
    config, _ = _patroni(settings, topology, topology.postgres[0])
    assert config["etcd3"]["hosts"] == [f"{m.fqdn}:{Ports.ETCD_CLIENT}" for m in topology.etcd]


def test_timing_sync_and_watchdog_follow_the_settings(settings, topology):
    config, _ = _patroni(settings, topology, topology.postgres[0])
    dcs = config["bootstrap"]["dcs"]
    p = settings.patroni
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (p.ttl, p.loop_wait, p.retry_timeout)
    assert dcs["primary_start_timeout"] == p.primary_start_timeout
    assert dcs["maximum_lag_on_failover"] == p.maximum_lag_on_failover
    assert dcs["synchronous_mode"] is p.synchronous_mode
    assert dcs["loop_wait"] + 2 * dcs["retry_timeout"] <= dcs["ttl"]
    assert config["watchdog"]["mode"] == p.watchdog
    assert dcs["postgresql"]["parameters"]["max_connections"] == p.max_connections
    if settings.environment == "prod":
        assert dcs["synchronous_mode"] is True
        assert config["watchdog"]["mode"] == "required"


def test_postgres_loads_pg_stat_statements_and_can_rewind(settings, topology):
    config, _ = _patroni(settings, topology, topology.postgres[0])
    # Cluster-wide (DCS), so every member loads the same libraries; not overridden locally.
    parameters = config["bootstrap"]["dcs"]["postgresql"]["parameters"]
    assert "shared_preload_libraries" not in config["postgresql"]["parameters"]
    assert parameters["shared_preload_libraries"].split(",") == ["pg_stat_statements", "pgaudit"]
    assert parameters["pgaudit.log"] == "ddl, role" and parameters["pgaudit.role"] == "betting_auditor"
    assert parameters["betting.audit_tables"] == ",".join(settings.audit.tables)
    assert config["bootstrap"]["dcs"]["postgresql"]["use_pg_rewind"] is True
    assert config["bootstrap"]["dcs"]["postgresql"]["parameters"]["wal_log_hints"] == "on"
    assert "data-checksums" in config["bootstrap"]["initdb"]


def test_wal_archiving_restore_and_replica_creation_use_pgbackrest(settings, topology):
    config, _ = _patroni(settings, topology, topology.postgres[0])
    backrest = f"--config={Paths.PGBACKREST_CONFIG} --stanza={topology.patroni_scope}"
    parameters = config["postgresql"]["parameters"]
    assert parameters["archive_mode"] == "on"
    assert backrest in parameters["archive_command"] and parameters["archive_command"].endswith("archive-push %p")
    assert config["postgresql"]["recovery_conf"]["restore_command"].endswith(f"{backrest} archive-get %f %p")
    assert config["postgresql"]["create_replica_methods"][0] == "pgbackrest"
    assert "basebackup" in config["postgresql"]["create_replica_methods"]
    assert config["postgresql"]["pgbackrest"]["command"].endswith("--delta restore")


def test_no_password_in_patroni_yml_they_come_from_patronis_env_vars(settings, topology):
    for node in topology.postgres:
        config, content = _patroni(settings, topology, node)
        for user in config["postgresql"]["authentication"].values():
            assert set(user) == {"username", "sslmode", "sslrootcert"}  # no password
        # The only mention is the exporter role's bootstrap, which takes its value from the environment.
        del config["bootstrap"]["post_bootstrap"]
        assert "password" not in yaml.safe_dump(config).lower()
    assert set(PASSWORD_ENV) == {"PATRONI_SUPERUSER_PASSWORD", "PATRONI_REPLICATION_PASSWORD", "PATRONI_REWIND_PASSWORD"}
    # Each variable is filled from a secret file the platform writes.
    assert all(secret_path(name).startswith(Paths.SECRETS_DIR + "/") for name in PASSWORD_ENV.values())


def test_rest_api_serves_tls_asks_a_login_from_the_environment_and_allows_members_and_monitoring(settings, topology):
    for node in topology.postgres:
        config, _ = _patroni(settings, topology, node)
        restapi = config["restapi"]
        assert (restapi["certfile"], restapi["keyfile"], restapi["cafile"]) == (pki.cert_path(), pki.key_path(), pki.ca_path())
        assert "authentication" not in restapi  # Patroni fills it from PATRONI_RESTAPI_USERNAME/PASSWORD
        assert set(restapi["allowlist"]) == {h.fqdn for h in topology.postgres + topology.monitoring}
        assert restapi["allowlist_include_members"] is True
        assert config["ctl"] == {"cacert": pki.ca_path(), "certfile": pki.cert_path(), "keyfile": pki.key_path()}
        assert config["etcd3"] | {"hosts": None} == {"hosts": None, "protocol": "https", "cacert": pki.ca_path(),
                                                     "cert": pki.cert_path(), "key": pki.key_path()}
    assert set(RESTAPI_CREDENTIALS_ENV) == {"PATRONI_RESTAPI_USERNAME", "PATRONI_RESTAPI_PASSWORD"}


def test_exporter_role_and_stanza_are_created_at_bootstrap_by_the_shipped_script(settings, topology):
    config, _ = _patroni(settings, topology, topology.postgres[0])
    assert config["bootstrap"]["post_bootstrap"] == (
        f"{Paths.POST_BOOTSTRAP} {Paths.BACKUP_ENV} {EXTENSIONS_SQL} {Paths.PGBOUNCER_AUTH_SQL}")
    script = (ROOT / "infra" / "hostagent" / "files" / "betting-pg-post-bootstrap").read_text()
    assert "CREATE ROLE postgres_exporter LOGIN IN ROLE pg_monitor" in script
    # PgBouncer's auth function where databases are, and where later ones come from.
    assert '-d "$4" -f "$3" -c \'\\connect template1\' -f "$3"' in script
    assert f'password="${EXPORTER_PASSWORD_ENV}"' in script
    assert '-d "$4" -f "$2"' in script  # the extensions, from the file the agent runs on the leader too
    assert 'stanza-create; then' in script  # a failed stanza-create warns; it never fails the bootstrap


def test_pg_hba_allows_only_the_vpc_and_loopback_and_only_over_tls(settings, topology):
    """Every network line is hostssl (a `host` line would admit a login without TLS); the socket lines stay.
    tests/postgres/test_pgbouncer_live.py runs these lines in a real PostgreSQL and sees a login without TLS refused."""
    for node in topology.postgres:
        config, _ = _patroni(settings, topology, node)
        kinds = [line.split()[0] for line in config["postgresql"]["pg_hba"]]
        assert set(kinds) == {"local", "hostssl"}, kinds
        for line in config["postgresql"]["pg_hba"]:
            fields = line.split()
            if fields[0] == "hostssl":
                assert fields[3] in (settings.vpc_cidr, "127.0.0.1/32")
                assert fields[4] == "scram-sha-256"


def test_postgres_serves_the_hosts_identity_and_patronis_connections_verify_the_leader(settings, topology):
    for node in topology.postgres:
        config, _ = _patroni(settings, topology, node)
        postgresql = config["postgresql"]
        assert {k: postgresql["parameters"][k] for k in ("ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file",
                                                          "ssl_min_protocol_version")} == {
            "ssl": "on", "ssl_cert_file": pki.cert_path(), "ssl_key_file": pki.key_path(), "ssl_ca_file": pki.ca_path(),
            "ssl_min_protocol_version": "TLSv1.2"}
        assert not any(k.startswith("ssl") for k in config["bootstrap"]["dcs"]["postgresql"]["parameters"])
        for role in ("superuser", "replication", "rewind"):
            assert postgresql["authentication"][role]["sslmode"] == "verify-full"
            assert postgresql["authentication"][role]["sslrootcert"] == pki.ca_path()
        # A replica connects to the leader's connect_address: a name the leader's certificate carries.
        host = postgresql["connect_address"].rsplit(":", 1)[0]
        assert host in pki.identity(topology, node).dns_names


def _pgbackrest(settings, topology, node):
    (content,) = render_pgbackrest(settings, topology, node).values()
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(content.decode())
    return parser


def test_pgbackrest_writes_to_the_repository_prefix_of_the_backup_bucket_with_the_instance_role(settings, topology):
    for node in topology.postgres:
        parser = _pgbackrest(settings, topology, node)
        repo = parser["global"]
        assert repo["repo1-type"] == "s3"
        assert repo["repo1-s3-bucket"] == topology.backup_bucket
        assert repo["repo1-s3-region"] == settings.region
        assert repo["repo1-s3-key-type"] == "auto"
        assert "repo1-s3-key" not in repo and "repo1-s3-key-secret" not in repo
        # The prefix the host's IAM grant and the lifecycle rules name (one constant).
        assert repo["repo1-path"] == "/" + BackupLayout.REPOSITORY.rstrip("/")
        assert repo["repo1-s3-kms-key-id"] == topology.backup_key_alias
        assert (repo["repo1-retention-full-type"], repo["repo1-retention-full"]) == ("time", str(settings.backups.retention_days))
        assert repo["archive-async"] == "y" and repo["spool-path"] == Paths.PGBACKREST_SPOOL
        assert repo["archive-push-queue-max"] == f"{settings.backups.archive_push_queue_max_gib}GiB"
        assert parser[topology.patroni_scope]["pg1-path"] == Paths.POSTGRES_DATA
        assert "pg1-host" not in parser[topology.patroni_scope]  # pg1 is always the host itself


def test_each_member_backs_up_from_itself_as_a_standby_reaching_the_others_over_tls(settings, topology):
    for node in topology.postgres:
        parser = _pgbackrest(settings, topology, node)
        cluster, general = parser[topology.patroni_scope], parser["global"]
        others = [h for h in topology.postgres if h != node]
        for index, other in enumerate(others, start=2):
            assert cluster[f"pg{index}-host"] == other.fqdn
            assert (cluster[f"pg{index}-host-type"], cluster[f"pg{index}-host-port"]) == ("tls", str(Ports.PGBACKREST_TLS))
            cert = secret_path("pgbackrest_tls_cert")
            assert cluster[f"pg{index}-host-ca-file"] == cluster[f"pg{index}-host-cert-file"] == cert
        assert f"pg{len(others) + 2}-path" not in cluster
        if others:
            assert general["backup-standby"] == "y"
            assert general["tls-server-auth"] == f"{TLS_CLIENT_CN}={topology.patroni_scope}"
            assert general["tls-server-port"] == str(Ports.PGBACKREST_TLS)
        else:
            assert "backup-standby" not in general and "tls-server-port" not in general


def test_etcd_members_form_one_cluster(settings, topology):
    peers = None
    for member in topology.etcd:
        (content,) = render_etcd(settings, topology, member).values()
        env = dict(line.split("=", 1) for line in content.decode().splitlines())
        assert env["ETCD_NAME"] == member.name
        assert env["ETCD_ADVERTISE_CLIENT_URLS"] == f"https://{member.fqdn}:{Ports.ETCD_CLIENT}"
        assert env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == f"https://{member.fqdn}:{Ports.ETCD_PEER}"
        # Clients and peers both need a certificate of the stack's CA; the member serves its own pair.
        assert env["ETCD_CLIENT_CERT_AUTH"] == env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
        assert env["ETCD_TRUSTED_CA_FILE"] == env["ETCD_PEER_TRUSTED_CA_FILE"] == pki.ca_path()
        assert env["ETCD_CERT_FILE"] == env["ETCD_PEER_CERT_FILE"] == pki.cert_path()
        assert env["ETCD_KEY_FILE"] == env["ETCD_PEER_KEY_FILE"] == pki.key_path()
        assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("https://") and env["ETCD_LISTEN_PEER_URLS"].startswith("https://")
        cluster = dict(entry.split("=", 1) for entry in env["ETCD_INITIAL_CLUSTER"].split(","))
        assert cluster[member.name] == env["ETCD_INITIAL_ADVERTISE_PEER_URLS"]
        assert len(cluster) == settings.etcd.members
        peers = peers or cluster
        assert cluster == peers


def test_redis_conf_follows_the_settings(settings, topology):
    (content,) = render_redis(settings, topology).values()
    directives = dict(line.split(" ", 1) for line in content.decode().splitlines())
    assert directives["maxmemory-policy"] == settings.redis.maxmemory_policy
    assert directives["port"] == str(Ports.REDIS)
    assert directives["maxmemory"].endswith("mb") and int(directives["maxmemory"][:-2]) > 0
    assert not any(word in content.decode().lower() for word in ("requirepass", "masterauth"))


def test_renderers_are_deterministic(settings, topology):
    node, member = topology.postgres[0], topology.etcd[0]
    for render in (
        lambda: render_patroni(settings, topology, node),
        lambda: render_etcd(settings, topology, member),
        lambda: render_pgbackrest(settings, topology, node),
        lambda: render_redis(settings, topology),
    ):
        assert render() == render()


def test_pgbackrest_accepts_every_option_of_the_rendered_conf(settings, topology, tmp_path):
    """pgBackRest itself parses the file: an unknown or misspelt option is a WARN line."""
    node = topology.postgres[0]
    (content,) = render_pgbackrest(settings, topology, node).values()
    # As in the sandbox: the host's folders (log, lock, spool) move under a root in tmp_path, so the
    # check writes nothing under /var.
    layout = Layout(tmp_path)
    for folder in ("var/log/pgbackrest", "var/spool/pgbackrest", "tmp/pgbackrest"):
        layout.host_path(node, folder).mkdir(parents=True)
    mapped = map_file(layout, topology, node, Paths.PGBACKREST_CONFIG, content)
    conf = tmp_path / "pgbackrest.conf"
    for extra, expect_warning in ((b"", False), (b"repo1-s3-bogus=1\n", True)):
        conf.write_bytes(mapped.replace(b"[global]\n", b"[global]\n" + extra))
        # --io-timeout keeps the S3/instance-role round trip short where there is no AWS.
        run = subprocess.run(["pgbackrest", f"--config={conf}", f"--stanza={topology.patroni_scope}", "--io-timeout=1", "info"],
                             capture_output=True, text=True, timeout=60)
        output = run.stdout + run.stderr
        assert f"stanza: {topology.patroni_scope}" in output
        assert ("invalid option" in output) is expect_warning, output
