"""An OpenAI Agents SDK sandbox provider backed by cove (``pip install 'cove[openai-agents]'``).

::

    from agents import RunConfig, Runner
    from agents.sandbox import SandboxAgent, SandboxRunConfig
    from cove.integrations.openai_agents import CoveSandboxClient, CoveSandboxClientOptions

    config = RunConfig(sandbox=SandboxRunConfig(client=CoveSandboxClient(),
                                                options=CoveSandboxClientOptions()))
    await Runner.run(SandboxAgent(name="worker", model=...), "task", run_config=config)

See docs/integrations-openai-agents.md.
"""

try:
    import agents.sandbox  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cove.integrations.openai_agents needs the OpenAI Agents SDK: pip install 'cove[openai-agents]'"
    ) from exc

from cove.integrations.openai_agents.client import CoveSandboxClient
from cove.integrations.openai_agents.session import CoveSandboxSession
from cove.integrations.openai_agents.state import CoveSandboxClientOptions, CoveSandboxSessionState

__all__ = [
    "CoveSandboxClient",
    "CoveSandboxClientOptions",
    "CoveSandboxSession",
    "CoveSandboxSessionState",
]
