"""The live tests' loopback ports. Each module keeps its own fixed range (named in the module); this offset moves
every range at once, so a second checkout (or a parallel run) can run the live tests beside this one:
BETTING_TEST_PORT_OFFSET=-10000 uses 15000-19999 instead of 25000-29999. Keep results below 32768, Linux's
first ephemeral port, so no outgoing connection takes a port a test is about to listen on."""

from __future__ import annotations

import os

OFFSET = int(os.environ.get("BETTING_TEST_PORT_OFFSET", "0"))


def port(number: int) -> int:
    return number + OFFSET
