"""The ``cove`` CLI against the real server (typer's CliRunner, plus one real subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cove.cli.main import app
from cove.controlplane import auth
from cove.sdk import Sandbox
from cove.store.base import KeyRecord
from cove.store.sqlite import SQLiteStore


@pytest.fixture
def cli_env(server: Any) -> dict[str, str]:
    return {"COVE_URL": server.url, "COVE_API_KEY": server.api_key, "COLUMNS": "200"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def sandbox_id(server: Any) -> Iterator[str]:
    sb = Sandbox.create(url=server.url, api_key=server.api_key, timeout=600)
    yield sb.id
    sb.kill()


def _run(runner: CliRunner, env: dict[str, str], *args: str, input: str | None = None) -> Any:
    return runner.invoke(app, list(args), env=env, input=input, catch_exceptions=False)


def test_help_teaches() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in ("create", "ls", "info", "exec", "cp", "kill", "keys", "serve"):
        assert command in result.stdout
    exec_help = CliRunner().invoke(app, ["exec", "--help"], env={"COLUMNS": "200"})
    assert exec_help.exit_code == 0 and "Example" in exec_help.stdout and "cove exec" in exec_help.stdout


def test_create_ls_info_kill(runner: CliRunner, cli_env: dict[str, str], server: Any) -> None:
    label = uuid.uuid4().hex[:10]
    result = _run(
        runner,
        cli_env,
        "create",
        "--env",
        "A=1",
        "--label",
        f"suite={label}",
        "--label",
        "x=y",
        "--timeout",
        "300",
    )
    assert result.exit_code == 0, result.output
    sandbox_id = result.stdout.strip()
    assert sandbox_id and "\n" not in sandbox_id
    try:
        info = Sandbox.connect(sandbox_id, url=server.url, api_key=server.api_key)
        assert info.info().metadata == {"suite": label, "x": "y"}
        assert info.exec("echo $A").stdout == "1\n"
        info.close()

        ls = _run(runner, cli_env, "ls", "--label", f"suite={label}")
        assert ls.exit_code == 0, ls.output
        assert sandbox_id in ls.stdout and "running" in ls.stdout and f"suite={label}" in ls.stdout
        quiet = _run(runner, cli_env, "ls", "-q", "--label", f"suite={label}", "--state", "running")
        assert quiet.stdout.split() == [sandbox_id]
        as_json = _run(runner, cli_env, "ls", "--json", "--label", f"suite={label}")
        assert [i["id"] for i in json.loads(as_json.stdout)] == [sandbox_id]

        shown = _run(runner, cli_env, "info", sandbox_id)
        assert shown.exit_code == 0, shown.output
        assert sandbox_id in shown.stdout and "running" in shown.stdout and "base" in shown.stdout
        shown_json = _run(runner, cli_env, "info", sandbox_id, "--json")
        data = json.loads(shown_json.stdout)
        assert data["id"] == sandbox_id and data["state"] == "running" and data["metadata"]["suite"] == label
    finally:
        killed = _run(runner, cli_env, "kill", sandbox_id)
    assert killed.exit_code == 0, killed.output
    assert f"killed {sandbox_id}" in killed.stdout
    quiet = _run(runner, cli_env, "ls", "-q", "--label", f"suite={label}", "--state", "running")
    assert quiet.stdout.split() == []


def test_exec_streams_and_propagates_exit_code(
    runner: CliRunner, cli_env: dict[str, str], sandbox_id: str
) -> None:
    ok = _run(runner, cli_env, "exec", sandbox_id, "--", "echo hello; echo oops >&2")
    assert ok.exit_code == 0
    assert ok.stdout == "hello\n"
    assert ok.stderr == "oops\n"

    failed = _run(runner, cli_env, "exec", sandbox_id, "--", "sh", "-c", "echo partial; exit 3")
    assert failed.exit_code == 3
    assert failed.stdout == "partial\n"

    argv = _run(runner, cli_env, "exec", sandbox_id, "--", "printf", "%s|", "a b", "c")
    assert argv.stdout == "a b|c|"

    opts = _run(
        runner,
        cli_env,
        "exec",
        "--cwd",
        "/tmp",
        "-e",
        "X=42",
        "--user",
        "root",
        sandbox_id,
        "--",
        "echo $X; pwd; id -un",
    )
    assert opts.exit_code == 0, opts.output
    assert opts.stdout == "42\n/tmp\nroot\n"

    fed = _run(runner, cli_env, "exec", "-i", sandbox_id, "--", "cat", input="piped in")
    assert fed.stdout == "piped in"

    timed_out = _run(runner, cli_env, "exec", "--timeout", "0.5", sandbox_id, "--", "echo t; sleep 30")
    assert timed_out.exit_code == 124
    assert timed_out.stdout == "t\n"
    assert "timed out" in timed_out.stderr


def test_exec_as_real_process(cli_env: dict[str, str], sandbox_id: str) -> None:
    """The console entry point, in a real process: streams output and exits with the command's code."""
    proc = subprocess.run(
        [sys.executable, "-m", "cove.cli.main", "exec", sandbox_id, "--", "echo out; echo err >&2; exit 42"],
        env={**os.environ, **cli_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 42, proc.stderr
    assert proc.stdout == "out\n" and proc.stderr == "err\n"


def test_cp_both_ways(runner: CliRunner, cli_env: dict[str, str], sandbox_id: str, tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(payload)

    up = _run(runner, cli_env, "cp", str(src), f"{sandbox_id}:/home/user/data.bin")
    assert up.exit_code == 0, up.output
    check = Sandbox(sandbox_id, url=cli_env["COVE_URL"], api_key=cli_env["COVE_API_KEY"])
    assert check.files.stat("/home/user/data.bin").size == len(payload)

    # a directory destination (trailing slash or existing dir) keeps the file name
    up_dir = _run(runner, cli_env, "cp", str(src), f"{sandbox_id}:/tmp/")
    assert up_dir.exit_code == 0, up_dir.output
    assert check.files.stat("/tmp/data.bin").size == len(payload)

    out_file = tmp_path / "back.bin"
    down = _run(runner, cli_env, "cp", f"{sandbox_id}:/home/user/data.bin", str(out_file))
    assert down.exit_code == 0, down.output
    assert out_file.read_bytes() == payload

    out_dir = tmp_path / "dir"
    out_dir.mkdir()
    down_dir = _run(runner, cli_env, "cp", f"{sandbox_id}:/tmp/data.bin", str(out_dir))
    assert down_dir.exit_code == 0, down_dir.output
    assert (out_dir / "data.bin").read_bytes() == payload

    # relative sandbox paths start at the user's home
    text = tmp_path / "note.txt"
    text.write_text("hi there\n")
    assert _run(runner, cli_env, "cp", str(text), f"{sandbox_id}:notes/note.txt").exit_code == 0
    assert check.files.read("/home/user/notes/note.txt") == "hi there\n"
    check.close()

    missing = _run(runner, cli_env, "cp", f"{sandbox_id}:/home/user/nope.txt", str(tmp_path / "x"))
    assert missing.exit_code == 1
    assert "nope.txt" in missing.stderr and "Traceback" not in missing.output
    both_local = _run(runner, cli_env, "cp", str(src), str(tmp_path / "y"))
    assert both_local.exit_code == 1 and "exactly one" in both_local.stderr


def test_readable_errors(runner: CliRunner, cli_env: dict[str, str], server: Any) -> None:
    for args in (["info", "sb-nope"], ["exec", "sb-nope", "--", "true"], ["kill", "sb-nope"]):
        result = _run(runner, cli_env, *args)
        assert result.exit_code == 1, args
        assert "sb-nope" in result.stderr and "not found" in result.stderr
        assert "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1

    bad_key = _run(runner, {**cli_env, "COVE_API_KEY": "wrong"}, "ls")
    assert bad_key.exit_code == 1 and bad_key.stderr.startswith("error:")

    bad_limit = _run(runner, cli_env, "create", "--memory", "1")
    assert bad_limit.exit_code == 1 and "memory_mb" in bad_limit.stderr

    unreachable = _run(runner, {**cli_env, "COVE_URL": "http://127.0.0.1:1"}, "ls")
    assert unreachable.exit_code == 1 and "could not connect" in unreachable.stderr

    # global options win over the environment
    flags = _run(
        runner, {}, "--url", server.url, "--api-key", server.api_key, "ls", "-q", "--label", "none=none"
    )
    assert flags.exit_code == 0, flags.output


def test_keys_create(runner: CliRunner, cli_env: dict[str, str]) -> None:
    name = "cli-" + uuid.uuid4().hex[:8]
    result = _run(runner, cli_env, "keys", "create", "--name", name, "--tenant", "team-cli")
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret and name in result.stderr

    as_tenant = {**cli_env, "COVE_API_KEY": secret}
    ls = _run(runner, as_tenant, "ls", "-q")
    assert ls.exit_code == 0 and ls.stdout.strip() == ""
    forbidden = _run(runner, as_tenant, "keys", "create", "--name", "nope")
    assert forbidden.exit_code == 1 and "error:" in forbidden.stderr

    listed = _run(runner, cli_env, "keys", "ls")
    assert name in listed.stdout


def _stored_key(db_path: Path, secret: str) -> KeyRecord | None:
    async def lookup() -> KeyRecord | None:
        store = SQLiteStore(db_path)
        await store.open()
        try:
            return await store.key_by_hash(auth.hash_key(secret))
        finally:
            await store.close()

    return asyncio.run(lookup())


def test_keys_create_local(runner: CliRunner, server: Any, tmp_path: Path) -> None:
    """A first admin key without one: written into the store under COVE_HOME, not through the API."""
    fresh = _run(runner, {"COVE_HOME": str(tmp_path)}, "keys", "create", "--local", "--admin", "-n", "first")
    assert fresh.exit_code == 0, fresh.output
    rec = _stored_key(tmp_path / "cove.db", fresh.stdout.strip())
    assert rec is not None and rec.admin and rec.name == "first" and rec.tenant == "default"
    assert rec.id in fresh.stderr and "admin key" in fresh.stderr

    # Into the running server's own store: the key is an admin key there at once.
    name = "local-" + uuid.uuid4().hex[:8]
    made = _run(runner, {"COVE_HOME": str(server.home)}, "keys", "create", "--local", "--admin", "-n", name)
    assert made.exit_code == 0, made.output
    as_admin = {"COVE_URL": server.url, "COVE_API_KEY": made.stdout.strip(), "COLUMNS": "200"}
    listed = _run(runner, as_admin, "keys", "ls")
    assert listed.exit_code == 0 and name in listed.stdout, listed.output
    key_id = next(line.split()[0] for line in listed.stdout.splitlines() if name in line)
    assert _run(runner, as_admin, "keys", "rm", key_id).exit_code == 0

    # No key at all, as root where the store is: `keys create --admin` writes into it (the newcomer's way).
    implied = _run(runner, {"COVE_HOME": str(tmp_path), "COVE_API_KEY": ""}, "keys", "create", "--admin")
    assert implied.exit_code == 0, implied.output
    rec = _stored_key(tmp_path / "cove.db", implied.stdout.strip())
    assert rec is not None and rec.admin and rec.name == "admin"

    # Through the API without a key, and no store here: the error says how to get one.
    empty = tmp_path / "empty"
    no_key = _run(
        runner,
        {"COVE_URL": server.url, "COVE_API_KEY": "", "COVE_HOME": str(empty)},
        "keys",
        "create",
        "-n",
        "x",
    )
    assert no_key.exit_code == 1 and "--local" in no_key.stderr


def test_kernel_build_finds_the_servers_environment(
    runner: CliRunner, server: Any, kernel_ready: None
) -> None:
    """Once built (the server built it here), `cove kernel build` returns at once with its path."""
    cache = Path(server.env["COVE_KERNEL_CACHE"])
    done = _run(runner, {"COVE_KERNEL_CACHE": str(cache)}, "kernel", "build")
    assert done.exit_code == 0, done.output
    path = Path(done.stdout.strip())
    assert path.is_relative_to(cache) and (path / "bin" / "python").exists()


def test_doctor_reports_host_support() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "cove", "doctor"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("user namespaces", "overlayfs", "cgroups", "seccomp", "host nftables"):
        assert name in done.stdout


def test_doctor_reports_tables_a_killed_criu_left() -> None:
    """In a network namespace of the test's own, with a table shaped like the one a killed CRIU leaves."""
    import subprocess
    import sys

    script = f"nft add table inet CRIU-0123abcd-test && {sys.executable} -m cove doctor"
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if "host nftables" in ln)
    assert "1 left by killed CRIU dumps" in line and "CRIU-0123abcd-test" in line, line


def test_pause_and_resume(runner: CliRunner, cli_env: dict[str, str], sandbox_id: str) -> None:
    paused = _run(runner, cli_env, "pause", sandbox_id)
    assert paused.exit_code == 0 and "paused" in paused.output
    resumed = _run(runner, cli_env, "resume", sandbox_id)
    assert resumed.exit_code == 0 and "running" in resumed.output


def test_snapshot_fork_hibernate_commands(
    runner: CliRunner, cli_env: dict[str, str], sandbox_id: str
) -> None:
    snap = _run(runner, cli_env, "snapshot", sandbox_id, "--name", "cli-snap")
    assert snap.exit_code == 0, snap.output
    snap_id = snap.output.strip()
    listed = _run(runner, cli_env, "snapshots", "ls")
    assert snap_id in listed.output and "cli-snap" in listed.output
    created = _run(runner, cli_env, "create", "--snapshot", snap_id)
    assert created.exit_code == 0
    forked = _run(runner, cli_env, "fork", sandbox_id, "-n", "2")
    assert forked.exit_code == 0 and len(forked.output.split()) == 2
    _run(runner, cli_env, "kill", created.output.strip(), *forked.output.split())
    hib = _run(runner, cli_env, "hibernate", sandbox_id)
    assert hib.exit_code == 0 and "hibernated" in hib.output
    assert _run(runner, cli_env, "snapshots", "rm", snap_id).exit_code == 0
    missing = _run(runner, cli_env, "snapshots", "rm", snap_id)
    assert missing.exit_code == 1 and "not found" in missing.output


def test_port_and_file_urls(runner: CliRunner, cli_env: dict[str, str], sandbox_id: str, server: Any) -> None:
    result = _run(runner, cli_env, "port", sandbox_id, "8000", "--by", "path", "--path", "/x")
    assert result.exit_code == 0, result.output
    url = result.output.strip()
    assert url.startswith(f"{server.url}/v1/sandboxes/{sandbox_id}/ports/8000/x?cove_token=")
    # Nothing listens on 8000: the signed URL gets through to the sandbox, which has nothing there.
    r = httpx.get(url)
    assert r.status_code == 502 and "port is not open" in r.text
    bad = _run(runner, cli_env, "port", sandbox_id, "8000", "--by", "nowhere")
    assert bad.exit_code != 0 and "--by" in bad.output

    _run(runner, cli_env, "exec", sandbox_id, "--", "sh", "-c", "echo shared > /home/user/s.txt")
    down = _run(runner, cli_env, "file-url", sandbox_id, "/home/user/s.txt")
    assert down.exit_code == 0, down.output
    assert httpx.get(down.output.strip()).text == "shared\n"
    up = _run(runner, cli_env, "file-url", sandbox_id, "/home/user/t.txt", "--upload", "--expires", "60")
    assert httpx.put(up.output.strip(), content=b"sent").status_code == 200
    assert _run(runner, cli_env, "exec", sandbox_id, "--", "cat", "/home/user/t.txt").output == "sent"
