"""The MCP server's settings (KINSHASA_MCP_*), read once by `kinshasa mcp` or by the gateway's app."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class McpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KINSHASA_MCP_", extra="ignore")

    # Run binding: with an entry point, a session starts its own run on its first write and finishes it
    # when the session closes, so an agent that knows nothing of runs can still write.
    entry_point: str | None = None
    purpose: str = "MCP session"
    # How long who-a-key-is and the catalogue are trusted before the next tools/list or call re-reads
    # them: short, so a service registered later shows up without a restart.
    catalogue_ttl_s: float = Field(5.0, ge=0.0)
    # Over HTTP (/mcp): sessions open at once, and how long an idle one lives before it is closed (its
    # bound run finished).
    max_sessions: int = Field(1000, ge=1)
    session_idle_timeout_s: float = Field(1800.0, gt=0.0)
