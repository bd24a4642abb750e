"""The image's HEALTHCHECK: GET $HEALTHCHECK_URL (default the sidecar's admin /ready);
exit 0 when it answers 200, else 1. Standard library only: it runs every few seconds."""

import os
import sys
import urllib.request

URL = os.environ.get("HEALTHCHECK_URL", "http://127.0.0.1:15090/ready")

try:
    with urllib.request.urlopen(URL, timeout=2) as response:  # noqa: S310 - a fixed local http URL
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"not healthy: {URL}: {exc}", file=sys.stderr)
    sys.exit(1)
