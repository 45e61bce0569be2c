"""Templates in the SDK (docs/templates.md): a declarative builder, Dockerfiles, image imports.

::

    from cove import Sandbox, Template

    tpl = (
        Template("tools")
        .from_base("debian:bookworm")
        .apt_install(["jq"])
        .pip_install(["requests"])
        .copy("./app", "/opt/app/")
        .env({"MODE": "prod"})
        .start_cmd("python3 -m http.server 8000", ready=Template.wait_for_port(8000))
    )
    tpl.build(on_log=print)                  # the server builds it; each step is a cached layer
    with Sandbox.create(template="tools") as sb:
        ...
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cove.errors import CoveError, InvalidArgument
from cove.sdk._core import Call, Config, Op, _q, check_response, transport_error
from cove.templates import dockerfile

__all__ = ["BuildError", "Template", "TemplateInfo"]


class BuildError(CoveError):
    """A template build failed: ``step`` (0-based, None outside a step) and the failing ``output``."""

    def __init__(self, message: str, step: int | None = None, output: str = "", code: str = "build_failed"):
        super().__init__(
            message + (f"\n--- output of the failing step ---\n{output.rstrip()}" if output else "")
        )
        self.message, self.step, self.output, self.code = message, step, output, code


@dataclass(frozen=True, slots=True)
class TemplateInfo:
    name: str
    state: str = "ready"
    base: str = ""
    layers: list[dict[str, Any]] = field(default_factory=list)  # [{"id", "size"}], bottom-most first
    size: int = 0
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str | None = None
    start: dict[str, Any] | None = None
    warm: bool = False
    tags: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TemplateInfo:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def _get(name: str) -> Op[TemplateInfo]:
    return TemplateInfo.from_dict((yield Call("GET", f"/v1/templates/{_q(name)}")))


def _list() -> Op[list[TemplateInfo]]:
    data = yield Call("GET", "/v1/templates")
    return [TemplateInfo.from_dict(d) for d in data["items"]]


def _delete(name: str) -> Op[None]:
    yield Call("DELETE", f"/v1/templates/{_q(name)}")


def _tag(name: str, tag: str) -> Op[TemplateInfo]:
    return TemplateInfo.from_dict((yield Call("POST", f"/v1/templates/{_q(name)}/tags", json={"tag": tag})))


class Template:
    """A template definition; :meth:`build` sends it to the server, which builds it in sandboxes."""

    def __init__(
        self, name: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ):
        self.name = name
        self._base = "base"
        self._steps: list[dict[str, Any]] = []
        self._files: dict[str, Path] = {}  # name in the context -> local path
        self._start: dict[str, Any] | None = None
        self._tags: list[str] = []
        self._dockerfile: tuple[str, dict[str, str]] | None = None
        self._conn = (url, api_key, transport)

    # -- definition ---------------------------------------------------------------------------
    def from_base(self, ref: str) -> Template:
        """``base`` (the host's /usr, read-only), ``debian:bookworm`` (a full Debian root: apt works),
        one of your templates, or a snapshot id."""
        self._base = ref
        return self

    def apt_install(self, packages: Iterable[str]) -> Template:
        return self._step({"type": "apt", "packages": list(packages)})

    def pip_install(self, packages: Iterable[str]) -> Template:
        return self._step({"type": "pip", "packages": list(packages)})

    def npm_install(self, packages: Iterable[str], global_: bool = False) -> Template:
        return self._step({"type": "npm", "packages": list(packages), "global": global_})

    def run(self, cmd: str) -> Template:
        return self._step({"type": "run", "cmd": cmd})

    def copy(self, local: str | os.PathLike[str], remote: str, chown: str | None = None) -> Template:
        """Copy a local file or directory (its content, when ``remote`` ends in ``/``: into it)."""
        path = Path(local)
        if not path.exists():
            raise InvalidArgument(f"copy: {str(local)!r} does not exist")
        key = f"f{len(self._files)}"
        self._files[key] = path
        src = key if path.is_dir() else f"{key}/{path.name}"
        if path.is_dir() and not remote.endswith("/"):
            remote += "/"
        step: dict[str, Any] = {"type": "copy", "src": src, "dst": remote}
        if chown:
            step["chown"] = chown
        return self._step(step)

    def env(self, env: Mapping[str, str]) -> Template:
        return self._step({"type": "env", "env": dict(env)})

    def workdir(self, path: str) -> Template:
        return self._step({"type": "workdir", "path": path})

    def user(self, user: str) -> Template:
        """Later steps run as ``user``, and so do the template's sandboxes."""
        return self._step({"type": "user", "user": user})

    def start_cmd(self, cmd: str, ready: str | None = None, warm: bool = True) -> Template:
        """A command every sandbox of the template has running. ``ready``: a shell command that exits
        0 once it serves. ``warm``: started once at build and sealed with its memory, so creates
        restore it already up (needs CRIU on the server; else it starts at each create)."""
        self._start = {"cmd": cmd, "ready": ready, "warm": warm}
        return self

    def tag(self, *tags: str) -> Template:
        self._tags.extend(tags)
        return self

    @staticmethod
    def wait_for_port(port: int, host: str = "127.0.0.1") -> str:
        """A ready check: something listens on ``port`` inside the sandbox."""
        return f"bash -c 'echo > /dev/tcp/{host}/{int(port)}' 2>/dev/null"

    @classmethod
    def from_dockerfile(
        cls,
        name: str,
        path: str | os.PathLike[str],
        context: str | os.PathLike[str] | None = None,
        build_args: Mapping[str, str] | None = None,
        **conn: Any,
    ) -> Template:
        """A template from a Dockerfile (cove's subset: docs/templates.md); COPY sources are read
        from ``context`` (default: the Dockerfile's directory)."""
        tpl = cls(name, **conn)
        text = Path(path).read_text()
        ctx = Path(context) if context is not None else Path(path).resolve().parent
        parsed = dockerfile.parse(text, dict(build_args or {}))  # DockerfileError names the line
        for src in dockerfile.copy_sources(parsed):
            if not (ctx / src).exists():
                raise InvalidArgument(f"COPY {src}: no such file in the build context {ctx}")
            tpl._files[src] = ctx / src
        tpl._dockerfile = (text, dict(build_args or {}))
        return tpl

    def _step(self, step: dict[str, Any]) -> Template:
        self._steps.append(step)
        return self

    # -- build --------------------------------------------------------------------------------
    def _context(self) -> str | None:
        if not self._files:
            return None
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for key, path in self._files.items():
                arc = key if (path.is_dir() or self._dockerfile) else f"{key}/{path.name}"
                tar.add(str(path), arcname=arc, filter=_plain)
        return base64.b64encode(buf.getvalue()).decode()

    def body(self) -> dict[str, Any]:
        """The request body of ``POST /v1/templates``."""
        body: dict[str, Any] = {"name": self.name, "tags": self._tags}
        if self._dockerfile:
            body["dockerfile"], body["build_args"] = self._dockerfile
        else:
            body["from"], body["steps"] = self._base, self._steps
        if self._start:
            body.update(start_cmd=self._start["cmd"], ready=self._start["ready"], warm=self._start["warm"])
        ctx = self._context()
        if ctx:
            body["context"] = ctx
        return body

    def build(
        self,
        on_log: Callable[[str], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> TemplateInfo:
        """Build on the server, streaming its log (``on_log`` gets output text, ``on_event`` every
        event). Returns the template; raises :class:`BuildError` (with the failing step's output)."""
        return _stream(
            self._conn, "POST", "/v1/templates", {"json": self.body()}, on_log, on_event, self.name
        )

    # -- management ---------------------------------------------------------------------------
    @staticmethod
    def get(
        name: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> TemplateInfo:
        from cove.sdk.sync import _once

        return _once(_get(name), url, api_key, transport)

    @staticmethod
    def list(
        *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> list[TemplateInfo]:
        from cove.sdk.sync import _once

        return _once(_list(), url, api_key, transport)

    @staticmethod
    def delete(
        name: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> None:
        """A :class:`~cove.errors.Conflict` while sandboxes made from it are alive."""
        from cove.sdk.sync import _once

        _once(_delete(name), url, api_key, transport)

    @staticmethod
    def add_tag(
        name: str, tag: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> TemplateInfo:
        from cove.sdk.sync import _once

        return _once(_tag(name, tag), url, api_key, transport)

    @staticmethod
    def import_image(
        path: str | os.PathLike[str],
        name: str,
        *,
        start_cmd: str | None = None,
        ready: str | None = None,
        tags: Iterable[str] = (),
        on_log: Callable[[str], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        url: str | None = None,
        api_key: str | None = None,
        transport: Any = None,
    ) -> TemplateInfo:
        """Import an OCI image layout or ``docker save`` tarball (a local file) as template ``name``."""
        params: list[tuple[str, str]] = [("name", name), *(("tags", t) for t in tags)]
        if start_cmd:
            params.append(("start_cmd", start_cmd))
        if ready:
            params.append(("ready", ready))

        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        kwargs = {"params": params, "content": chunks(), "headers": {"Content-Type": "application/x-tar"}}
        return _stream(
            (url, api_key, transport), "POST", "/v1/templates/import", kwargs, on_log, on_event, name
        )


def _plain(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Files and directories only (the server refuses links and devices in a context)."""
    return ti if (ti.isfile() or ti.isdir()) else None


def _stream(
    conn: tuple[str | None, str | None, Any],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    on_log: Callable[[str], None] | None,
    on_event: Callable[[dict[str, Any]], None] | None,
    name: str,
) -> TemplateInfo:
    config = Config.resolve(*conn)
    call = Call(method, path)
    timeout = httpx.Timeout(connect=10, read=None, write=None, pool=10)
    try:
        with (
            httpx.Client(**config.client_kwargs()) as http,
            http.stream(method, path, timeout=timeout, **kwargs) as resp,
        ):
            if resp.status_code >= 400:
                check_response(resp.status_code, resp.read(), call, config)
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if on_event:
                    on_event(event)
                if event["type"] == "log" and on_log:
                    on_log(event["data"])
                elif event["type"] == "error":
                    raise BuildError(
                        event["message"], event.get("step"), event.get("output") or "", event["code"]
                    )
                elif event["type"] == "done":
                    break
    except httpx.TransportError as e:
        raise transport_error(e, call, config) from e
    from cove.sdk.sync import _once

    return _once(_get(name), *conn)
