import sys

from infra.sandbox.cli import main

sys.exit(main(sys.argv[1:]))
