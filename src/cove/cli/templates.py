"""``cove template build|import|ls|inspect|tag|rm`` (docs/templates.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from cove.cli._ui import connection, err, fail, friendly, out
from cove.sdk.templates import BuildError, Template, TemplateInfo

template_app = typer.Typer(
    help="Templates: root filesystems with defaults, built by the server (cove create --template NAME).",
    no_args_is_help=True,
)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


class BuildView:
    """The build as it goes: one line per step (spinner, cached or done with its time), the running
    step's latest output lines beneath it."""

    def __init__(self, quiet: bool) -> None:
        self.rows: list[list[Any]] = []  # [description, status, seconds]
        self.tail: list[str] = []
        self.quiet = quiet
        self.started = time.monotonic()
        self.live: Live | None = None

    def render(self) -> Any:
        table = Table.grid(padding=(0, 1))
        for desc, status, secs in self.rows:
            mark: Any = {
                "cached": Text("cached", "cyan"),
                "done": Text("done", "green"),
                "failed": Text("failed", "red"),
            }.get(status) or Spinner("dots")
            table.add_row(mark, Text(desc[:110]), Text(f"{secs:.1f}s" if secs is not None else "", "dim"))
        if self.tail and not self.quiet:
            for line in self.tail[-6:]:
                table.add_row("", Text("  " + line[:140], "dim"), "")
        return table

    def event(self, e: dict[str, Any]) -> None:
        kind = e["type"]
        if kind == "step":
            if self.rows and self.rows[-1][1] == "running" and e.get("step") is not None:
                self.rows[-1][1] = "done"
            self.rows.append([e["description"], "cached" if e.get("cached") else "running", None])
            self.tail = []
        elif kind == "step_done" and self.rows:
            self.rows[-1][1] = "cached" if e.get("cached") else "done"
            self.rows[-1][2] = e.get("seconds")
        elif kind == "log":
            self.tail.extend(x for x in e["data"].replace("\r", "\n").splitlines() if x.strip())
            self.tail = self.tail[-50:]
        elif kind == "error" and self.rows:
            if self.rows[-1][1] == "running":
                self.rows[-1][1] = "failed"
            self.tail = []
        elif kind == "done" and self.rows and self.rows[-1][1] == "running":
            self.rows[-1][1] = "done"
        if self.live:
            self.live.update(self.render())


def _show(info: TemplateInfo) -> None:
    out.print(f"[bold]{escape(info.name)}[/]  {info.state}  from {escape(info.base)}  {_size(info.size)}")
    if info.tags:
        out.print("tags: " + ", ".join(escape(t) for t in info.tags))
    out.print(f"user {escape(str(info.user))}, workdir {escape(str(info.workdir))}")
    if info.env:
        out.print("env: " + " ".join(escape(f"{k}={v}") for k, v in info.env.items()))
    if info.start:
        warm = "warm: restored already running" if info.warm else "cold: started at each create"
        out.print(f"start: {escape(info.start['cmd'])} ({warm})")
    table = Table("LAYER", "SIZE", "STEP", box=None)
    by_layer = {s.get("layer"): s.get("description", "") for s in info.steps}
    own = {s.get("layer") for s in info.steps if s.get("layer")}
    for i, layer in enumerate(info.layers):
        if layer["id"] in by_layer:
            desc = by_layer[layer["id"]]
        elif info.warm and i == len(info.layers) - 1:
            desc = "start command, with its memory"
        else:
            desc = "" if own & {x["id"] for x in info.layers[:i]} else f"from {info.base}"
        table.add_row(escape(layer["id"]), _size(layer["size"]), escape(desc))
    out.print(table)


def _run_build(build: Any, quiet: bool) -> TemplateInfo:
    view = BuildView(quiet)
    try:
        with Live(view.render(), console=err, refresh_per_second=8, transient=False) as live:
            view.live = live
            info = build(view.event)
    except BuildError as e:
        err.print(f"[red]build failed:[/] {escape(e.message)}")
        if e.output:
            err.print("[bold]output of the failing step (last lines):[/]")
            err.print(escape("\n".join(e.output.rstrip().splitlines()[-30:])))
        raise typer.Exit(1) from None
    out.print(f"built {escape(info.name)} in {time.monotonic() - view.started:.1f}s ({_size(info.size)})")
    return info


@template_app.command("build")
@friendly
def template_build(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Template name (a-z, 0-9, . _ -).")],
    file: Annotated[Path, typer.Option("--file", "-f", help="The Dockerfile.")] = Path("Dockerfile"),
    context: Annotated[
        Path | None,
        typer.Option("--context", "-c", help="COPY sources \\[default: the Dockerfile's dir]."),
    ] = None,
    build_arg: Annotated[
        list[str] | None, typer.Option("--build-arg", help="ARG value NAME=VALUE (repeat).")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="Also name it NAME:TAG (repeat).")
    ] = None,
    ready: Annotated[
        str | None, typer.Option("--ready", help="A shell command that exits 0 once CMD serves.")
    ] = None,
    cold: Annotated[
        bool, typer.Option("--cold", help="Start CMD at each create instead of sealing it running.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Steps only, no output lines.")] = False,
) -> None:
    """Build a template from a Dockerfile (cove's subset; see docs/templates.md) with a live view
    of its steps; a step whose input is unchanged is reused from cache.

    [bold]Example:[/]  [cyan]cove template build tools -f Dockerfile --tag v1; cove create --template tools[/]
    """
    if not file.is_file():
        fail(f"no Dockerfile at {file}")
    args = {}
    for pair in build_arg or []:
        k, sep, v = pair.partition("=")
        if not sep:
            fail(f"--build-arg must be NAME=VALUE, got {pair!r}")
        args[k] = v
    from cove.templates.dockerfile import DockerfileError, parse

    try:
        parsed = parse(file.read_text(), args)
    except DockerfileError as e:
        fail(str(e))
    tpl = Template.from_dockerfile(name, file, context, args, **connection(ctx).auth()).tag(*(tag or []))
    if parsed.start_cmd and (ready or cold):
        tpl.start_cmd(parsed.start_cmd, ready=ready, warm=not cold)
    _run_build(lambda on_event: tpl.build(on_event=on_event), quiet)


@template_app.command("import")
@friendly
def template_import(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Template name.")],
    image: Annotated[
        Path, typer.Argument(metavar="IMAGE.tar", help="An OCI image layout or `docker save` tarball.")
    ],
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t")] = None,
) -> None:
    """Import an image from a local file (no registry): its layers, whiteouts honoured, and its
    Env, WorkingDir, User and command.

    [bold]Example:[/]  [cyan]docker save myimage > img.tar; cove template import myimage img.tar[/]
    """
    if not image.is_file():
        fail(f"no such file: {image}")
    _run_build(
        lambda on_event: Template.import_image(
            image, name, tags=tag or [], on_event=on_event, **connection(ctx).auth()
        ),
        quiet=False,
    )


@template_app.command("ls")
@friendly
def template_ls(ctx: typer.Context) -> None:
    """List your templates (and builds in progress).

    [bold]Example:[/]  [cyan]cove template ls[/]
    """
    table = Table("NAME", "STATE", "FROM", "SIZE", "LAYERS", "START", box=None)
    for t in Template.list(**connection(ctx).auth()):
        start = ("warm" if t.warm else "cold") if t.start else ""
        table.add_row(escape(t.name), t.state, escape(t.base), _size(t.size), str(len(t.layers)), start)
    out.print(table)


@template_app.command("inspect")
@friendly
def template_inspect(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """A template's layers with their sizes and steps, its defaults and start command.

    [bold]Example:[/]  [cyan]cove template inspect tools[/]
    """
    _show(Template.get(name, **connection(ctx).auth()))


@template_app.command("tag")
@friendly
def template_tag(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    tag: Annotated[str, typer.Argument(metavar="TAG")],
) -> None:
    """Name this build NAME:TAG too; the tag stays on it when NAME is rebuilt.

    [bold]Example:[/]  [cyan]cove template tag tools v1; cove create --template tools:v1[/]
    """
    info = Template.add_tag(name, tag, **connection(ctx).auth())
    out.print(escape(info.name))


@template_app.command("rm")
@friendly
def template_rm(ctx: typer.Context, names: Annotated[list[str], typer.Argument(metavar="NAME...")]) -> None:
    """Delete templates (refused while sandboxes made from one are alive).

    [bold]Example:[/]  [cyan]cove template rm tools[/]
    """
    for name in names:
        Template.delete(name, **connection(ctx).auth())
        out.print(f"deleted {escape(name)}")


def register(app: typer.Typer) -> None:
    app.add_typer(template_app, name="template")
