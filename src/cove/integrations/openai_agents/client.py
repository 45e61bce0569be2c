"""``CoveSandboxClient``: creates, resumes and deletes Agents SDK sessions on cove sandboxes."""

from __future__ import annotations

import contextlib
import logging
import uuid

from agents.sandbox.manifest import Manifest
from agents.sandbox.session.dependencies import Dependencies
from agents.sandbox.session.manager import Instrumentation
from agents.sandbox.session.sandbox_client import BaseSandboxClient
from agents.sandbox.session.sandbox_session import SandboxSession
from agents.sandbox.session.sandbox_session_state import SandboxSessionState
from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot

from cove.errors import CoveError, NotFound
from cove.integrations.openai_agents.session import CoveSandboxSession
from cove.integrations.openai_agents.state import CoveSandboxClientOptions, CoveSandboxSessionState
from cove.sdk._core import Config
from cove.sdk.aio import AsyncSandbox
from cove.sdk.models import SandboxInfo

logger = logging.getLogger(__name__)


class CoveSandboxClient(BaseSandboxClient[CoveSandboxClientOptions | None]):
    """The Agents SDK's sandbox client for cove.

    ::

        client = CoveSandboxClient()                      # COVE_URL / COVE_API_KEY
        run_config = RunConfig(sandbox=SandboxRunConfig(client=client,
                                                        options=CoveSandboxClientOptions()))

    ``url`` and ``api_key`` override the environment; options may override them per sandbox.
    Resumed sessions use the server recorded in their state unless this client names one.
    """

    backend_id = "cove"
    supports_default_options = True

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        instrumentation: Instrumentation | None = None,
        dependencies: Dependencies | None = None,
    ) -> None:
        self._url = url
        self._api_key = api_key
        self._instrumentation = instrumentation if instrumentation is not None else Instrumentation()
        self._dependencies = dependencies

    async def create(
        self,
        *,
        snapshot: SnapshotSpec | SnapshotBase | None = None,
        manifest: Manifest | None = None,
        options: CoveSandboxClientOptions | None = None,
    ) -> SandboxSession:
        options = options if options is not None else CoveSandboxClientOptions()
        if not isinstance(options, CoveSandboxClientOptions):
            raise TypeError(f"CoveSandboxClient needs CoveSandboxClientOptions, not {type(options).__name__}")
        manifest = manifest if manifest is not None else Manifest()
        self._validate_manifest_for_create(manifest)
        base_env = dict(options.env or {})
        env = {**base_env, **await manifest.environment.resolve()}
        config = Config.resolve(options.url or self._url, options.api_key or self._api_key)
        sandbox = await AsyncSandbox.create(
            **options.create_kwargs(), env=env or None, url=config.url, api_key=config.api_key
        )
        info = await sandbox.info()
        session_id = uuid.uuid4()
        state = CoveSandboxSessionState(
            session_id=session_id,
            manifest=manifest,
            snapshot=resolve_snapshot(snapshot, str(session_id)),
            exposed_ports=options.exposed_ports,
            sandbox_id=sandbox.id,
            url=config.url,
            template=options.template or "base",
            start_snapshot=options.snapshot,
            sandbox_timeout=info.timeout,
            base_env=base_env,
            metadata=dict(options.metadata or {}),
            cpu=options.cpu,
            memory_mb=options.memory_mb,
            disk_mb=options.disk_mb,
            user=info.user,
            exposed_port_url_ttl_s=options.exposed_port_url_ttl_s,
            workspace_persistence=options.workspace_persistence,
            on_exit=options.effective_on_exit,
        )
        inner = CoveSandboxSession(state=state, sandbox=sandbox, api_key=config.api_key)
        return self._wrap_session(inner, instrumentation=self._instrumentation)

    async def delete(self, session: SandboxSession) -> SandboxSession:
        """After ``shutdown``: make sure a sandbox meant to be killed is gone (idempotent); a
        hibernated one is kept for ``resume``."""
        inner = session._inner
        if not isinstance(inner, CoveSandboxSession):
            raise TypeError("CoveSandboxClient.delete expects a session made by CoveSandboxClient")
        if inner.state.on_exit == "kill":
            with contextlib.suppress(CoveError):
                await inner.sandbox.kill()
        await inner.sandbox.close()
        return session

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        """Reattach to the state's sandbox (waking it if it was paused or hibernated); if it is gone,
        start a replacement, from the workspace's last cove snapshot when there is one."""
        if not isinstance(state, CoveSandboxSessionState):
            raise TypeError("CoveSandboxClient.resume expects a CoveSandboxSessionState")
        state.assert_path_grants_rebound()
        config = Config.resolve(self._url or state.url, self._api_key)
        sandbox = await self._reattach(state, config)
        reattached = sandbox is not None
        pristine: str | None = None
        if sandbox is None:
            sandbox, pristine = await self._replace(state, config)
            state.sandbox_id = sandbox.id
            state.workspace_root_ready = False
        state.url = config.url
        inner = CoveSandboxSession(
            state=state, sandbox=sandbox, api_key=config.api_key, pristine_snapshot=pristine
        )
        inner._set_start_state_preserved(reattached, system=reattached)
        return self._wrap_session(inner, instrumentation=self._instrumentation)

    async def _reattach(self, state: CoveSandboxSessionState, config: Config) -> AsyncSandbox | None:
        try:
            sandbox = await AsyncSandbox.connect(state.sandbox_id, url=config.url, api_key=config.api_key)
        except NotFound:
            return None
        info: SandboxInfo | None = None
        try:
            info = await sandbox.info()
            if info.state in ("paused", "hibernated"):
                info = await sandbox.resume()
                if state.sandbox_timeout:  # shutdown stopped its clock while it slept
                    await sandbox.set_timeout(state.sandbox_timeout)
        except CoveError as exc:
            logger.warning("could not resume cove sandbox %s, replacing it: %s", sandbox.id, exc)
            info = None
        if info is None or info.state != "running":
            await sandbox.close()
            return None
        return sandbox

    async def _replace(
        self, state: CoveSandboxSessionState, config: Config
    ) -> tuple[AsyncSandbox, str | None]:
        env = {**state.base_env, **await state.manifest.environment.resolve()} or None
        connection = {"url": config.url, "api_key": config.api_key}
        if state.cove_snapshot_id:
            try:
                kwargs = state.create_kwargs(snapshot=state.cove_snapshot_id)
                sandbox = await AsyncSandbox.create(**kwargs, env=env, **connection)
                return sandbox, state.cove_snapshot_id
            except NotFound:
                logger.warning("cove snapshot %s is gone; starting a fresh sandbox", state.cove_snapshot_id)
        return await AsyncSandbox.create(**state.create_kwargs(), env=env, **connection), None

    async def discard(self, state: SandboxSessionState) -> None:
        """Drop what a finished session left on the server for a resume that will not come: its
        (hibernated) sandbox and its workspace's cove snapshot. Missing ones are fine."""
        if not isinstance(state, CoveSandboxSessionState):
            raise TypeError("CoveSandboxClient.discard expects a CoveSandboxSessionState")
        config = Config.resolve(self._url or state.url, self._api_key)
        with contextlib.suppress(NotFound):
            await AsyncSandbox.kill_by_id(state.sandbox_id, url=config.url, api_key=config.api_key)
        if state.cove_snapshot_id:
            with contextlib.suppress(NotFound):
                await AsyncSandbox.delete_snapshot(
                    state.cove_snapshot_id, url=config.url, api_key=config.api_key
                )
            state.cove_snapshot_id = None

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        return self._deserialize_session_state_payload(payload, CoveSandboxSessionState)
