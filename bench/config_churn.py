#!/usr/bin/env python3
"""Configuration changes for bench/run.sh (P6 file part, P9). Loopback only, bounded in time.

  config_churn.py churn DIR BACKEND_URL SECONDS INTERVAL_MS
      Rewrites DIR/routes.yaml every INTERVAL_MS for SECONDS, each time changing the route that
      the load hits (`/churn`: its request timeout) and a second route (its path), by writing a
      temporary file and renaming it into place, as editors and `kubectl cp`-style tools do.

  config_churn.py reload-latency DIR BACKEND_URL GATEWAY_HOST:PORT CHANGES
      CHANGES times: writes a file with a new route `/p6-<n>`, then polls the gateway until that
      path answers 200; prints each change-to-traffic time and p50/p99.
"""

import http.client
import os
import sys
import time

ROUTE = """apiVersion: tollgate.dev/v1alpha1
kind: AgentRoute
metadata:
  name: {name}
  namespace: bench
spec:
  match:
    pathPrefix: {prefix}
  auth:
    required: false
  timeouts:
    request: {timeout_ms}ms
  backends:
    - url: {backend}
"""


def write_atomic(path, text):
    # A dot-file is never read as configuration, so the half-written temporary is invisible.
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def churn(directory, backend, seconds, interval_ms):
    path = os.path.join(directory, "routes.yaml")
    end = time.monotonic() + seconds
    n = 0
    next_at = time.monotonic()
    while time.monotonic() < end:
        text = ROUTE.format(
            name="churn", prefix="/churn", timeout_ms=30000 + n % 1000, backend=backend
        )
        text += "---\n" + ROUTE.format(
            name="other", prefix="/other-%d" % (n % 1000), timeout_ms=30000, backend=backend
        )
        write_atomic(path, text)
        n += 1
        next_at += interval_ms / 1000.0
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print("CHURN changes=%d seconds=%.1f" % (n, seconds))


def status_of(conn, path):
    conn.request("GET", path, headers={"Host": "bench.local"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def reload_latency(directory, backend, gateway, changes):
    host, port = gateway.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    times = []
    for n in range(changes):
        path = os.path.join(directory, "p6.yaml")
        prefix = "/p6-%d" % n
        text = ROUTE.format(name="p6", prefix=prefix, timeout_ms=30000, backend=backend)
        started = time.monotonic()
        write_atomic(path, text)
        deadline = started + 5.0
        served = False
        while time.monotonic() < deadline:
            try:
                if status_of(conn, prefix + "/") == 200:
                    served = True
                    break
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=5)
            time.sleep(0.001)
        elapsed_ms = (time.monotonic() - started) * 1000.0
        times.append(elapsed_ms if served else float("inf"))
        time.sleep(0.1)
    ok = sorted(t for t in times if t != float("inf"))
    failed = len(times) - len(ok)

    def pct(p):
        if not ok:
            return float("nan")
        return ok[min(len(ok) - 1, round((len(ok) - 1) * p))]

    print(
        "RELOAD changes=%d served=%d not_served_within_5s=%d p50_ms=%.1f p99_ms=%.1f max_ms=%.1f"
        % (len(times), len(ok), failed, pct(0.5), pct(0.99), ok[-1] if ok else float("nan"))
    )


def main():
    if len(sys.argv) >= 6 and sys.argv[1] == "churn":
        churn(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    elif len(sys.argv) >= 6 and sys.argv[1] == "reload-latency":
        reload_latency(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
