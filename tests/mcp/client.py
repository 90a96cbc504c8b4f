"""MCP clients made with the official SDK (mcp.client.streamable_http), for the gateway's MCP
tests. Prints one JSON line with what happened; exits 0 even when sessions fail (the test judges).

  client.py sessions URLS SESSIONS CALLS
      SESSIONS concurrent 2025-11-25 sessions, each: initialize, list_tools, whoami, then CALLS
      add calls. URLS is a comma-separated list of gateway URLs: each HTTP request of a session
      goes to the next one in turn (a client switching gateway replica mid-session).
  client.py stateless URL
      One 2026-07-28 exchange: server/discover, tools/list, tools/call (no session).
  client.py federation URL legacy|modern PID
      One session through a federating route whose servers are a, b and c: the handshake
      (initialize, or 2026-07-28 server/discover), list_tools, each server's whoami; then kills
      process PID (server c) and lists and calls again, an unknown tool included.
  client.py limited-key URL CALLS API_KEY
      A session calling delete_repo CALLS times (some refused by a per-tool limit), then
      search_docs: which calls passed, which failed and with what code.
  client.py demo URL API_KEY
      A session with `tollgate demo`'s MCP server: list_tools, add(6, 7), search_docs.
  client.py tools URL API_KEY
      A session with this key: list_tools, a call of delete_repo (which may be refused), then a
      call of search_docs in the same session.
"""

import asyncio
import itertools
import json
import os
import signal
import sys
import traceback

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


class Alternate(httpx2.AsyncBaseTransport):
    """Sends each request to the next base URL in turn (same path)."""

    def __init__(self, urls):
        self._next = itertools.cycle([httpx2.URL(u) for u in urls])
        self._inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request):
        to = next(self._next)
        request.url = request.url.copy_with(host=to.host, port=to.port)
        request.headers["host"] = f"{to.host}:{to.port}"
        return await self._inner.handle_async_request(request)

    async def aclose(self):
        await self._inner.aclose()


def describe(e):
    """The innermost errors of an exception (groups unwrapped), short."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return "".join(traceback.format_exception_only(type(e), e)).strip()[:400]


def text(result):
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def one_session(urls, calls):
    async with httpx2.AsyncClient(transport=Alternate(urls), timeout=15) as http:
        async with streamable_http_client(urls[0], http_client=http) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                tools = await s.list_tools()
                names = sorted(t.name for t in tools.tools)
                owner = text(await s.call_tool("whoami", {}))
                answers = []
                for i in range(calls):
                    answers.append(text(await s.call_tool("add", {"a": i, "b": 1})))
                wrong = [a for a in answers if not a.endswith("@" + owner)]
                return {"owner": owner, "tools": names, "answers": len(answers), "wrong": wrong}


async def sessions(urls, n, calls):
    async def guarded(i):
        try:
            return await asyncio.wait_for(one_session(urls, calls), 30)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            return {"error": describe(e)}

    results = await asyncio.gather(*(guarded(i) for i in range(n)))
    done = [r for r in results if "error" not in r and not r["wrong"] and r["answers"] == calls]
    owners = sorted({r["owner"] for r in done})
    print(json.dumps({"completed": len(done), "owners": owners, "results": results}))


async def stateless(url):
    async with httpx2.AsyncClient(timeout=15) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as s:
                d = await s.discover()
                tools = await s.list_tools()
                r = await s.call_tool("add", {"a": 2, "b": 3})
                print(json.dumps({
                    "version": s.protocol_version,
                    "supported": list(d.supported_versions),
                    "tools": sorted(t.name for t in tools.tools),
                    "add": text(r),
                }))


async def tools(url, key):
    async with httpx2.AsyncClient(timeout=15, headers={"x-api-key": key}) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                listed = sorted(t.name for t in (await s.list_tools()).tools)
                try:
                    r = await s.call_tool("delete_repo", {"repo": "x"})
                    delete = {"ok": text(r), "is_error": bool(r.is_error)}
                except Exception as e:  # noqa: BLE001 - the refusal is what is tested
                    delete = {"error": describe(e), "code": getattr(getattr(e, "error", None), "code", None)}
                after = text(await s.call_tool("search_docs", {"query": "q"}))
                print(json.dumps({"tools": listed, "delete": delete, "after": after}))


def code_of(e):
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return getattr(getattr(e, "error", None), "code", None)


async def attempt(coro):
    try:
        r = await coro
        return {"ok": text(r), "is_error": bool(r.is_error)}
    except Exception as e:  # noqa: BLE001 - the error is what is tested
        return {"code": code_of(e), "error": describe(e)}


async def federation(url, era, pid):
    async with httpx2.AsyncClient(timeout=15) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as s:
                if era == "legacy":
                    init = await s.initialize()
                    hello = {"server": init.server_info.name}
                else:
                    d = await s.discover()
                    hello = {"supported": list(d.supported_versions)}
                before = sorted(t.name for t in (await s.list_tools()).tools)
                who = {p: text(await s.call_tool(f"{p}__whoami", {})) for p in "abc"}
                os.kill(pid, signal.SIGKILL)
                await asyncio.sleep(0.5)
                after = sorted(t.name for t in (await s.list_tools()).tools)
                calls = {}
                for name, args in [("a__whoami", {}), ("c__whoami", {}), ("b__add", {"a": 2, "b": 3}),
                                   ("nosuch__whoami", {}), ("whoami", {}), ("a__whoami", {})]:
                    key = name if name not in calls else name + "#2"
                    calls[key] = await attempt(s.call_tool(name, args))
                print(json.dumps({"version": s.protocol_version, **hello, "before": before,
                                  "who": who, "after": after, "calls": calls}))


async def limited(url, n, key):
    async with httpx2.AsyncClient(timeout=15, headers={"x-api-key": key}) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                results = [await attempt(s.call_tool("delete_repo", {"repo": str(i)})) for i in range(n)]
                after = await attempt(s.call_tool("search_docs", {"query": "q"}))
                print(json.dumps({"results": results, "after": after}))


async def demo(url, key):
    async with httpx2.AsyncClient(timeout=15, headers={"x-api-key": key}) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                listed = sorted(t.name for t in (await s.list_tools()).tools)
                add = text(await s.call_tool("add", {"a": 6, "b": 7}))
                search = text(await s.call_tool("search_docs", {"query": "rate limits"}))
                print(json.dumps({"tools": listed, "add": add, "search": search}))


def main():
    mode = sys.argv[1]
    if mode == "sessions":
        asyncio.run(sessions(sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])))
    elif mode == "tools":
        asyncio.run(tools(sys.argv[2], sys.argv[3]))
    elif mode == "federation":
        asyncio.run(federation(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    elif mode == "demo":
        asyncio.run(demo(sys.argv[2], sys.argv[3]))
    elif mode == "limited-key":
        asyncio.run(limited(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    elif mode == "stateless":
        asyncio.run(stateless(sys.argv[2]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
