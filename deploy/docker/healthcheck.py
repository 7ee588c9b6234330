"""Container health check: exit 0 when the service answers ``GET /healthz`` with 200.

The slim Python image has neither curl nor wget, and the interpreter is already
there, so the image runs this file. It asks the loopback address on ``PORT``, the
same variable the service binds to, so one image recipe serves every service.

Liveness on purpose, not readiness: a container whose database is away is still
healthy. Restarting it would not bring the database back, and ``/readyz`` is what
a load balancer or Kubernetes uses to stop sending it traffic.
"""

from __future__ import annotations

import http.client
import os
import sys

DEFAULT_PORT = 8080
TIMEOUT_SECONDS = 2.0


def check(port: int, path: str = "/healthz", timeout: float = TIMEOUT_SECONDS) -> str:
    """An empty string when healthy, otherwise what went wrong."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "notiflow-healthcheck"})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return f"GET {path} on port {port} failed: {exc}"
    finally:
        conn.close()
    if status != 200:
        return f"GET {path} on port {port} answered {status}"
    return ""


def main() -> int:
    port = int(os.environ.get("PORT", DEFAULT_PORT))
    path = os.environ.get("HEALTHCHECK_PATH", "/healthz")
    problem = check(port, path)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
