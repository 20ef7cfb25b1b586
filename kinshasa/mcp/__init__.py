"""The MCP server: Kinshasa's agent and operator surface as Model Context Protocol tools.

`kinshasa mcp` serves it over stdio; the gateway serves it over streamable HTTP at /mcp. Both build on
the SDK (`kinshasa.client`), so every tool call is one or two GraphQL requests to the gateway, with
the caller's own key: the gateway's auth, breaker, quarantine and egress rules apply unchanged.
"""
