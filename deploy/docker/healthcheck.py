"""Container health check: exit 0 when the gateway's /health answers 200 (liveness, not readiness).

The port is $TRISTAGE_PORT (default 8000), the address loopback: the check runs inside the container.
"""

import os
import sys
import urllib.request

PORT = int(os.environ.get("TRISTAGE_PORT", "8000"))
TIMEOUT_S = 4.0


def main() -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
