"""redis.conf for targets that run Redis themselves (the sandbox); on AWS Redis is ElastiCache."""

from __future__ import annotations

from infra.settings import StackSettings
from infra.topology import Ports, Topology

MIB = 1024**2
# Memory of the ElastiCache node types the stacks use; maxmemory mirrors ElastiCache's
# default reserved-memory share (25 %) so the eviction point is the same on both targets.
NODE_MEMORY_MIB = {
    "cache.t4g.micro": 512,
    "cache.t4g.small": 1370,
    "cache.t4g.medium": 3164,
    "cache.r6g.large": 13383,
    "cache.r6g.xlarge": 26911,
}
DEFAULT_MEMORY_MIB = 1024
REDIS_DATA_DIR = "/var/lib/redis"


def redis_directives(settings: StackSettings, topology: Topology) -> list[tuple[str, str]]:
    memory_mib = NODE_MEMORY_MIB.get(settings.redis.node_type, DEFAULT_MEMORY_MIB)
    return [
        ("bind", "0.0.0.0"),
        ("port", str(Ports.REDIS)),
        ("protected-mode", "yes"),
        ("tcp-keepalive", "60"),
        ("timeout", "0"),
        ("daemonize", "no"),
        ("supervised", "no"),
        ("loglevel", "notice"),
        ("logfile", '""'),
        ("databases", "16"),
        ("maxmemory", f"{memory_mib * 3 // 4}mb"),
        ("maxmemory-policy", settings.redis.maxmemory_policy),
        ("maxclients", "10000"),
        # A cache: no RDB snapshots; AOF off, like ElastiCache's default.
        ("save", '""'),
        ("appendonly", "no"),
        ("dir", REDIS_DATA_DIR),
        ("latency-monitor-threshold", "100"),
        ("slowlog-log-slower-than", "10000"),
    ]


def render_redis(settings: StackSettings, topology: Topology) -> dict[str, bytes]:
    text = "".join(f"{key} {value}\n" for key, value in redis_directives(settings, topology))
    return {"redis/redis.conf": text.encode()}
