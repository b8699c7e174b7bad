"""The EC2 instance types the stacks may use: vCPUs and memory, as AWS lists them (pure data).

PostgreSQL's memory, worker and vacuum parameters are derived from these figures
(infra/render/tuning.py). A type that is not here needs explicit `patroni.memoryMiB` and
`patroni.vcpus` in the stack file (infra/settings.py says so).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    vcpus: int
    memory_mib: int

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


def _family(name: str, sizes: dict[str, tuple[int, float]]) -> dict[str, Hardware]:
    return {f"{name}.{size}": Hardware(vcpus, int(gib * 1024)) for size, (vcpus, gib) in sizes.items()}


# Burstable: 2 vCPUs up to large; credits limit sustained CPU, which the figures do not show.
_T3 = {"nano": (2, 0.5), "micro": (2, 1), "small": (2, 2), "medium": (2, 4), "large": (2, 8), "xlarge": (4, 16),
       "2xlarge": (8, 32)}
# General purpose, 4 GiB per vCPU.
_M6I = {"large": (2, 8), "xlarge": (4, 16), "2xlarge": (8, 32), "4xlarge": (16, 64), "8xlarge": (32, 128),
        "12xlarge": (48, 192), "16xlarge": (64, 256), "24xlarge": (96, 384), "32xlarge": (128, 512)}
_M7I = {"large": (2, 8), "xlarge": (4, 16), "2xlarge": (8, 32), "4xlarge": (16, 64), "8xlarge": (32, 128),
        "12xlarge": (48, 192), "16xlarge": (64, 256), "24xlarge": (96, 384), "48xlarge": (192, 768)}
# Memory optimised, 8 GiB per vCPU: the PostgreSQL hosts of staging and prod.
_R6I = {"large": (2, 16), "xlarge": (4, 32), "2xlarge": (8, 64), "4xlarge": (16, 128), "8xlarge": (32, 256),
        "12xlarge": (48, 384), "16xlarge": (64, 512), "24xlarge": (96, 768), "32xlarge": (128, 1024)}
_R7I = {"large": (2, 16), "xlarge": (4, 32), "2xlarge": (8, 64), "4xlarge": (16, 128), "8xlarge": (32, 256),
        "12xlarge": (48, 384), "16xlarge": (64, 512), "24xlarge": (96, 768), "48xlarge": (192, 1536)}

INSTANCE_TYPES: dict[str, Hardware] = {
    **_family("t3", _T3), **_family("m6i", _M6I), **_family("m7i", _M7I), **_family("r6i", _R6I), **_family("r7i", _R7I),
}


def hardware(instance_type: str) -> Hardware | None:
    return INSTANCE_TYPES.get(instance_type)
