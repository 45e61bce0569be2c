"""The cove provider's client options and its serializable session state (pydantic, registered by
the Agents SDK under the type ``"cove"``)."""

from __future__ import annotations

from typing import Any, Literal

from agents.sandbox.session.sandbox_client import BaseSandboxClientOptions
from agents.sandbox.session.sandbox_session_state import SandboxSessionState
from pydantic import Field, model_validator

WorkspacePersistence = Literal["snapshot", "tar"]
OnExit = Literal["kill", "hibernate"]


class CoveSandboxClientOptions(BaseSandboxClientOptions):
    """How :class:`CoveSandboxClient` creates a sandbox. Every field is optional.

    ``workspace_persistence="snapshot"`` persists the workspace as a cove snapshot (constant time;
    the SDK's snapshot store only keeps a small reference to it), ``"tar"`` as a portable tar of the
    workspace root. ``on_exit`` (or ``pause_on_exit=True``) says what shutdown does: ``"kill"``, or
    ``"hibernate"`` so that a later ``resume`` finds the same sandbox with its files and processes.
    """

    type: Literal["cove"] = "cove"
    template: str | None = None
    snapshot: str | None = None  # a cove snapshot id to start from instead of a template
    timeout: int | None = Field(default=None, ge=0)  # sandbox lifetime in seconds (0: none)
    env: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    cpu: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    user: str | None = None  # the sandbox's default user (cove's default: "user")
    exposed_ports: tuple[int, ...] = ()
    exposed_port_url_ttl_s: int = Field(default=3600, ge=1)
    workspace_persistence: WorkspacePersistence = "snapshot"
    on_exit: OnExit = "kill"
    pause_on_exit: bool = False  # the E2B provider's spelling of on_exit="hibernate"
    url: str | None = None
    api_key: str | None = Field(default=None, repr=False, exclude=True)  # never serialized

    @model_validator(mode="after")
    def _one_source(self) -> CoveSandboxClientOptions:
        if self.template is not None and self.snapshot is not None:
            raise ValueError("CoveSandboxClientOptions: give either template or snapshot, not both")
        return self

    @property
    def effective_on_exit(self) -> OnExit:
        return "hibernate" if self.pause_on_exit else self.on_exit

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``cove.AsyncSandbox.create`` (without env, url and key)."""
        return {
            "template": self.template or "base",
            "snapshot": self.snapshot,
            "timeout": self.timeout,
            "metadata": dict(self.metadata or {}),
            "cpu": self.cpu,
            "memory_mb": self.memory_mb,
            "disk_mb": self.disk_mb,
            "user": self.user,
        }


class CoveSandboxSessionState(SandboxSessionState):
    """What a resumed session needs: the cove sandbox, the last cove snapshot of its workspace, and
    the settings to create a replacement if the sandbox is gone. The API key is never stored."""

    type: Literal["cove"] = "cove"
    sandbox_id: str
    cove_snapshot_id: str | None = None  # the workspace's latest native snapshot (persist_workspace)
    url: str | None = None  # the cove server the sandbox lives on
    template: str = "base"
    start_snapshot: str | None = None
    sandbox_timeout: int | None = None
    base_env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    cpu: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    user: str | None = None
    exposed_port_url_ttl_s: int = 3600
    workspace_persistence: WorkspacePersistence = "snapshot"
    on_exit: OnExit = "kill"

    def create_kwargs(self, *, snapshot: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``cove.AsyncSandbox.create`` of a replacement sandbox."""
        return {
            "template": self.template,
            "snapshot": snapshot or self.start_snapshot,
            "timeout": self.sandbox_timeout,
            "metadata": dict(self.metadata),
            "cpu": self.cpu,
            "memory_mb": self.memory_mb,
            "disk_mb": self.disk_mb,
            "user": self.user,
        }
