"""The live tests' loopback ports. Each module keeps its own fixed range (named in the module); this offset moves
every range at once, so a second checkout (or a parallel run) can run the live tests beside this one:
BETTING_TEST_PORT_OFFSET=-10000 uses 15000-19999 instead of 25000-29999. Keep results below 32768, Linux's
first ephemeral port, so no outgoing connection takes a port a test is about to listen on."""

from __future__ import annotations

import os

# pytest-xdist's workers (make test runs two): gw0 keeps the ranges, gw1 moves them 5000 down, so the modules that
# pick free ports at random inside a shared range (tests/monitoring/harness.py) never race each other.
WORKER_SPACING = 5000
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
OFFSET = int(os.environ.get("BETTING_TEST_PORT_OFFSET", "0")) - WORKER_SPACING * int(_worker.removeprefix("gw") or 0)


def port(number: int) -> int:
    return number + OFFSET
