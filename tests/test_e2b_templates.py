"""e2b's Template SDK (builder, file uploads, build logs, tags) building cove templates, with the
unmodified `e2b` SDK configured only by the `e2b_env` fixture."""

from __future__ import annotations

import uuid
from pathlib import Path

import e2b
import pytest
from e2b import Sandbox, Template, wait_for_port

from conftest import Server


def test_template_build_copy_run_env_workdir_start(
    e2b_env: Server, tmp_path: Path, sandboxes: list[str]
) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print('hi from app')\n")
    (tmp_path / "notes.txt").write_text("my notes")
    name = f"e2b-tpl-{uuid.uuid4().hex[:8]}"
    template = (
        Template(file_context_path=str(tmp_path))
        .from_base_image()
        .copy("notes.txt", "/home/user/")
        .copy("app", "/home/user/app")
        .run_cmd("echo built > /home/user/built.txt")
        .run_cmd("touch /opt/made-by-root", user="root")
        .set_envs({"GREETING": "hello"})
        .set_workdir("/home/user/app")
        .set_start_cmd("python3 -m http.server 8080", wait_for_port(8080))
    )
    logs: list[e2b.LogEntry] = []
    info = Template.build(template, name, tags=["v1"], on_build_logs=logs.append)
    assert info.template_id == name and "v1" in info.tags
    messages = [str(entry.message) for entry in logs]
    assert any("RUN echo built" in m for m in messages), messages
    assert Template.exists(name)

    for ref in (name, f"{name}:v1"):
        sb = Sandbox.create(ref, timeout=60)
        sandboxes.append(sb.sandbox_id)
        assert sb.files.read("/home/user/notes.txt") == "my notes"
        assert sb.commands.run("python3 main.py").stdout == "hi from app\n"  # in the workdir
        assert sb.commands.run("echo $GREETING").stdout == "hello\n"
        assert (
            sb.commands.run("cat /home/user/built.txt && stat -c %U /opt/made-by-root").stdout
            == "built\nroot\n"
        )
        # The start command was running when the template was sealed, and is ready at once.
        fetch = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080').status)\""
        assert sb.commands.run(fetch).stdout == "200\n"

    # Tags: more of them, listed, removed.
    assigned = Template.assign_tags(f"{name}:v1", ["stable", "prod"])
    assert sorted(assigned.tags) == ["prod", "stable"]
    assert {t.tag for t in Template.get_tags(name)} == {"v1", "stable", "prod"}
    sb = Sandbox.create(f"{name}:stable", timeout=60)
    sandboxes.append(sb.sandbox_id)
    assert sb.files.read("/home/user/notes.txt") == "my notes"
    Template.remove_tags(name, ["prod"])
    assert {t.tag for t in Template.get_tags(name)} == {"v1", "stable"}

    # A second build uploads nothing: the files are known by their hash.
    again: list[e2b.LogEntry] = []
    Template.build(template, name, on_build_logs=again.append)
    assert any("already cached" in str(e.message) for e in again), [str(e.message) for e in again]


def test_template_build_failures_are_clear(e2b_env: Server, tmp_path: Path) -> None:
    name = f"e2b-bad-{uuid.uuid4().hex[:8]}"
    failing = Template().from_template("base").run_cmd("echo about to fail && exit 3")
    with pytest.raises(e2b.BuildException) as e:
        Template.build(failing, name)
    assert "exit" in str(e.value) or "3" in str(e.value), str(e.value)
    assert not Template.exists(name)
    # The SDK's apt_install over the base template's read-only /usr: cove says what it needs.
    with pytest.raises(e2b.BuildException, match="debian"):
        Template.build(Template().from_base_image().apt_install(["curl"]), name)
    with pytest.raises(e2b.BuildException, match="does not pull images"):
        Template.build(Template().from_image("python:3.11").run_cmd("true"), name)
    with pytest.raises(e2b.BuildException, match="unknown base"):
        Template.build(Template().from_template("no-such-template-here").run_cmd("true"), name)
