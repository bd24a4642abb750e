import sys

from sidecar.cli import main

raise SystemExit(main(["control-plane", *sys.argv[1:]]))
