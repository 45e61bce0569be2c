"""``CoveSandboxSession``: one Agents SDK sandbox session on one cove sandbox.

Commands go to cove's exec API as argv (no extra shell), files to its file API (as the requested
user, so no ``sudo`` is needed), terminals to its background processes. Paths are confined to the
workspace the way the SDK's hosted providers do it: a helper script installed in the sandbox resolves
each path (symlinks included) before the operation.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shlex
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import urlsplit

from agents.sandbox.entries import Mount
from agents.sandbox.errors import (
    ExecNonZeroError,
    ExecTimeoutError,
    ExecTransportError,
    ExposedPortUnavailableError,
    WorkspaceArchiveReadError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
    WorkspaceStartError,
    WorkspaceWriteTypeError,
)
from agents.sandbox.files import EntryKind, FileEntry
from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
from agents.sandbox.session.bounded_read import collect_bounded
from agents.sandbox.session.pty_types import PtyExecUpdate
from agents.sandbox.session.runtime_helpers import RESOLVE_WORKSPACE_PATH_HELPER, RuntimeHelperScript
from agents.sandbox.session.tar_workspace import shell_tar_exclude_args
from agents.sandbox.types import ExecResult, ExposedPortEndpoint, Permissions, User
from agents.sandbox.util.tar_utils import UnsafeTarMemberError, validate_tar_bytes
from agents.sandbox.workspace_paths import coerce_posix_path, posix_path_as_path, sandbox_path_str

from cove.errors import CommandTimeout, CoveError, FileNotFound
from cove.integrations.openai_agents import snapshot_ref
from cove.integrations.openai_agents.pty import PtyProcesses
from cove.integrations.openai_agents.state import CoveSandboxSessionState
from cove.sdk.aio import AsyncSandbox
from cove.sdk.models import EntryInfo

logger = logging.getLogger(__name__)

_KINDS = {"dir": EntryKind.DIRECTORY, "file": EntryKind.FILE, "symlink": EntryKind.SYMLINK}
# Workspace archives and root setup run as root: the workspace may hold files of several users.
_ADMIN = "root"
_NOT_FOUND_EXITS = (126, 127)  # the shell's "cannot execute" and "not found"
_ACCOUNT_COMMANDS = frozenset({"groupadd", "useradd", "usermod", "chgrp"})
_MAKE_ROOT = 'if [ ! -d "$1" ]; then mkdir -p -- "$1" && chown -- "$2" "$1"; fi'


def _user_name(user: str | User | None) -> str | None:
    return user.name if isinstance(user, User) else user


def _split_user(command: Sequence[str | Path]) -> tuple[list[str], str | None]:
    """The SDK's ``exec(user=...)`` prefixes ``sudo -u NAME --``; cove runs a command as a user itself."""
    argv = [str(part) for part in command]
    if len(argv) >= 4 and argv[0] == "sudo" and argv[1] == "-u" and argv[3] == "--":
        return argv[4:], argv[2]
    return argv, None


def _failed(op: Sequence[str], exc: CoveError) -> ExecNonZeroError:
    """A file operation cove refused, reported as the SDK's shell fallbacks would report it."""
    return ExecNonZeroError(
        ExecResult(stdout=b"", stderr=str(exc).encode(), exit_code=1),
        command=op,
        context={"backend": "cove", "code": exc.code},
        cause=exc,
    )


def _file_entry(entry: EntryInfo) -> FileEntry:
    kind = _KINDS.get(entry.type, EntryKind.OTHER)
    permissions = Permissions.from_mode(entry.mode & 0o777).model_copy(
        update={"directory": kind == EntryKind.DIRECTORY}
    )
    return FileEntry(
        path=entry.path,
        permissions=permissions,
        owner=entry.owner,
        group=entry.group,
        size=entry.size,
        kind=kind,
    )


class CoveSandboxSession(BaseSandboxSession):
    """An Agents SDK sandbox session backed by a cove sandbox (made by :class:`CoveSandboxClient`)."""

    state: CoveSandboxSessionState

    def __init__(
        self,
        *,
        state: CoveSandboxSessionState,
        sandbox: AsyncSandbox,
        api_key: str | None = None,
        pristine_snapshot: str | None = None,
    ) -> None:
        self.state = state
        self._sandbox = sandbox
        self._api_key = api_key  # for the sandboxes it starts; never part of the state
        self._root_ready = state.workspace_root_ready
        self._pty = PtyProcesses()
        # A sandbox just started from this cove snapshot: restoring it again would change nothing.
        self._pristine_snapshot = pristine_snapshot

    @property
    def sandbox(self) -> AsyncSandbox:
        """The cove sandbox behind this session (it changes when a native snapshot is restored)."""
        return self._sandbox

    @property
    def sandbox_id(self) -> str:
        return self.state.sandbox_id

    # ------------------------------------------------------------------------------- commands

    async def _env(self) -> dict[str, str]:
        # Manifest variables win over the client options' env.
        return {**self.state.base_env, **await self.state.manifest.environment.resolve()}

    def _cwd(self) -> str | None:
        return self.state.manifest.root if self._root_ready else None

    async def _exec_internal(self, *command: str | Path, timeout: float | None = None) -> ExecResult:
        argv, user = _split_user(command)
        if timeout is not None and timeout <= 0:
            timeout = 0.001  # cove wants a positive timeout; this one expires at once
        try:
            result = await self._sandbox.exec(
                argv, cwd=self._cwd(), env=await self._env() or None, user=user, timeout=timeout
            )
        except CommandTimeout as exc:
            context = {"backend": "cove", "stdout": exc.stdout, "stderr": exc.stderr}
            raise ExecTimeoutError(command=command, timeout_s=timeout, context=context, cause=exc) from exc
        except CoveError as exc:
            context = {"backend": "cove", "sandbox_id": self.state.sandbox_id, "code": exc.code}
            raise ExecTransportError(
                command=command, context=context, cause=exc, message=f"cove exec failed: {exc}"
            ) from exc
        return ExecResult(
            stdout=result.stdout.encode(), stderr=result.stderr.encode(), exit_code=result.exit_code
        )

    async def _exec_checked_nonzero(self, *command: str | Path) -> ExecResult:
        # The manifest's users and groups: account administration needs root, which cove grants per
        # command (the sandbox's default user has no sudo).
        if command and str(command[0]) in _ACCOUNT_COMMANDS:
            result = await self._exec_internal("sudo", "-u", _ADMIN, "--", *command)
            if not result.ok():
                raise ExecNonZeroError(result, command=command)
            return result
        return await super()._exec_checked_nonzero(*command)

    async def running(self) -> bool:
        if not self._root_ready:
            return False
        try:
            return (await self._sandbox.info()).state == "running"
        except CoveError:
            return False

    # ------------------------------------------------------------------------- path confinement

    async def _validate_path_access(self, path: Path | str, *, for_write: bool = False) -> Path:
        return await self._validate_remote_path_access(path, for_write=for_write)

    def _runtime_helpers(self) -> tuple[RuntimeHelperScript, ...]:
        return (RESOLVE_WORKSPACE_PATH_HELPER,)

    def _current_runtime_helper_cache_key(self) -> object | None:
        return self.state.sandbox_id

    async def _ensure_runtime_helper_installed(self, helper: RuntimeHelperScript) -> PurePath:
        # The SDK probes an installed helper before every use (one more exec per file operation);
        # trust it instead, and reinstall when running it finds it gone (below).
        self._sync_runtime_helper_install_cache()
        if helper.install_path in (self._runtime_helpers_installed or ()):
            return helper.install_path
        return await super()._ensure_runtime_helper_installed(helper)

    async def _validate_remote_path_access(
        self, path: Path | str, *, for_write: bool = False, recursive_remove: bool = False
    ) -> Path:
        try:
            return await super()._validate_remote_path_access(
                path, for_write=for_write, recursive_remove=recursive_remove
            )
        except ExecNonZeroError as exc:
            if exc.exit_code not in _NOT_FOUND_EXITS:
                raise
            self._runtime_helpers_installed = None  # the helper was deleted in the sandbox
            return await super()._validate_remote_path_access(
                path, for_write=for_write, recursive_remove=recursive_remove
            )

    # ------------------------------------------------------------------------------- lifecycle

    async def _prepare_backend_workspace(self) -> None:
        """Create the workspace root (as root, owned by the sandbox's user) before it is exec's cwd."""
        root = self._workspace_root_path().as_posix()
        owner = f"{self.state.user or 'user'}:"
        try:
            result = await self._sandbox.exec(
                ["sh", "-c", _MAKE_ROOT, "sh", root, owner], user=_ADMIN, cwd="/"
            )
        except CoveError as exc:
            raise WorkspaceStartError(path=Path(root), context={"backend": "cove"}, cause=exc) from exc
        if result.exit_code != 0:
            context = {"backend": "cove", "exit_code": result.exit_code, "stderr": result.stderr}
            raise WorkspaceStartError(path=Path(root), context=context)
        self._root_ready = True

    def _mark_workspace_root_ready_from_probe(self) -> None:
        super()._mark_workspace_root_ready_from_probe()
        self._root_ready = True

    async def _after_start(self) -> None:
        self._pristine_snapshot = None
        # Restoring a native snapshot replaces the sandbox: its helpers are in the snapshot, but
        # the install cache is keyed by sandbox id.
        if self._runtime_helper_cache_key != self._current_runtime_helper_cache_key():
            await self._ensure_runtime_helpers()

    async def _shutdown_backend(self) -> None:
        sandbox = self._sandbox
        if self.state.on_exit == "hibernate":
            try:
                # A hibernated sandbox waits for its resume, not for its timeout (resume restores it).
                await sandbox.set_timeout(0)
                await sandbox.hibernate()
                await sandbox.close()
                return
            except CoveError as exc:
                logger.warning("could not hibernate cove sandbox %s, killing it: %s", sandbox.id, exc)
        try:
            await sandbox.kill()
        except CoveError as exc:
            logger.warning("could not kill cove sandbox %s: %s", sandbox.id, exc)

    # ----------------------------------------------------------------------------------- files

    async def read(self, path: Path | str, *, user: str | User | None = None) -> io.IOBase:
        error_path = posix_path_as_path(coerce_posix_path(path))
        target = sandbox_path_str(await self._validate_path_access(path))
        try:
            data = await self._sandbox.files.read(target, format="bytes", user=_user_name(user))
        except FileNotFound as exc:
            raise WorkspaceReadNotFoundError(path=error_path, cause=exc) from exc
        except CoveError as exc:
            raise WorkspaceArchiveReadError(path=error_path, context={"backend": "cove"}, cause=exc) from exc
        return io.BytesIO(data)

    async def _read_bounded(self, path: Path, *, max_bytes: int) -> bytes:
        target = sandbox_path_str(await self._validate_path_access(path))
        try:
            chunks = await self._sandbox.files.read(target, format="stream")
            try:
                return await collect_bounded(chunks, max_bytes)
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
        except FileNotFound:
            raise WorkspaceReadNotFoundError(path=path) from None
        except CoveError:
            raise WorkspaceArchiveReadError(path=path, context={"backend": "cove"}) from None

    async def write(self, path: Path | str, data: io.IOBase, *, user: str | User | None = None) -> None:
        error_path = posix_path_as_path(coerce_posix_path(path))
        payload = data.read()
        if isinstance(payload, str):
            payload = payload.encode()
        if not isinstance(payload, bytes | bytearray):
            raise WorkspaceWriteTypeError(path=error_path, actual_type=type(payload).__name__)
        target = await self._validate_path_access(path, for_write=True)
        try:
            await self._sandbox.files.write(sandbox_path_str(target), bytes(payload), user=_user_name(user))
        except CoveError as exc:
            raise WorkspaceArchiveWriteError(path=target, context={"backend": "cove"}, cause=exc) from exc

    async def ls(self, path: Path | str, *, user: str | User | None = None) -> list[FileEntry]:
        target = sandbox_path_str(await self._validate_path_access(path))
        name = _user_name(user)
        try:
            entries = await self._sandbox.files.list(target, user=name)
        except CoveError as exc:
            if exc.code != "not_a_directory":
                raise _failed(("ls", "-la", "--", target), exc) from exc
            try:  # `ls` of a file lists the file
                entries = [await self._sandbox.files.stat(target, user=name)]
            except CoveError as exc2:
                raise _failed(("ls", "-la", "--", target), exc2) from exc2
        return [_file_entry(entry) for entry in entries]

    async def rm(self, path: Path | str, *, recursive: bool = False, user: str | User | None = None) -> None:
        checked = await self._validate_path_access(path, for_write=True)
        if recursive and any(grant.read_only for grant in self.state.manifest.extra_path_grants):
            await self._validate_remote_path_access(checked, for_write=True, recursive_remove=True)
        target = sandbox_path_str(checked)
        try:
            await self._sandbox.files.remove(target, recursive=recursive, user=_user_name(user))
        except FileNotFound as exc:
            if not recursive:  # `rm -rf` of a missing path succeeds, `rm` does not
                raise _failed(("rm", "--", target), exc) from exc
        except CoveError as exc:
            raise _failed(("rm", "-rf" if recursive else "-f", "--", target), exc) from exc

    async def mv(
        self, source: Path | str, destination: Path | str, *, user: str | User | None = None
    ) -> None:
        src = sandbox_path_str(await self._validate_path_access(source, for_write=True))
        dst = sandbox_path_str(await self._validate_path_access(destination, for_write=True))
        name = _user_name(user)
        op = ("mv", "-fT", "--", src, dst)
        try:
            entry = await self._sandbox.files.stat(src, user=name)  # a symlink is described, not followed
            if entry.type not in ("file", "symlink"):
                raise _failed(op, CoveError("Move source must be a regular file or symlink", code="invalid"))
            await self._sandbox.files.rename(src, dst, user=name)
        except CoveError as exc:
            raise _failed(op, exc) from exc

    async def mkdir(self, path: Path | str, *, parents: bool = False, user: str | User | None = None) -> None:
        target = await self._validate_path_access(path, for_write=True)
        name = _user_name(user)
        op = ("mkdir", *(["-p"] if parents else []), sandbox_path_str(target))
        try:
            if not parents and target.parent != target:
                parent = await self._sandbox.files.stat(sandbox_path_str(target.parent), user=name)
                if not parent.is_dir:
                    raise CoveError(f"not a directory: {parent.path}", code="not_a_directory")
            await self._sandbox.files.mkdir(sandbox_path_str(target), user=name)
        except CoveError as exc:
            raise _failed(op, exc) from exc

    # ------------------------------------------------------------------------------- terminals

    def supports_pty(self) -> bool:
        return True

    async def pty_exec_start(
        self,
        *command: str | Path,
        timeout: float | None = None,
        shell: bool | list[str] = True,
        user: str | User | None = None,
        tty: bool = False,
        yield_time_s: float | None = None,
        max_output_tokens: int | None = None,
    ) -> PtyExecUpdate:
        argv, run_as = _split_user(self._prepare_exec_command(*command, shell=shell, user=user))
        try:
            return await self._pty.start(
                self._sandbox,
                argv,
                cwd=self._cwd(),
                env=await self._env(),
                user=run_as,
                tty=tty,
                timeout=timeout,
                yield_time_s=yield_time_s,
                max_output_tokens=max_output_tokens,
            )
        except CoveError as exc:
            context = {"backend": "cove", "sandbox_id": self.state.sandbox_id, "code": exc.code}
            raise ExecTransportError(command=command, context=context, cause=exc) from exc

    async def pty_write_stdin(
        self,
        *,
        session_id: int,
        chars: str,
        yield_time_s: float | None = None,
        max_output_tokens: int | None = None,
    ) -> PtyExecUpdate:
        return await self._pty.write(session_id, chars, yield_time_s, max_output_tokens)

    async def pty_terminate_all(self) -> None:
        await self._pty.terminate_all()

    # ----------------------------------------------------------------------------------- ports

    async def _resolve_exposed_port(self, port: int) -> ExposedPortEndpoint:
        def unavailable(detail: str, cause: BaseException | None = None) -> ExposedPortUnavailableError:
            return ExposedPortUnavailableError(
                port=port,
                exposed_ports=self.state.exposed_ports,
                reason="backend_unavailable",
                context={"backend": "cove", "detail": detail},
                cause=cause,
            )

        try:
            url = await self._sandbox.get_url(port, expires_in=self.state.exposed_port_url_ttl_s)
        except CoveError as exc:
            raise unavailable("get_url_failed", exc) from exc
        split = urlsplit(url)
        if split.hostname is None:
            raise unavailable("invalid_url")
        tls = split.scheme == "https"
        return ExposedPortEndpoint(
            host=split.hostname, port=split.port or (443 if tls else 80), tls=tls, query=split.query
        )

    # ----------------------------------------------------------------------- persist / hydrate

    async def persist_workspace(self) -> io.IOBase:
        if self.state.workspace_persistence == "snapshot" and self._native_snapshot_fits():
            return await self._with_mounts_detached(self._persist_native)
        return await self._with_mounts_detached(self._persist_tar)

    def _native_snapshot_fits(self) -> bool:
        """A cove snapshot holds the whole sandbox and cannot leave paths out: use it only when
        nothing but ephemeral mounts (detached around it) is to be skipped."""
        if self._native_snapshot_requires_tar_fallback():
            return False
        root = self._workspace_root_path()
        mounts = set()
        for _mount, mount_path in self.state.manifest.ephemeral_mount_targets():
            with contextlib.suppress(ValueError):
                mounts.add(mount_path.relative_to(root))
        return not (self._persist_workspace_skip_relpaths() - mounts)

    async def _persist_native(self) -> bytes:
        snapshot = await self._sandbox.snapshot(f"openai-agents-{self.state.session_id.hex[:12]}")
        previous, self.state.cove_snapshot_id = self.state.cove_snapshot_id, snapshot.id
        if previous and previous != snapshot.id:
            # The session's snapshot store now names the new one; the old one would only leak.
            with contextlib.suppress(CoveError):
                await AsyncSandbox.delete_snapshot(previous, **self._connection())
        return snapshot_ref.encode(snapshot.id, self._sandbox.id)

    async def _persist_tar(self) -> bytes:
        root = self._workspace_root_path().as_posix()
        archive = f"/tmp/openai-agents-persist-{self.state.session_id.hex}.tar"
        excludes = " ".join(shell_tar_exclude_args(self._persist_workspace_skip_relpaths()))
        script = f"tar {excludes} -C {shlex.quote(root)} -cf {shlex.quote(archive)} ."
        try:
            result = await self._sandbox.exec(["sh", "-c", script], user=_ADMIN, cwd="/")
            if result.exit_code != 0:
                context = {
                    "reason": "tar_nonzero_exit",
                    "exit_code": result.exit_code,
                    "stderr": result.stderr,
                }
                raise WorkspaceArchiveReadError(path=Path(root), context=context)
            return await self._sandbox.files.read(archive, format="bytes", user=_ADMIN)
        finally:
            with contextlib.suppress(CoveError):
                await self._sandbox.files.remove(archive, user=_ADMIN)

    async def _with_mounts_detached(self, persist: Callable[[], Awaitable[bytes]]) -> io.IOBase:
        """Run ``persist`` with the ephemeral mounts unmounted (they are not workspace state)."""
        root = Path(self._workspace_root_path())
        detached: list[tuple[Mount, Path]] = []
        try:
            for mount, mount_path in self.state.manifest.ephemeral_mount_targets():
                await mount.mount_strategy.teardown_for_snapshot(mount, self, mount_path)
                detached.append((mount, mount_path))
            return io.BytesIO(await persist())
        except WorkspaceArchiveReadError:
            raise
        except Exception as exc:
            context = {"backend": "cove", "reason": "persist_failed"}
            raise WorkspaceArchiveReadError(path=root, context=context, cause=exc) from exc
        finally:
            for mount, mount_path in reversed(detached):
                await mount.mount_strategy.restore_after_snapshot(mount, self, mount_path)

    async def _restore_snapshot_into_workspace_on_resume(self) -> None:
        # A native snapshot replaces the whole sandbox: clearing the workspace first would only
        # cost time (and the sandbox started from that very snapshot must not be cleared).
        archive = await self.state.snapshot.restore(dependencies=self.dependencies)
        try:
            raw = archive.read()
        finally:
            with contextlib.suppress(Exception):
                archive.close()
        if not isinstance(raw, bytes | bytearray):
            raise WorkspaceWriteTypeError(path=self._workspace_root_path(), actual_type=type(raw).__name__)
        if snapshot_ref.decode(bytes(raw)) is None:
            await self._clear_workspace_root_on_resume()
        await self.hydrate_workspace(io.BytesIO(raw))

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        root = self._workspace_root_path()
        raw = data.read()
        if isinstance(raw, str):
            raw = raw.encode()
        if not isinstance(raw, bytes | bytearray):
            raise WorkspaceWriteTypeError(path=root, actual_type=type(raw).__name__)
        raw = bytes(raw)
        snapshot_id = snapshot_ref.decode(raw)
        if snapshot_id is not None:
            await self._hydrate_native(snapshot_id)
            return
        try:
            validate_tar_bytes(raw, allow_external_symlink_targets=False)
        except UnsafeTarMemberError as exc:
            context = {"reason": "unsafe_or_invalid_tar", "member": exc.member, "detail": str(exc)}
            raise WorkspaceArchiveWriteError(path=root, context=context, cause=exc) from exc
        await self._hydrate_tar(raw)

    async def _hydrate_tar(self, raw: bytes) -> None:
        root = self._workspace_root_path().as_posix()
        archive = f"/tmp/openai-agents-hydrate-{self.state.session_id.hex}.tar"
        owner = f"{self.state.user or 'user'}:"
        script = f'{_MAKE_ROOT} && tar -C "$1" -xf {shlex.quote(archive)}'
        try:
            await self._sandbox.files.write(archive, raw, user=_ADMIN)
            result = await self._sandbox.exec(["sh", "-c", script, "sh", root, owner], user=_ADMIN, cwd="/")
        except CoveError as exc:
            raise WorkspaceArchiveWriteError(path=Path(root), context={"backend": "cove"}, cause=exc) from exc
        finally:
            with contextlib.suppress(CoveError):
                await self._sandbox.files.remove(archive, user=_ADMIN)
        if result.exit_code != 0:
            context = {"reason": "tar_nonzero_exit", "exit_code": result.exit_code, "stderr": result.stderr}
            raise WorkspaceArchiveWriteError(path=Path(root), context=context)
        self._root_ready = True

    async def _hydrate_native(self, snapshot_id: str) -> None:
        """Continue on a sandbox started from the snapshot (cove cannot roll a live one back)."""
        self.state.cove_snapshot_id = snapshot_id
        if snapshot_id == self._pristine_snapshot:
            self._root_ready = True
            return
        env = await self._env()
        try:
            replacement = await AsyncSandbox.create(
                **self.state.create_kwargs(snapshot=snapshot_id), env=env or None, **self._connection()
            )
        except CoveError as exc:
            context = {"reason": "native_snapshot_restore_failed", "snapshot_id": snapshot_id}
            raise WorkspaceArchiveWriteError(
                path=self._workspace_root_path(), context=context, cause=exc
            ) from exc
        previous, self._sandbox = self._sandbox, replacement
        self.state.sandbox_id = replacement.id
        self._root_ready = True
        with contextlib.suppress(CoveError):
            await previous.kill()

    def _connection(self) -> dict[str, Any]:
        """The server and key this session's sandbox was reached with, for the sandboxes it makes."""
        return {"url": self.state.url, "api_key": self._api_key}
