"""Adapters that let agent harnesses use cove sandboxes (each imports its harness lazily; see the extras).

- :mod:`cove.integrations.toolset`: Claude Managed Agents' six tools over a sandbox (no extra needed).
- :mod:`cove.integrations.mcp_server`: an MCP server (``cove[mcp]``; ``cove mcp``).
- :mod:`cove.integrations.claude_managed`: a self-hosted Managed Agents worker (``cove[claude]``).
- :mod:`cove.integrations.openai_agents`: an OpenAI Agents SDK sandbox provider (``cove[openai-agents]``).
- :mod:`cove.integrations.harness_inside`: the agent's loop itself in a sandbox, its model key injected
  by the egress proxy (docs/harness-inside.md; the template needs ``cove[openai-agents]`` on the host).
"""
