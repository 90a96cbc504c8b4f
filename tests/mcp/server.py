"""A stateful MCP server made with the official SDK (mcp.server.mcpserver.MCPServer), for the
gateway's MCP tests. Each instance has a name; its tools say which instance answered, so a test
can tell whether a session stayed on the instance that issued it.

Usage: server.py NAME PORT [--json]   (Streamable HTTP on 127.0.0.1:PORT/mcp; --json answers
POSTs with JSON instead of SSE). Prints "ready" once listening.
"""

import sys

from mcp.server.mcpserver import MCPServer


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    json_response = "--json" in sys.argv[3:]
    server = MCPServer(f"test-{name}")
    calls = {"n": 0}

    @server.tool()
    def whoami() -> str:
        """The name of the instance that answers."""
        return name

    @server.tool()
    def add(a: int, b: int) -> str:
        """a + b, and which instance computed it."""
        calls["n"] += 1
        return f"{a + b}@{name}"

    @server.tool()
    def search_docs(query: str) -> str:
        """A tool for the access rules."""
        return f"found {query}@{name}"

    @server.tool()
    def delete_repo(repo: str) -> str:
        """A tool for the access rules."""
        return f"deleted {repo}@{name}"

    print("ready", flush=True)
    server.run(
        transport="streamable-http",
        host="127.0.0.1",
        port=port,
        json_response=json_response,
        stateless_http=False,
    )


if __name__ == "__main__":
    main()
