"""Stack settings: one frozen, validated object built from the stack's config.

The Pulumi program and the offline `infra` command both call `load_settings` with the raw
config map (``{"betting-platform:patroni": '{"nodes": 3, ...}', "aws:region": "eu-west-1"}``,
values as the Pulumi engine hands them over: strings, structured values JSON-encoded), so a
bad value fails the same way in both, before any resource is declared. Secrets are not part
of the settings: they stay Pulumi secrets (see `SECRET_KEYS`).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from botocore.session import get_session as _botocore_session
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from infra import pg_parameters
from infra.instance_types import INSTANCE_TYPES, Hardware
from infra.units import GIB, duration_seconds, size_bytes

# The aws partition's regions as the AWS SDK lists them (botocore's endpoint data, offline).
AWS_REGIONS = frozenset(_botocore_session().get_available_regions("s3", partition_name="aws"))

PROJECT = "betting-platform"
ENVIRONMENTS = ("dev", "staging", "prod")
# Pulumi config secrets (`pulumi config set --secret KEY ...`); never part of the settings object.
SECRET_KEYS = ("pagerdutyRoutingKey", "slackCriticalWebhook", "slackWarningsWebhook", "deadmanHeartbeatKey")
# Secrets needed only with a setting: smtpAuthPassword goes with alerting.smtpAuthUsername.
OPTIONAL_SECRET_KEYS = ("smtpAuthPassword",)

# Requirements document: Prometheus keeps 30 days on at least 50 GB of SSD.
MIN_PROMETHEUS_RETENTION = "30d"
MIN_PROMETHEUS_VOLUME_GIB = 50
# Size retention may use at most this share of the TSDB volume: the WAL, the head block and
# compaction's temporary copies live beside the blocks it counts.
MAX_RETENTION_SIZE_SHARE = 0.85
MIN_VERIFICATION_RETENTION_DAYS = 90
MIN_AUDIT_RETENTION_YEARS = 7
# A full backup is taken weekly: a shorter window could leave no full backup to restore from.
MIN_BACKUP_RETENTION_DAYS = 7
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # systemd.time(7) spells them so
# The WAL spool may take at most this share of the data volume it shares with pg_wal and the data.
MAX_ARCHIVE_QUEUE_SHARE = 0.25


class SettingsError(ValueError):
    """Every problem in a stack's config, one line each, naming the key."""

    def __init__(self, stack: str, problems: list[str]):
        self.stack = stack
        self.problems = problems
        super().__init__(f"stack {stack!r} has invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))


def _duration(text: str) -> str:
    duration_seconds(text)
    return text


def _size(text: str) -> str:
    size_bytes(text)
    return text


Duration = Annotated[str, AfterValidator(_duration)]
PrometheusSize = Annotated[str, AfterValidator(_size)]
InstanceType = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")]
# Data volumes are SSD only: st1, sc1 and standard (magnetic) are too slow for a database or a TSDB.
SsdVolumeType = Literal["gp3", "gp2", "io1", "io2"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class VolumeSettings(_Model):
    size_gib: int = Field(ge=8, le=16384, alias="sizeGiB")
    type: SsdVolumeType = "gp3"
    iops: int | None = Field(default=None, ge=3000, le=256000)
    throughput: int | None = Field(default=None, ge=125, le=1000, description="MiB/s, gp3 only")

    @model_validator(mode="after")
    def _performance_fits_type(self) -> VolumeSettings:
        if self.type in ("io1", "io2") and self.iops is None:
            raise ValueError(f"type {self.type} needs iops (3000 or more)")
        if self.throughput is not None and self.type != "gp3":
            raise ValueError(f"throughput is a gp3 setting; type is {self.type}")
        return self


class PatroniSettings(_Model):
    nodes: int = Field(ge=1, le=9)
    instance_type: InstanceType
    data_volume: VolumeSettings
    postgres_version: Literal[15] = 15
    # Patroni's documented minimums: ttl 20, loop_wait 1, retry_timeout 3.
    ttl: int = Field(default=30, ge=20, le=3600)
    loop_wait: int = Field(default=10, ge=1, le=600)
    retry_timeout: int = Field(default=10, ge=3, le=600)
    primary_start_timeout: int = Field(default=300, ge=0, le=3600)
    maximum_lag_on_failover: int = Field(default=1048576, ge=0)
    synchronous_mode: bool = False
    synchronous_mode_strict: bool = False
    watchdog: Literal["off", "automatic", "required"] = "off"
    max_connections: int = Field(default=200, ge=20, le=10000)
    # The host's figures for tuning (infra/render/tuning.py) when instanceType is not in infra/instance_types.py,
    # or to tune for less than the instance has.
    memory_mib: int | None = Field(default=None, ge=1024, le=24 * 1024 * 1024, alias="memoryMiB")
    vcpus: int | None = Field(default=None, ge=1, le=448)
    # PostgreSQL parameters laid over the derived ones (name -> value), checked against PostgreSQL 15's catalog.
    parameters: dict[str, bool | int | float | str] = {}

    @field_validator("parameters")
    @classmethod
    def _known_parameters(cls, parameters: dict) -> dict:
        problems, checked = [], {}
        for name, value in parameters.items():
            canonical = pg_parameters.canonical_name(name)
            if name in pg_parameters.OWNED or canonical in pg_parameters.OWNED:
                problems.append((name, {name: value}, f"set by the program ({pg_parameters.OWNED[canonical or name]}); "
                                                      "it cannot be overridden"))
            elif canonical is None:
                close = difflib.get_close_matches(name.lower(), pg_parameters.SETTINGS, n=1)
                hint = f"; did you mean {close[0]}?" if close else "; see pg_settings"
                problems.append((name, {name: value}, f"not a PostgreSQL 15 parameter{hint}"))
            else:
                try:
                    checked[canonical] = pg_parameters.check_value(canonical, value)
                except pg_parameters.ParameterError as error:
                    problems.append((name, value, str(error)))
        if problems:
            raise ValidationError.from_exception_data("parameters", [
                InitErrorDetails(type=PydanticCustomError("parameter", message), loc=(name,), input=found)
                for name, found, message in problems])
        return checked

    @property
    def hardware(self) -> Hardware:
        """vCPUs and memory the parameters are derived for: memoryMiB and vcpus if set, else the instance table's."""
        known = INSTANCE_TYPES.get(self.instance_type)
        return Hardware(self.vcpus or known.vcpus, self.memory_mib or known.memory_mib)

    @model_validator(mode="after")
    def _hardware_known(self) -> PatroniSettings:
        known = INSTANCE_TYPES.get(self.instance_type)
        problems = []
        if (self.memory_mib is None) != (self.vcpus is None):
            given = {"memoryMiB": self.memory_mib, "vcpus": self.vcpus}
            problems.append(("memoryMiB" if self.memory_mib is None else "vcpus", given,
                             "patroni.memoryMiB and patroni.vcpus go together: set both"))
        elif known is None and self.memory_mib is None:
            families = sorted({name.split(".")[0] for name in INSTANCE_TYPES})
            problems.append(("instanceType", self.instance_type,
                             f"not in the instance table (infra/instance_types.py: {', '.join(families)}); add it there, or "
                             f"set patroni.memoryMiB and patroni.vcpus to tune PostgreSQL for it"))
        elif known is not None and self.memory_mib is not None and (
                self.memory_mib > known.memory_mib or self.vcpus > known.vcpus):
            problems.append(("memoryMiB", self.memory_mib,
                             f"memoryMiB {self.memory_mib} and vcpus {self.vcpus} must not exceed what {self.instance_type} has "
                             f"({known.memory_mib} MiB, {known.vcpus} vCPUs)"))
        if not problems and "shared_buffers" in self.parameters:
            shared = pg_parameters.memory_mib(self.parameters["shared_buffers"], "shared_buffers")
            if shared > self.hardware.memory_mib / 2:
                problems.append((("parameters", "shared_buffers"), self.parameters["shared_buffers"],
                                 f"at most half of the host's {self.hardware.memory_mib} MiB: the page cache, the backends "
                                 f"and autovacuum need the rest"))
        if problems:
            raise ValidationError.from_exception_data("patroni", [
                InitErrorDetails(type=PydanticCustomError("hardware", message),
                                 loc=where if isinstance(where, tuple) else (where,), input=found)
                for where, found, message in problems])
        return self

    @model_validator(mode="after")
    def _timing(self) -> PatroniSettings:
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError(
                f"loopWait + 2 * retryTimeout must be <= ttl (Patroni's rule); found "
                f"{self.loop_wait} + 2 * {self.retry_timeout} = {self.loop_wait + 2 * self.retry_timeout} > ttl {self.ttl}"
            )
        if self.synchronous_mode and self.nodes < 2:
            raise ValueError("synchronousMode needs at least 2 nodes")
        return self


class EtcdSettings(_Model):
    members: Literal[1, 3, 5]
    instance_type: InstanceType
    data_volume: VolumeSettings = VolumeSettings(size_gib=20)
    # etcd's tuning knobs (its tuning guide): heartbeat about the peers' round trip, the election
    # timeout several heartbeats; etcd itself refuses an election timeout under 5 heartbeats or over 50 s.
    heartbeat_interval_ms: int = Field(default=100, ge=10, le=5000)
    election_timeout_ms: int = Field(default=1500, ge=50, le=50000)

    @model_validator(mode="after")
    def _election(self) -> EtcdSettings:
        if self.election_timeout_ms < 5 * self.heartbeat_interval_ms:
            raise ValueError(
                f"electionTimeoutMs must be at least 5 x heartbeatIntervalMs (etcd refuses to start otherwise); "
                f"found {self.election_timeout_ms} < 5 x {self.heartbeat_interval_ms}"
            )
        return self


class RedisSettings(_Model):
    node_type: Annotated[str, Field(pattern=r"^cache\.[a-z0-9]+\.[a-z0-9]+$")]
    num_cache_clusters: int = Field(ge=1, le=6)
    multi_az: bool = False
    engine_version: Annotated[str, Field(pattern=r"^[67]\.\d+$")] = "7.1"
    maxmemory_policy: Literal[
        "volatile-lru", "allkeys-lru", "volatile-lfu", "allkeys-lfu", "volatile-random",
        "allkeys-random", "volatile-ttl", "noeviction",
    ] = "allkeys-lru"

    @model_validator(mode="after")
    def _failover_needs_replica(self) -> RedisSettings:
        if self.multi_az and self.num_cache_clusters < 2:
            raise ValueError(f"multiAz needs numCacheClusters >= 2 (a primary and a replica); found {self.num_cache_clusters}")
        return self


class ClickHouseSettings(_Model):
    instance_type: InstanceType
    data_volume: VolumeSettings


class PrometheusSettings(_Model):
    replicas: int = Field(default=1, ge=1, le=3)
    instance_type: InstanceType
    volume: VolumeSettings = VolumeSettings(size_gib=MIN_PROMETHEUS_VOLUME_GIB)
    retention_time: Duration = MIN_PROMETHEUS_RETENTION
    retention_size: PrometheusSize = "42GB"
    scrape_interval: Duration = "15s"
    evaluation_interval: Duration = "15s"

    @field_validator("volume")
    @classmethod
    def _volume_meets_requirement(cls, volume: VolumeSettings) -> VolumeSettings:
        if volume.size_gib < MIN_PROMETHEUS_VOLUME_GIB:
            raise ValueError(f"Prometheus needs a volume of at least {MIN_PROMETHEUS_VOLUME_GIB} GiB; found {volume.size_gib}")
        return volume

    @field_validator("retention_time")
    @classmethod
    def _retention_meets_requirement(cls, value: str) -> str:
        if duration_seconds(value) < duration_seconds(MIN_PROMETHEUS_RETENTION):
            raise ValueError(f"must keep at least {MIN_PROMETHEUS_RETENTION}; found {value}")
        return value

    @field_validator("scrape_interval", "evaluation_interval")
    @classmethod
    def _sane_interval(cls, value: str) -> str:
        if not 1 <= duration_seconds(value) <= 300:
            raise ValueError(f"must be between 1s and 5m; found {value}")
        return value

    @model_validator(mode="after")
    def _size_retention_fits_volume(self) -> PrometheusSettings:
        limit = int(self.volume.size_gib * MAX_RETENTION_SIZE_SHARE)
        if size_bytes(self.retention_size) > limit * GIB:
            raise ValueError(
                f"retentionSize {self.retention_size} (Prometheus reads GB as GiB) leaves no room for the WAL on a "
                f"{self.volume.size_gib} GiB volume; allowed at most {limit}GB ({MAX_RETENTION_SIZE_SHARE:.0%})"
            )
        return self


class GrafanaSettings(_Model):
    instance_type: InstanceType


class ManagedPrometheusSettings(_Model):
    """An Amazon Managed Service for Prometheus workspace every Prometheus remote-writes to (README, Monitoring)."""

    enabled: StrictBool = False
    # aggregates: only the recording rules' series (names with a colon: sli:..., slo:...); all: every series.
    send: Literal["aggregates", "all"] = "aggregates"


class MonitoringSettings(_Model):
    prometheus: PrometheusSettings
    grafana: GrafanaSettings
    managed_prometheus: ManagedPrometheusSettings = ManagedPrometheusSettings()


class AlertingSettings(_Model):
    email_to: Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
    email_from: Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
    smtp_smarthost: Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]+:\d+$")]
    # With a username, Alertmanager logs in (SES needs it); the password is the smtpAuthPassword secret.
    smtp_auth_username: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    slack_critical_channel: Annotated[str, Field(pattern=r"^#[a-z0-9_-]+$")] = "#alerts-critical"
    slack_warnings_channel: Annotated[str, Field(pattern=r"^#[a-z0-9_-]+$")] = "#alerts-warnings"


class BackupSettings(_Model):
    verification_retention_days: int = Field(default=MIN_VERIFICATION_RETENTION_DAYS, ge=MIN_VERIFICATION_RETENTION_DAYS, le=3650)
    audit_retention_years: int = Field(default=MIN_AUDIT_RETENTION_YEARS, ge=MIN_AUDIT_RETENTION_YEARS, le=100)
    archive_transition_days: int = Field(default=30, ge=1, le=3650)
    # A full backup on this day, a differential on every other day, both at backup_time (UTC).
    full_backup_day: Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"] = "Sun"
    backup_time: str = "02:00"
    # Days of point-in-time recovery pgBackRest keeps (time-based retention: the backups and WAL it needs).
    retention_days: int = Field(default=14, ge=MIN_BACKUP_RETENTION_DAYS, le=3650)
    # WAL pgBackRest may queue while the repository is unreachable; beyond it, it drops segments so pg_wal
    # cannot fill the data volume (point-in-time recovery then has a gap until the next backup).
    archive_push_queue_max_gib: int = Field(default=4, ge=1, le=1024, alias="archivePushQueueMaxGiB")

    @field_validator("backup_time")
    @classmethod
    def _time_of_day(cls, value: str) -> str:
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
            raise ValueError(f"must be a UTC time of day as HH:MM (00:00 to 23:59); found {value!r}")
        return value

    @property
    def differential_days(self) -> tuple[str, ...]:
        return tuple(day for day in WEEKDAYS if day != self.full_backup_day)

    # The second copy: the backup and audit buckets replicate to buckets in this region (required in prod).
    replica_region: str | None = None

    @field_validator("replica_region")
    @classmethod
    def _real_region(cls, value: str | None) -> str | None:
        if value is not None and value not in AWS_REGIONS:
            raise ValueError(f"not an AWS region; allowed: {', '.join(sorted(AWS_REGIONS))}")
        return value


# An unquoted PostgreSQL identifier as the catalog stores it (lower case, at most 63 bytes).
_SQL_NAME = r"[a-z_][a-z0-9_$]{0,62}"


class AuditSettings(_Model):
    """pgaudit: DDL and role changes always; writes to these tables through pgaudit's object audit role."""

    database: Annotated[str, Field(pattern=rf"^{_SQL_NAME}$")] = "postgres"
    tables: tuple[Annotated[str, Field(pattern=rf"^{_SQL_NAME}\.{_SQL_NAME}$")], ...] = ()

    @field_validator("tables")
    @classmethod
    def _distinct(cls, tables: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({t for t in tables if tables.count(t) > 1})
        if repeated:
            raise ValueError(f"names a table more than once: {repeated}")
        return tables


# CloudWatch Logs accepts only these retention periods (PutRetentionPolicy).
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653)
# An IAM role name (IAM's own rule: letters, digits and +=,.@_-, at most 64).
_ROLE_NAME = r"[A-Za-z0-9+=,.@_-]{1,64}"


class SecuritySettings(_Model):
    """Account-level controls: who administers the KMS keys, how long VPC flow logs are kept."""

    # IAM roles (names, in the stack's account) that administer the KMS keys: only they may change a key's
    # policy, disable it or schedule its deletion; they may not decrypt backups or audit logs (the data key they use
    # through EC2, SSM and S3 when `pulumi up` creates volumes, secrets and bundles). `pulumi up` must run as one
    # (KMS refuses a key policy that would lock its own author out).
    key_administrator_roles: tuple[Annotated[str, Field(pattern=rf"^{_ROLE_NAME}$")], ...] = Field(
        default=("betting-platform-key-admin",), min_length=1)
    flow_log_retention_days: int = 365

    @field_validator("flow_log_retention_days")
    @classmethod
    def _cloudwatch_retention(cls, value: int) -> int:
        if value not in LOG_RETENTION_DAYS:
            raise ValueError(f"CloudWatch Logs keeps logs only for one of {', '.join(map(str, LOG_RETENTION_DAYS))} days; "
                             f"found {value}")
        return value


# The months of daily SLO aggregates kept (infra/aggregates.py): the requirements keep aggregated metrics 1 year.
MIN_AGGREGATE_MONTHS = 12
# The databases PostgreSQL itself uses: the aggregates' database revokes PUBLIC's CONNECT, so it must be its own.
_SYSTEM_DATABASES = ("postgres", "template0", "template1")


class AggregatesSettings(_Model):
    """The daily SLO aggregates (scripts/aggregate_metrics.py): a database of their own on the Patroni cluster."""

    database: Annotated[str, Field(pattern=rf"^{_SQL_NAME}$")] = "metrics"
    # Whole months kept before the current one; the job drops older monthly partitions.
    months_kept: int = Field(default=MIN_AGGREGATE_MONTHS, ge=MIN_AGGREGATE_MONTHS, le=120)

    @field_validator("database")
    @classmethod
    def _own_database(cls, database: str) -> str:
        if database in _SYSTEM_DATABASES:
            raise ValueError(f"must be a database of its own, not {database!r} (its CONNECT is revoked from PUBLIC)")
        return database


# The aggregates' database in PgBouncer: one writer a day needs a small pool of its own (and its login's connection).
AGGREGATES_POOL_SIZE = 2


# PgBouncer logs in with the auth role (auth_user) through each database's own pool to run its auth_query:
# that connection counts against the database's limit, so every pooled database keeps one for it.
AUTH_CONNECTIONS_PER_DATABASE = 1


class ClientPathSettings(_Model):
    """The client path on every PostgreSQL node: HAProxy's writer and reader ports in front of PgBouncer,
    which pools in front of PostgreSQL (transaction pooling)."""

    # The databases PgBouncer pools; a client of another database is refused. Each gets its own limit,
    # so the total of server connections is known (PgBouncer 1.18 has no limit across databases).
    databases: tuple[Annotated[str, Field(pattern=rf"^{_SQL_NAME}$")], ...] = ("postgres",)
    # Server connections each database's pool may hold open on a node (PgBouncer's default_pool_size).
    pool_size: int = Field(default=20, ge=1, le=5000)
    # Client connections each node's PgBouncer accepts (max_client_conn); HAProxy on each node takes its share.
    max_client_connections: int = Field(default=1000, ge=10, le=50000)
    # PostgreSQL connections kept outside the pools: Patroni, the exporters, the backup job, the agent,
    # pgBackRest, operators (and superuser_reserved_connections' 3).
    reserved_connections: int = Field(default=20, ge=10, le=1000)
    # A replica further behind the leader than this (bytes of WAL, Patroni's /replica?lag=) leaves the reader port.
    reader_max_lag_bytes: int = Field(default=16 * 1024 * 1024, ge=0)

    @field_validator("databases")
    @classmethod
    def _distinct_databases(cls, databases: tuple[str, ...]) -> tuple[str, ...]:
        if not databases:
            raise ValueError("must name at least one database (the application's): PgBouncer pools only these")
        repeated = sorted({d for d in databases if databases.count(d) > 1})
        if repeated:
            raise ValueError(f"names a database more than once: {repeated}")
        return databases

    @property
    def server_connections(self) -> int:
        """PostgreSQL connections PgBouncer may open on a node, at most: every pool full, plus its logins (the
        aggregates' database's small pool included)."""
        return (len(self.databases) * (self.pool_size + AUTH_CONNECTIONS_PER_DATABASE)
                + AGGREGATES_POOL_SIZE + AUTH_CONNECTIONS_PER_DATABASE)


class ImageSettings(_Model):
    """The pinned image every host of the stack boots from; a change is rolled host by host (`infra roll`)."""

    ami_id: Annotated[str, Field(pattern=r"^ami-([0-9a-f]{8}|[0-9a-f]{17})$")]
    # The image's name as Debian publishes it (debian-12-amd64-YYYYMMDD-NNNN): checked at deploy time.
    name: Annotated[str, Field(pattern=r"^debian-12-amd64-\d{8}-\d+$")]


class ApplicationSettings(_Model):
    metrics_targets: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]+:\d{1,5}$")], ...] = ()


class StackSettings(_Model):
    stack: str
    environment: Literal["dev", "staging", "prod"]
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")]
    availability_zones: tuple[str, ...] = Field(min_length=1, max_length=6)
    vpc_cidr: str = "10.40.0.0/16"
    dns_zone: Annotated[str, Field(pattern=r"^([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}$")]
    patroni: PatroniSettings
    etcd: EtcdSettings
    redis: RedisSettings
    clickhouse: ClickHouseSettings
    monitoring: MonitoringSettings
    alerting: AlertingSettings
    image: ImageSettings
    # Set only by `infra roll` for one targeted `pulumi up`: the host whose image may change now.
    roll_host: str = ""
    backups: BackupSettings = BackupSettings()
    audit: AuditSettings = AuditSettings()
    aggregates: AggregatesSettings = AggregatesSettings()
    client_path: ClientPathSettings = ClientPathSettings()
    application: ApplicationSettings = ApplicationSettings()
    security: SecuritySettings = SecuritySettings()
    tags: dict[str, str] = {}

    @field_validator("vpc_cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        try:
            network = ipaddress.IPv4Network(value)
        except ValueError as error:
            raise ValueError(f"not an IPv4 CIDR ({error})") from None
        if not 16 <= network.prefixlen <= 24:
            raise ValueError(f"prefix must be /16 to /24; found /{network.prefixlen}")
        return value

    @model_validator(mode="after")
    def _zones(self) -> StackSettings:
        if len(set(self.availability_zones)) != len(self.availability_zones):
            raise ValueError(f"availabilityZones repeats a zone: {list(self.availability_zones)}")
        foreign = [az for az in self.availability_zones if not re.fullmatch(re.escape(self.region) + r"[a-z]", az)]
        if foreign:
            raise ValueError(f"availabilityZones {foreign} are not zones of region {self.region}")
        if self.backups.replica_region == self.region:
            raise ValueError(f"backups.replicaRegion must be another region than the stack's own ({self.region}); "
                             f"found {self.backups.replica_region}")
        if self.environment == "prod":
            problems = []
            if len(self.availability_zones) < 3:
                problems.append(f"prod needs 3 availabilityZones; found {len(self.availability_zones)}")
            if self.patroni.nodes < 3:
                problems.append(f"prod needs patroni.nodes >= 3; found {self.patroni.nodes}")
            if self.etcd.members < 3:
                problems.append(f"prod needs etcd.members >= 3; found {self.etcd.members}")
            if not self.patroni.synchronous_mode:
                problems.append("prod needs patroni.synchronousMode: true (no acknowledged write lost on failover)")
            if self.backups.replica_region is None:
                problems.append("prod needs backups.replicaRegion: the backups' second copy, in another AWS region")
            if problems:
                raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _archive_queue_fits_volume(self) -> StackSettings:
        limit = int(self.patroni.data_volume.size_gib * MAX_ARCHIVE_QUEUE_SHARE)
        if self.backups.archive_push_queue_max_gib > limit:
            raise ValueError(
                f"backups.archivePushQueueMaxGiB {self.backups.archive_push_queue_max_gib} would let queued WAL take more "
                f"than {MAX_ARCHIVE_QUEUE_SHARE:.0%} of the {self.patroni.data_volume.size_gib} GiB data volume; "
                f"allowed at most {limit}")
        return self

    @model_validator(mode="after")
    def _pools_fit_max_connections(self) -> StackSettings:
        pool, limit = self.client_path, self.patroni.max_connections - self.client_path.reserved_connections
        if pool.server_connections > limit:
            raise ValueError(
                f"clientPath: {len(pool.databases)} pooled database(s) x (poolSize {pool.pool_size} + "
                f"{AUTH_CONNECTIONS_PER_DATABASE} for logins) + {AGGREGATES_POOL_SIZE + AUTH_CONNECTIONS_PER_DATABASE} for "
                f"aggregates.database = {pool.server_connections} server connections exceed "
                f"patroni.maxConnections {self.patroni.max_connections} - clientPath.reservedConnections "
                f"{pool.reserved_connections} = {limit}")
        return self

    @model_validator(mode="after")
    def _aggregates_database_is_its_own(self) -> StackSettings:
        database = self.aggregates.database
        if database in self.client_path.databases or database == self.audit.database:
            raise ValueError(f"aggregates.database {database!r} must be a database of its own, not one of "
                             f"clientPath.databases or audit.database (its CONNECT is revoked from PUBLIC)")
        return self

    @property
    def subnet_cidrs(self) -> tuple[str, ...]:
        """One private subnet per AZ: the VPC split in 4 (room for up to 4 AZs) or 8 beyond that."""
        network = ipaddress.IPv4Network(self.vpc_cidr)
        extra_bits = 2 if len(self.availability_zones) <= 4 else 3
        return tuple(str(s) for s in list(network.subnets(prefixlen_diff=extra_bits))[: len(self.availability_zones)])


# Keys the stack config may hold in the project namespace (camelCase, as written in stacks/).
_SETTING_KEYS = {field.alias or name for name, field in StackSettings.model_fields.items()} - {"stack", "region"}


def _decode(value: Any) -> Any:
    """The engine passes every config value as a string; structured values are JSON inside it."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _describe(error: dict[str, Any]) -> str:
    location = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
    if location and location[0] == "region":
        key = "aws:region"
    else:
        key = f"{PROJECT}:" + ".".join(location) if location else f"{PROJECT} config"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{key}: missing; set it in the stack file"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown setting (found {error['input']!r}); see the settings table in README.md"
    found = error.get("input")
    shown = "" if isinstance(found, dict) or "found" in message else f" (found {found!r})"
    return f"{key}: {message}{shown}"


def load_settings(config: Mapping[str, Any], stack: str) -> StackSettings:
    """Validate a stack's raw config; raise SettingsError naming every bad key."""
    prefix = f"{PROJECT}:"
    problems: list[str] = []
    values: dict[str, Any] = {"stack": stack}
    if "aws:region" in config:
        values["region"] = config["aws:region"]
    for full_key, raw in sorted(config.items()):
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        if key in SECRET_KEYS or key in OPTIONAL_SECRET_KEYS:
            continue
        if key not in _SETTING_KEYS:
            allowed = sorted(_SETTING_KEYS | set(SECRET_KEYS) | set(OPTIONAL_SECRET_KEYS))
            problems.append(f"{full_key}: unknown setting; allowed: {', '.join(allowed)}")
            continue
        values[key] = _decode(raw) if key not in ("environment", "dnsZone", "vpcCidr") else raw
    environment = values.get("environment")
    if environment is not None and environment not in ENVIRONMENTS:
        problems.append(f"{prefix}environment: unknown environment {environment!r}; allowed: {', '.join(ENVIRONMENTS)}")
    if problems:
        raise SettingsError(stack, problems)
    try:
        return StackSettings.model_validate(values)
    except ValidationError as error:
        raise SettingsError(stack, [_describe(e) for e in error.errors()]) from None
