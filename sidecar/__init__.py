"""The mcpguard sidecar: the guard as a proxy in front of an unchanged MCP server, and its command line."""
