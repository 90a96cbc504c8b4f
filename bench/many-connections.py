#!/usr/bin/env python3
"""R8: 10,000 concurrent keep-alive connections held by a running gateway, then closed.

Starts `tollgate standalone` (with a raised file-descriptor limit) in front of a small asyncio
backend, opens N keep-alive connections, sends one request on each (answered 200 through the
backend), holds them all open, then closes them; three rounds by default. Prints the gateway's
RSS (VmRSS) and open file descriptors (/proc/PID/fd, less its pooled connections to the backend)
before, while held and after closing, and exits nonzero if a request failed, a connection was
dropped while held, the descriptors do not return to the baseline (within +-10) within 5 s of
closing, or the last round needed over 10 % more memory than the one before (memory must level
off: the allocator keeps freed pages, so RSS settles near a peak instead of falling back).

Python 3.11 standard library only. Not part of `cargo test`:

    cargo build --release && bench/many-connections.py            # 10,000 connections
    bench/many-connections.py --connections 2000 --binary target/debug/tollgate
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FD_LIMIT = 65536


def raise_nofile(target: int = FD_LIMIT) -> int:
    """Raises this process's RLIMIT_NOFILE as far as allowed; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (max(target, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, want), want))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pid: int) -> tuple[int, int]:
    """RSS in KiB, and descriptors other than pooled upstream connections."""
    return rss_kib(pid), fds(pid) - UPSTREAM_OPEN


# ---- the backend -----------------------------------------------------------------------------

# Connections the gateway holds open to the backend (its upstream pool): counted here so they
# can be told apart from client connections in the gateway's descriptor count.
UPSTREAM_OPEN = 0


async def backend_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global UPSTREAM_OPEN
    UPSTREAM_OPEN += 1
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    except asyncio.CancelledError:
        pass  # the run is over; the gateway's pooled upstream connections are still open
    finally:
        UPSTREAM_OPEN -= 1
        writer.close()


# ---- the client ------------------------------------------------------------------------------

REQUEST = b"GET /echo HTTP/1.1\r\nHost: gw\r\n\r\n"


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            await reader.readexactly(int(value.strip()))
    return status


async def open_one(port: int, sem: asyncio.Semaphore):
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        await writer.drain()
        status = await asyncio.wait_for(read_response(reader), 30)
        return reader, writer, status


async def still_open(reader: asyncio.StreamReader) -> bool:
    """True unless the gateway closed the connection (EOF) while it was held."""
    try:
        data = await asyncio.wait_for(reader.read(1), 0.001)
    except asyncio.TimeoutError:
        return True
    except ConnectionError:
        return False
    return data != b""


async def run(args: argparse.Namespace) -> int:
    limit = raise_nofile()
    if limit < args.connections + 1000:
        print(f"RLIMIT_NOFILE is {limit}; need {args.connections + 1000}", file=sys.stderr)
        return 2

    backend = await asyncio.start_server(backend_conn, "127.0.0.1", 0, backlog=4096)
    backend_port = backend.sockets[0].getsockname()[1]

    workdir = Path(tempfile.mkdtemp(prefix="tollgate-r8-"))
    (workdir / "config.yaml").write_text(
        "apiVersion: tollgate.dev/v1alpha1\nkind: AgentRoute\n"
        "metadata: {name: echo, namespace: default}\n"
        "spec:\n  match: {pathPrefix: /echo}\n  auth: {required: false}\n"
        f"  backends: [{{url: \"http://127.0.0.1:{backend_port}\"}}]\n"
    )
    log_path = workdir / "gateway.log"
    log = open(log_path, "wb")

    def child_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    # The header read timeout also closes idle keep-alive connections; hold them longer than
    # this run lasts.
    cmd = [
        args.binary, "standalone", "--config", str(workdir / "config.yaml"),
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json",
        "--header-read-timeout", "600s", "--workers", str(args.workers),
    ]
    gw = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_limits)
    try:
        port = None
        for _ in range(500):
            for line in log_path.read_text(errors="replace").splitlines():
                try:
                    v = json.loads(line)
                except ValueError:
                    continue
                if v.get("message") == "gateway listening":
                    port = int(v["listen"].rsplit(":", 1)[1])
            if port or gw.poll() is not None:
                break
            await asyncio.sleep(0.02)
        if not port:
            print(f"the gateway did not start:\n{log_path.read_text()}", file=sys.stderr)
            return 2
        pid = gw.pid
        print(f"gateway pid {pid} on 127.0.0.1:{port} ({args.binary}), fd limit {limit}")

        sem = asyncio.Semaphore(args.concurrency)
        # Warm up: the upstream pool and the allocator reach their steady state.
        warm = await asyncio.gather(*(open_one(port, sem) for _ in range(args.concurrency)))
        for _, w, _ in warm:
            w.close()
        await asyncio.sleep(1.0)
        base_rss, base_fds = sample(pid)
        print(f"baseline     RSS {base_rss / 1024:8.1f} MiB   fds {base_fds:6d}   (+{UPSTREAM_OPEN} pooled upstream connections, not counted)")

        failed = False
        prev_held_rss = None
        for round_no in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"-- round {round_no} of {args.rounds}")
            started = time.monotonic()
            results = await asyncio.gather(
                *(open_one(port, sem) for _ in range(args.connections)), return_exceptions=True
            )
            conns = [r for r in results if not isinstance(r, BaseException)]
            errors = [r for r in results if isinstance(r, BaseException)]
            not_ok = sum(1 for _, _, s in conns if s != 200)
            opened_in = time.monotonic() - started
            held_rss, held_fds = sample(pid)
            print(
                f"held {len(conns):5d}   RSS {held_rss / 1024:8.1f} MiB   fds {held_fds:6d}   "
                f"(opened and answered in {opened_in:.1f} s; {len(errors)} failed, {not_ok} not 200)"
            )
            per_conn = (held_rss - base_rss) * 1024 / max(len(conns), 1)
            print(f"             +{(held_rss - base_rss) / 1024:.1f} MiB over the baseline: {per_conn:.0f} bytes per held connection")

            await asyncio.sleep(args.hold)
            alive = await asyncio.gather(*(still_open(r) for r, _, _ in conns))
            dropped = alive.count(False)
            hold_rss, hold_fds = sample(pid)
            print(f"held {args.hold:.0f} s     RSS {hold_rss / 1024:8.1f} MiB   fds {hold_fds:6d}   ({dropped} dropped by the gateway)")

            for _, w, _ in conns:
                w.close()
            await asyncio.gather(*(w.wait_closed() for _, w, _ in conns), return_exceptions=True)
            closed_at = time.monotonic()
            after_rss, after_fds = sample(pid)
            while abs(after_fds - base_fds) > 10 and time.monotonic() - closed_at < 5:
                await asyncio.sleep(0.1)
                after_rss, after_fds = sample(pid)
            took = time.monotonic() - closed_at
            print(f"closed       RSS {after_rss / 1024:8.1f} MiB   fds {after_fds:6d}   ({took:.1f} s after closing)")

            if errors or not_ok:
                print(f"FAIL: {len(errors)} connections failed ({errors[:3]}), {not_ok} answers not 200")
                failed = True
            if dropped:
                print(f"FAIL: the gateway dropped {dropped} held connections")
                failed = True
            if held_fds < base_fds + len(conns) - 10:
                print(f"FAIL: only {held_fds - base_fds} descriptors for {len(conns)} held connections")
                failed = True
            if abs(after_fds - base_fds) > 10:
                print(f"FAIL: descriptors did not return to the baseline: {after_fds} vs {base_fds}")
                failed = True
            # Memory levels off: a round reuses what the rounds before it took.
            if round_no == args.rounds and prev_held_rss and held_rss > prev_held_rss * 1.10:
                print(f"FAIL: the last round held {held_rss / 1024:.1f} MiB, the one before {prev_held_rss / 1024:.1f} MiB")
                failed = True
            prev_held_rss = held_rss
        if gw.poll() is not None:
            print(f"FAIL: the gateway exited ({gw.returncode})")
            failed = True
        print("FAIL" if failed else "ok")
        return 1 if failed else 0
    finally:
        if gw.poll() is None:
            gw.send_signal(signal.SIGTERM)
            try:
                gw.wait(10)
            except subprocess.TimeoutExpired:
                gw.kill()
        log.close()
        backend.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_bin = REPO / "target/release/tollgate"
    if not default_bin.exists():
        default_bin = REPO / "target/debug/tollgate"
    p.add_argument("--binary", default=str(default_bin))
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=256, help="connections being opened at once")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold them all open")
    p.add_argument("--workers", type=int, default=2, help="gateway worker threads")
    p.add_argument("--rounds", type=int, default=3, help="open/hold/close rounds (memory must level off)")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
