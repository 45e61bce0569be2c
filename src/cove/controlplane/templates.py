"""Templates: build (steps in build sandboxes, one cached layer each), import, list, tag, delete.

A build (docs/templates.md):
1. resolves its base to a layer chain and a config (`base`, `debian:<suite>`, a template, a snapshot);
2. runs each layer step in a fresh *build sandbox* over the chain so far (egress open, root), then
   seals the sandbox's writable layer as a committed layer named by (parent, step) — `tpl-<digest>`.
   A step whose layer already exists is not run again: a changed step rebuilds only from there;
3. with a start command, starts it in one more sandbox, waits for its ready check, and seals that
   sandbox with its memory (CRIU): sandboxes from the template restore it, service already up;
4. records the template (layers, config, sizes) as `ready`, replacing an older one of that name.
A failure at any point removes the half-built record, kills the build sandbox and collects the
layers nothing else uses. Every event of a build is a dict, streamed to the client as NDJSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import re
import secrets
import shlex
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cove.controlplane.auth import Caller
from cove.controlplane.build_egress import build_policy
from cove.controlplane.errors import ApiError, not_found
from cove.controlplane.fleet import Fleet
from cove.controlplane.layer_refs import LayerRefs
from cove.controlplane.sources import Sources, runtime_config
from cove.controlplane.starter import Starter, new_sandbox_id
from cove.node.base import Limits, NodeError, TemplateSpec, new_layer_id
from cove.node.guest_client import GuestClient, GuestError, GuestUnavailable
from cove.storage import debian_base, oci
from cove.store.base import Store, TemplateRecord
from cove.templates import steps as stepmod

log = logging.getLogger("cove.templates")

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
TAG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
BUILD_LIMITS = Limits(memory_mb=2048, pids=4096)
OUTPUT_TAIL = 8000  # characters of a failing step's output kept in its error
Event = dict[str, Any]


class BuildFailed(Exception):
    def __init__(self, message: str, step: int | None = None, output: str = "") -> None:
        super().__init__(message)
        self.step, self.output = step, output


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class Templates:
    """Builds and records templates; one per server, beside the sandbox service."""

    def __init__(
        self, store: Store, fleet: Fleet, starter: Starter, sources: Sources, refs: LayerRefs
    ) -> None:
        self.store = store
        self.fleet = fleet
        # Builds run on this server's node, and their layers stay there (docs/fleet.md).
        self.node = fleet.local
        self.starter = starter
        self.sources = sources
        self.refs = refs
        self._building: set[tuple[str, str]] = set()

    # -- lookups ---------------------------------------------------------------------------
    async def get(self, who: Caller, name: str) -> TemplateRecord:
        rec = await self.store.get_template(who.tenant, name)
        if rec is None:
            raise not_found("template", name)
        return rec

    async def list(self, who: Caller) -> list[TemplateRecord]:
        return await self.store.list_templates(who.tenant)

    def _here(self, ref: str, node_id: str) -> None:
        """409 unless a base's layers are on this server's node, where the build runs."""
        if node_id not in ("", self.fleet.id):
            raise ApiError(
                409,
                "not_supported",
                f"the base {ref!r} is kept on node {node_id}: build from it through that node's server",
            )

    # -- bases -----------------------------------------------------------------------------
    async def _base(
        self, who: Caller, ref: str, log_: Callable[[str], None]
    ) -> tuple[list[str], dict[str, Any]]:
        """The layers and config of what a build starts from."""
        base = await self.node.base_template()
        if ref == base.name:
            return list(base.layers), dict(base.config)
        try:
            suite = debian_base.parse_ref(ref)
        except debian_base.DebianError as e:
            raise ApiError(404, "template_not_found", str(e)) from e
        if suite:
            try:
                layer = await self.node.snapshots.templates.debian(suite, log_)
            except debian_base.DebianError as e:
                raise BuildFailed(str(e)) from e
            return [layer], dict(debian_base.CONFIG)
        rec = await self.store.get_template(who.tenant, ref)
        if rec is not None:
            self._here(ref, rec.node_id)
            return list(rec.layers), {k: v for k, v in rec.config.items() if k not in ("checkpoint", "start")}
        snaps = [s for s in await self.sources.snapshots(who) if ref in (s.id, s.name)]
        if snaps:
            snap = max(snaps, key=lambda s: s.created_at)
            self._here(ref, snap.node_id)
            cfg = {
                **(snap.config.get("template_config") or base.config),
                "env": snap.config.get("env", {}),
                "user": snap.config.get("user"),
                "workdir": snap.config.get("workdir"),
            }
            return list(snap.layers), cfg
        raise ApiError(
            404,
            "template_not_found",
            f"unknown base {ref!r}: not `base`, a Debian base (debian:bookworm), one of your templates "
            "or a snapshot",
        )

    def _check_base_kind(self, base_ref: str, steps: list[dict[str, Any]], full_root: bool) -> None:
        if full_root:
            return
        for i, s in enumerate(steps):
            if s["type"] == "apt" or (s["type"] == "npm" and s.get("global")):
                what = "apt_install" if s["type"] == "apt" else "a global npm install"
                raise ApiError(
                    422,
                    "needs_full_root",
                    f"step {i + 1}: {what} needs a root with its own /usr, but {base_ref!r} shares the "
                    "host's read-only /usr: build from debian:bookworm (or a template made from it)",
                )

    # -- build -----------------------------------------------------------------------------
    async def build(
        self,
        who: Caller,
        name: str,
        base_ref: str,
        steps: list[dict[str, Any]],
        start: dict[str, Any] | None,
        tags: list[str],
        context: bytes | None,
        image: Path | None = None,
        step_timeout: float = 1800,
    ) -> AsyncIterator[Event]:
        """Validate (raising ApiError before any event), then return the build's event stream."""
        if not NAME.match(name):
            raise ApiError(422, "validation_error", f"template name {name!r}: use a-z, 0-9, . _ - (≤ 63)")
        for t in tags:
            if not TAG.match(t):
                raise ApiError(422, "validation_error", f"tag {t!r}: use a-z, 0-9, . _ - (≤ 64)")
        if name == (await self.node.base_template()).name or name == "debian":
            raise ApiError(422, "validation_error", f"{name!r} is a built-in base: choose another name")
        try:
            steps = stepmod.validate(steps)
        except stepmod.StepError as e:
            raise ApiError(422, "invalid_step", str(e)) from e
        ctx_dir = await asyncio.to_thread(_unpack_context, context) if context else None
        try:
            for i, s in enumerate(steps):
                if s["type"] == "copy" and (ctx_dir is None or not (ctx_dir / s["src"]).exists()):
                    raise ApiError(
                        422,
                        "copy_source_missing",
                        f"step {i + 1}: COPY {s['src']}: no such file in the build context",
                    )
            if image is None and base_ref != "base" and not base_ref.startswith("debian:"):
                await self._base(who, base_ref, lambda _: None)  # unknown bases: 404 before streaming
            elif base_ref.startswith("debian:"):
                try:
                    debian_base.parse_ref(base_ref)
                except debian_base.DebianError as e:
                    raise ApiError(404, "template_not_found", str(e)) from e
            full = base_ref.startswith("debian:") or image is not None
            if not full and base_ref != "base":
                full = (await self._base(who, base_ref, lambda _: None))[1].get("rootfs") == "full"
            self._check_base_kind(base_ref, steps, full)
            key = (who.tenant, name)
            if key in self._building:
                raise ApiError(409, "conflict", f"template {name!r} is being built already")
        except BaseException:
            if ctx_dir:
                await asyncio.to_thread(_rmtree, ctx_dir.parent)
            raise
        self._building.add(key)
        return self._run(who, name, base_ref, steps, start, tags, ctx_dir, image, step_timeout)

    async def _run(
        self,
        who: Caller,
        name: str,
        base_ref: str,
        steps: list[dict[str, Any]],
        start: dict[str, Any] | None,
        tags: list[str],
        ctx_dir: Path | None,
        image: Path | None,
        step_timeout: float,
    ) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        build = _Build(self, who, name, queue.put_nowait, step_timeout)
        task = asyncio.create_task(build.run(base_ref, steps, start, tags, ctx_dir, image))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
            await task  # re-raises nothing: run() reports its own errors as events
        finally:
            if not task.done():
                task.cancel()  # the client went away: the build stops and cleans up
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._building.discard((who.tenant, name))
            if ctx_dir:
                await asyncio.to_thread(_rmtree, ctx_dir.parent)

    # -- tags and deletion -----------------------------------------------------------------
    async def tag(self, who: Caller, name: str, tag: str) -> TemplateRecord:
        if not TAG.match(tag):
            raise ApiError(422, "validation_error", f"tag {tag!r}: use a-z, 0-9, . _ - (≤ 64)")
        rec = await self.get(who, name)
        alias = f"{name.split(':', 1)[0]}:{tag}"
        old = await self.store.get_template(who.tenant, alias)
        now = time.time()
        new = TemplateRecord(
            id="tpl" + secrets.token_hex(8), tenant=who.tenant, name=alias, state="ready", created_at=now,
            updated_at=now, build_id=rec.build_id, layers=rec.layers, config=rec.config, sizes=rec.sizes,
            base=rec.base, steps=rec.steps, node_id=rec.node_id,
        )  # fmt: skip
        await self.store.insert_template(new)
        if old is not None:
            await self._forget(old)
        return new

    async def delete(self, who: Caller, name: str) -> None:
        rec = await self.get(who, name)
        users = await self.store.list_sandboxes(
            who.tenant, ["starting", "running", "paused", "hibernated"], limit=1_000_000
        )
        using = [s.id for s in users.items if s.template == name]
        if using:
            raise ApiError(
                409,
                "template_in_use",
                f"template {name!r} is used by {len(using)} sandbox(es) ({', '.join(using[:5])}): kill them first",
            )
        await self._forget(rec)
        await self.refs.collect()

    async def _forget(self, rec: TemplateRecord) -> None:
        """Drop a record, and its memory checkpoint once no alias shares it."""
        await self.store.delete_template(rec.id)
        ckpt = rec.config.get("checkpoint")
        if ckpt and not any(
            t.config.get("checkpoint") == ckpt for t in await self.store.list_templates(None)
        ):
            await self.node.checkpoints.drop(ckpt)

    async def tags_of(self, who: Caller, rec: TemplateRecord) -> list[str]:
        bare = rec.name.split(":", 1)[0]
        return sorted(
            t.name.split(":", 1)[1]
            for t in await self.store.list_templates(who.tenant)
            if t.build_id == rec.build_id
            and t.state == "ready"
            and ":" in t.name
            and t.name.startswith(bare + ":")
        )

    async def rollback(self) -> None:
        """At start: builds the server died in are removed (their layers get collected). Only this
        node's: another server's build may be running now."""
        for rec in await self.store.list_templates(None):
            if rec.state != "ready" and rec.node_id in ("", self.fleet.id):
                await self.store.delete_template(rec.id)
                log.warning("removed an interrupted template build", extra={"template": rec.name})


class _Build:
    def __init__(
        self, t: Templates, who: Caller, name: str, emit: Callable[[Event], None], step_timeout: float
    ) -> None:
        self.t, self.who, self.name, self.emit = t, who, name, emit
        self.step_timeout = step_timeout
        self.pins: list[str] = []
        self.sandbox: str | None = None
        self.started = time.monotonic()

    def log(self, line: str, index: int | None = None) -> None:
        self.emit({"type": "log", "step": index, "data": line if line.endswith("\n") else line + "\n"})

    def _pin(self, layers: list[str]) -> None:
        self.t.refs.pin(layers)
        self.pins.extend(layers)

    async def run(
        self,
        base_ref: str,
        steps: list[dict[str, Any]],
        start: dict[str, Any] | None,
        tags: list[str],
        ctx_dir: Path | None,
        image: Path | None,
    ) -> None:
        now = time.time()
        rec = TemplateRecord(
            id="tpl" + secrets.token_hex(8), tenant=self.who.tenant, name=self.name, state="building",
            created_at=now, updated_at=now, build_id="b" + secrets.token_hex(8), base=base_ref,
            node_id=self.t.fleet.id,
        )  # fmt: skip
        await self.t.store.insert_template(rec)
        ok = False
        done: Event | None = None
        error: Event | None = None
        try:
            done = await self._build(rec, base_ref, steps, start, tags, ctx_dir, image)
            ok = True
        except asyncio.CancelledError:
            raise
        except BuildFailed as e:
            error = {"code": "build_failed", "message": str(e), "step": e.step, "output": e.output}
        except ApiError as e:
            error = {"code": e.code, "message": e.message, "step": None, "output": ""}
        except (oci.ImageError, NodeError, OSError, GuestError, GuestUnavailable) as e:
            error = {"code": "build_failed", "message": str(e), "step": None, "output": ""}
        except Exception as e:
            log.exception("template build failed")
            error = {"code": "internal", "message": f"{type(e).__name__}: {e}", "step": None, "output": ""}
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._cleanup(rec, ok))
        # After the cleanup: what the client sees next (a failed build's record gone, or the
        # finished template) is settled.
        if error is not None:
            self.emit({"type": "error", **error})
        if done is not None:
            self.emit(done)

    async def _cleanup(self, rec: TemplateRecord, ok: bool) -> None:
        if self.sandbox:
            await self._kill_sandbox()
        if not ok:
            await self.t.store.delete_template(rec.id)
            await self.t.node.checkpoints.drop(f"tplck-{rec.build_id}")
        self.t.refs.unpin(self.pins)
        self.pins = []
        await self.t.refs.collect()

    async def _build(
        self,
        rec: TemplateRecord,
        base_ref: str,
        steps: list[dict[str, Any]],
        start: dict[str, Any] | None,
        tags: list[str],
        ctx_dir: Path | None,
        image: Path | None,
    ) -> Event:
        """Run the build; returns its `done` event (sent once the cleanup is over)."""
        storage = self.t.node.snapshots.templates
        self.emit({"type": "step", "step": None, "total": len(steps), "description": f"FROM {base_ref}"})
        # Layers made here (an import, a Debian base) are on disk before they are pinned: no
        # collection meanwhile (see LayerRefs.making).
        with self.t.refs.making():
            if image is not None:
                from cove.node.template_storage import image_config

                layers, img = await storage.import_image(image, self.log)
                config = image_config(img)
                if img.start_cmd and start is None:
                    start = {"cmd": img.start_cmd, "warm": False}  # an image's CMD: started on create
            else:
                layers, config = await self.t._base(self.who, base_ref, self.log)
            async with self.t.refs.held():
                self._pin(layers)
        full = config.get("rootfs") == "full"
        env: dict[str, str] = dict(config.get("env") or {})
        runtime_user = config.get("user") or "user"
        build_user = "root"
        workdir = config.get("workdir") or "/"
        chain_key = _digest("base", layers)
        done_steps: list[dict[str, Any]] = []
        for i, step in enumerate(steps):
            desc = stepmod.describe(step)
            kind = step["type"]
            if kind == "env":
                env.update(step["env"])
            elif kind == "user":
                build_user = runtime_user = step["user"]
            if kind in stepmod.META_STEPS:
                self.emit(
                    {"type": "step", "step": i, "total": len(steps), "description": desc, "cached": True}
                )
                done_steps.append({**step, "description": desc, "layer": None})
                continue
            if kind == "workdir":
                workdir = step["path"]
            payload = await asyncio.to_thread(_copy_tar, ctx_dir, step) if kind == "copy" else None
            step_digest = _digest(
                step, env, build_user, workdir, runtime_user if kind == "workdir" else None,
                hashlib.sha256(payload).hexdigest() if payload is not None else None,
            )  # fmt: skip
            chain_key = _digest(chain_key, step_digest)
            layer_id = "tpl-" + chain_key[:40]
            t0 = time.monotonic()
            async with self.t.refs.held():
                cached = await storage.has_layer(layer_id)
                if cached:
                    self._pin([layer_id])
            self.emit({"type": "step", "step": i, "total": len(steps), "description": desc, "cached": cached})
            if not cached:
                await self._run_step(
                    i,
                    step,
                    layers,
                    config,
                    env,
                    build_user,
                    runtime_user,
                    workdir,
                    full,
                    payload,
                    layer_id,
                    ctx_dir,
                )
            layers = [*layers, layer_id]
            seconds = round(time.monotonic() - t0, 3)
            self.emit(
                {"type": "step_done", "step": i, "layer": layer_id, "cached": cached, "seconds": seconds}
            )
            done_steps.append(
                {**step, "description": desc, "layer": layer_id, "cached": cached, "seconds": seconds}
            )
        final_config: dict[str, Any] = {
            **runtime_config(config), "env": env, "user": runtime_user, "workdir": workdir,
        }  # fmt: skip
        if start:
            final_config["start"] = {"cmd": start["cmd"], "ready": start.get("ready")}
            want_warm = start.get("warm", True)
            if want_warm and self.t.node.checkpoints.available():
                layers = await self._seal_warm(rec, layers, final_config)
                final_config["checkpoint"] = f"tplck-{rec.build_id}"
            elif want_warm:
                self.log(
                    "no CRIU >= 4.1 on this node: the start command runs at each create (a cold template)"
                )
        sizes = await storage.sizes(layers)
        await self._copy(layers, final_config)
        # Replace the older template of that name (and its tags' records, given anew).
        olds = [
            r for r in await self.t.store.list_templates(self.who.tenant)
            if r.state == "ready" and r.name in (self.name, *(f"{self.name}:{t}" for t in tags))
        ]  # fmt: skip
        rec.layers, rec.config, rec.sizes, rec.steps = layers, final_config, sizes, done_steps
        async with self.t.refs.held():
            await self.t.store.update_template(
                rec.id, state="ready", layers=layers, config=final_config, sizes=sizes, steps=done_steps,
                updated_at=time.time(),
            )  # fmt: skip
        for old in olds:
            await self.t._forget(old)
        for tag in tags:
            await self.t.tag(self.who, self.name, tag)
        return {
            "type": "done",
            "template": {
                "name": self.name,
                "layers": layers,
                "sizes": sizes,
                "warm": "checkpoint" in final_config,
            },
            "seconds": round(time.monotonic() - self.started, 3),
        }

    async def _copy(self, layers: list[str], config: dict[str, Any]) -> None:
        """With an object store, the template's layers (and a warm one's image) go there before it is
        ready: it then starts on any node, which fetches them (docs/object-storage.md)."""
        node = self.t.node
        if not self.t.fleet.settings.object_store or not node.durable.available():
            return
        self.log("copying the template to the object store…")
        try:
            sent = await node.durable.push(layers, checkpoint=config.get("checkpoint"))
        except NodeError as e:  # still a template, kept on this node only
            self.log(f"copying to the object store failed, the template stays on this node: {e}")
            return
        config["durable"] = True
        self.log(f"copied: {sent['bytes_stored'] / 1e6:.1f} MB new in the bucket in {sent['seconds']:.1f} s")

    # -- sandboxes ------------------------------------------------------------------------
    async def _start_sandbox(
        self,
        layers: list[str],
        config: dict[str, Any],
        env: dict[str, str],
        user: str,
        workdir: str,
        egress: bool,
    ) -> tuple[str, dict[str, Any], GuestClient]:
        sid = new_sandbox_id()
        template = TemplateSpec(
            name=f"build:{self.name}", layers=tuple(layers), config=runtime_config(config)
        )
        spec = self.t.starter.spec(sid, template, env, user, workdir, BUILD_LIMITS, egress=egress)
        self.sandbox = sid
        self.handle: dict[str, Any] = {}
        # package registries: builds reach out through the sandbox's egress proxy
        self.handle = await self.t.starter.start(spec, (await build_policy()).as_dict() if egress else None)
        return sid, self.handle, self.t.node.guest(sid)

    async def _kill_sandbox(self) -> None:
        sid, self.sandbox = self.sandbox, None
        if sid is None:
            return
        await self.t.starter.stop(sid, getattr(self, "handle", None))

    async def _exec(
        self, guest: GuestClient, index: int, cmd: str, user: str, workdir: str, env: dict[str, str]
    ) -> None:
        """Run `cmd`, streaming its output as log events; BuildFailed with its tail on a non-zero exit."""
        tail = ""
        end: dict[str, Any] = {}
        async for kind, data in guest.exec(
            cmd=cmd, user=user, cwd=workdir, env=env, timeout=self.step_timeout
        ):
            if kind == "exit":
                end = data  # type: ignore[assignment]
                continue
            text = data.decode(errors="replace")  # type: ignore[union-attr]
            tail = (tail + text)[-OUTPUT_TAIL:]
            self.emit({"type": "log", "step": index, "stream": kind, "data": text})
        if end.get("timed_out"):
            raise BuildFailed(f"step {index + 1} timed out after {self.step_timeout:.0f} s", index, tail)
        if end.get("exit_code") != 0:
            raise BuildFailed(f"step {index + 1} failed with exit code {end.get('exit_code')}", index, tail)

    async def _run_step(
        self,
        index: int,
        step: dict[str, Any],
        layers: list[str],
        config: dict[str, Any],
        env: dict[str, str],
        build_user: str,
        runtime_user: str,
        workdir: str,
        full: bool,
        payload: bytes | None,
        layer_id: str,
        ctx_dir: Path | None,
    ) -> None:
        kind = step["type"]
        egress = kind in ("run", "apt", "pip", "npm")
        cwd = "/" if kind in ("workdir", "copy") else workdir
        try:
            sid, _, guest = await self._start_sandbox(layers, config, env, "root", cwd, egress)
        except (NodeError, OSError) as e:
            raise BuildFailed(f"step {index + 1}: the build sandbox did not start: {e}", index) from e
        if kind == "copy":
            assert payload is not None and ctx_dir is not None
            owner = "0:0"
            if step.get("chown"):
                user, _, group = step["chown"].partition(":")
                owner = await self._ids(guest, index, user, group)
            dst_dir, name = _copy_target(step)
            await guest.write("/tmp/.cove-copy.tar", [payload], user="root")
            cmd = (
                f"set -e; mkdir -p {shlex.quote(dst_dir)}; tar -xf /tmp/.cove-copy.tar -C {shlex.quote(dst_dir)}"
                " --no-overwrite-dir; rm -f /tmp/.cove-copy.tar"
            )
            if owner != "0:0":
                tops = [name] if name else await asyncio.to_thread(_top_names, ctx_dir, step)
                paths = " ".join(shlex.quote(f"{dst_dir.rstrip('/')}/{t}") for t in tops)
                cmd += f"; chown -R {owner} {paths}"
            await self._exec(guest, index, cmd, "root", "/", {})
        else:
            cmd, as_user = stepmod.command(step, full)
            if kind == "workdir":
                cmd += (
                    f" && (chown {shlex.quote(runtime_user)} {shlex.quote(step['path'])} 2>/dev/null || true)"
                )
            user = runtime_user if as_user == stepmod.RUNTIME_USER else as_user or build_user
            await self._exec(guest, index, cmd, user, cwd if kind != "workdir" else "/", env)
        await self.t.starter.close_egress(sid)
        async with self.t.refs.held():
            # Its content-addressed id: an identical step another build committed meanwhile is kept.
            await self.t.node.snapshots.commit(sid, layer_id)
            self._pin([layer_id])
        await self._kill_sandbox()

    async def _ids(self, guest: GuestClient, index: int, user: str, group: str) -> str:
        out = bytearray()
        cmd = f"id -u {user} && " + (f"getent group {group} | cut -d: -f3" if group else f"id -g {user}")
        async for kind, data in guest.exec(cmd=cmd, user="root"):
            if kind == "stdout":
                out += data  # type: ignore[operator]
        nums = out.decode().split()
        if len(nums) != 2:
            raise BuildFailed(f"step {index + 1}: COPY --chown={user}: no such user or group", index)
        return f"{nums[0]}:{nums[1]}"

    async def _seal_warm(self, rec: TemplateRecord, layers: list[str], config: dict[str, Any]) -> list[str]:
        """Start the start command, wait until it is ready, and seal files and memory together."""
        start = config["start"]
        self.emit({"type": "step", "step": None, "description": f"START {start['cmd']}", "cached": False})
        t0 = time.monotonic()
        try:
            sid, handle, guest = await self._start_sandbox(
                layers, config, config["env"], config["user"], config["workdir"], egress=False
            )
        except (NodeError, OSError) as e:
            raise BuildFailed(f"the start sandbox did not start: {e}") from e
        await start_service(guest, start, config, on_log=self.log)
        key = f"tplck-{rec.build_id}"
        async with self.t.refs.held():
            try:
                layer = await self.t.node.checkpoints.snapshot_with_memory(
                    sid, handle, key, new_layer_id("snap")
                )
            except (NodeError, OSError) as e:
                raise BuildFailed(f"sealing the running start command (CRIU) failed: {e}") from e
            self._pin([layer])
        await self._kill_sandbox()
        self.emit(
            {
                "type": "step_done",
                "step": None,
                "layer": layer,
                "cached": False,
                "seconds": round(time.monotonic() - t0, 3),
            }
        )
        return [*layers, layer]


async def start_service(
    guest: GuestClient,
    start: dict[str, Any],
    config: dict[str, Any],
    timeout: float = 60,
    on_log: Callable[[str], None] | None = None,
) -> None:
    """Start a template's start command in the background and wait for its ready check (a shell
    command that exits 0) to pass; BuildFailed (a NodeError for creates) when it does not."""
    proc = await guest.spawn(
        cmd=start["cmd"], user=config.get("user"), cwd=config.get("workdir"), tag="start"
    )
    ready = start.get("ready")
    if not ready:
        return
    deadline = time.monotonic() + timeout
    while True:
        code = None
        async for kind, data in guest.exec(cmd=ready, user=config.get("user"), timeout=10):
            if kind == "exit":
                code = data.get("exit_code")  # type: ignore[union-attr]
        if code == 0:
            return
        procs = {p["id"]: p for p in await guest.processes()}
        info = procs.get(proc["id"], {})
        if info.get("running") is False:
            raise BuildFailed(f"the start command exited (code {info.get('exit_code')}) before it was ready")
        if time.monotonic() > deadline:
            raise BuildFailed(f"the start command was not ready after {timeout:.0f} s (ready check: {ready})")
        if on_log:
            on_log(f"waiting for: {ready}")
        await asyncio.sleep(0.2)


async def start_template_service(guest: GuestClient, rec: Any, start: dict[str, Any]) -> None:
    """A cold template's start command, at create: started, and waited for when it has a ready check."""
    try:
        await start_service(guest, start, {"user": rec.user, "workdir": rec.workdir})
    except (BuildFailed, GuestError, GuestUnavailable) as e:
        raise NodeError(f"template {rec.template}: its start command failed: {e}") from e


# -- build contexts ---------------------------------------------------------------------------


def _unpack_context(data: bytes) -> Path:
    """The client's build context (a tar, maybe gzipped) in a scratch dir; refuses unsafe members."""
    root = Path(tempfile.mkdtemp(prefix="cove-ctx-"))
    ctx = root / "ctx"
    ctx.mkdir()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            _extract_plain(tar, ctx)
    except (tarfile.TarError, OSError) as e:
        _rmtree(root)
        raise ApiError(422, "invalid_context", f"the build context is not a readable tar: {e}") from e
    return ctx


def _extract_plain(tar: tarfile.TarFile, root: Path) -> None:
    """Regular files and directories only, never outside `root` (this Python may predate tarfile's
    extraction filters); symlinks and devices in a context are refused."""
    for m in tar:
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if not parts:
            continue
        if ".." in parts or not (m.isfile() or m.isdir()):
            raise ApiError(
                422, "invalid_context", f"build context member {m.name!r}: only plain files and directories"
            )
        dst = root.joinpath(*parts)
        for parent in reversed(dst.parents):
            if parent != root and root in parent.parents and not parent.is_dir():
                parent.mkdir()
        if m.isdir():
            dst.mkdir(exist_ok=True)
            dst.chmod(m.mode & 0o777 | 0o700)
            continue
        src = tar.extractfile(m)
        assert src is not None
        with open(dst, "wb") as f:
            while chunk := src.read(1 << 20):
                f.write(chunk)
        dst.chmod(m.mode & 0o777)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _copy_target(step: dict[str, Any]) -> tuple[str, str | None]:
    """(directory to extract into, the single name a file is stored under or None for a dir's content)."""
    import posixpath

    dst = step["dst"]
    if dst.endswith("/"):
        return dst.rstrip("/") or "/", None
    return posixpath.dirname(dst) or "/", posixpath.basename(dst)


def _copy_tar(ctx_dir: Path | None, step: dict[str, Any]) -> bytes:
    """A deterministic tar (sorted, mtime 0, root-owned) of what a copy step puts in place."""
    assert ctx_dir is not None
    src = ctx_dir / step["src"]
    _, name = _copy_target(step)
    buf = io.BytesIO()

    def norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        return ti

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if src.is_dir():
            base = name or ""
            if name:
                tar.addfile(norm(tar.gettarinfo(str(src), arcname=name)))
            for p in sorted(src.rglob("*")):
                arc = str(Path(base) / p.relative_to(src)) if base else str(p.relative_to(src))
                ti = norm(tar.gettarinfo(str(p), arcname=arc))
                if ti.isreg():
                    with open(p, "rb") as f:
                        tar.addfile(ti, f)
                else:
                    tar.addfile(ti)
        else:
            ti = norm(tar.gettarinfo(str(src), arcname=name or src.name))
            with open(src, "rb") as f:
                tar.addfile(ti, f)
    return buf.getvalue()


def decode_context(text: str | None) -> bytes | None:
    if not text:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise ApiError(422, "invalid_context", f"context must be base64 (of a tar or tar.gz): {e}") from e


def _top_names(ctx_dir: Path, step: dict[str, Any]) -> list[str]:
    return sorted(p.name for p in (ctx_dir / step["src"]).iterdir())
