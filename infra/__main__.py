"""Entry point for `pulumi up` / `pulumi preview` (Pulumi.yaml: main: infra/)."""

import sys
from pathlib import Path

# The language host runs this folder as a script; make the `infra` package importable from the project root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.program import run  # noqa: E402

run()
