"""Templates (docs/templates.md): real builds in build sandboxes, checked inside sandboxes made from them.

The Debian base is debootstrapped once per host into COVE_DEBIAN_CACHE (the test server uses
/var/cache/cove-test-debian), and apt/pip fetch tiny packages from the real registries.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cove import BuildError, Sandbox, Template
from cove.cli.main import app
from cove.devserver import Server, leaks
from cove.errors import Conflict, InvalidArgument, InvalidRequest, NotFound
from cove.node import checkpoint
from cove.templates import dockerfile

DOCKERFILE = """\
# a comment
ARG GREETING=hello
FROM base
ENV APP_MODE=test \\
    GREETING=${GREETING}
WORKDIR /home/user/app
COPY app.txt ./
COPY conf /etc/myapp/
RUN echo "$GREETING from $(id -un)" > built.txt && echo "${GREETING:-unset}" > shell-expanded.txt
USER user
RUN whoami > whoami.txt
CMD ["python3", "-m", "http.server", "8123"]
"""


def conn(server: Server) -> dict[str, Any]:
    return {"url": server.url, "api_key": server.api_key}


def layers_on_disk(server: Server) -> set[str]:
    return {p.name for p in (server.home / "storage" / "layers").iterdir() if not p.name.startswith(".")}


def run(sb: Sandbox, cmd: str) -> str:
    result = sb.exec(cmd)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_dockerfile_subset_parses_and_refuses() -> None:
    parsed = dockerfile.parse(DOCKERFILE, {"GREETING": "hi"})
    assert parsed.base == "base"
    assert parsed.start_cmd == "python3 -m http.server 8123"
    assert {"type": "env", "env": {"APP_MODE": "test", "GREETING": "hi"}} in parsed.steps
    assert {"type": "copy", "src": "app.txt", "dst": "/home/user/app/"} in parsed.steps
    with pytest.raises(dockerfile.DockerfileError, match="line 3: EXPOSE is not supported"):
        dockerfile.parse("FROM base\nRUN true\nEXPOSE 80\n")
    with pytest.raises(dockerfile.DockerfileError, match="multi-stage"):
        dockerfile.parse("FROM base\nFROM base\n")
    with pytest.raises(dockerfile.DockerfileError, match="--from is not supported"):
        dockerfile.parse("FROM base\nCOPY --from=x a /b\n")


def test_dockerfile_build_tags_and_use(server: Server, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "app.txt").write_text("the app\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.conf").write_text("x=1\n")
    events: list[dict[str, Any]] = []
    tpl = Template.from_dockerfile(
        "dock", tmp_path / "Dockerfile", build_args={"GREETING": "hi"}, **conn(server)
    )
    info = tpl.tag("v1").build(on_event=events.append)
    assert info.state == "ready" and info.tags == ["v1"] and info.user == "user"
    assert info.workdir == "/home/user/app" and info.env["APP_MODE"] == "test"
    assert info.start and info.start["cmd"] == "python3 -m http.server 8123" and not info.warm
    assert next(e["description"] for e in events if e["type"] == "step") == "FROM base"
    assert all(layer["size"] >= 0 for layer in info.layers) and info.size > 0
    try:
        with Sandbox.create(template="dock:v1", **conn(server)) as sb:
            assert run(sb, "pwd").strip() == "/home/user/app"
            assert run(sb, "cat app.txt built.txt whoami.txt /etc/myapp/a.conf shell-expanded.txt") == (
                "the app\nhi from root\nuser\nx=1\nhi\n"
            )
            assert run(sb, "echo $APP_MODE").strip() == "test"
            # CMD without a ready check, not sealed warm: started at create.
            deadline = time.monotonic() + 10
            while "8123" not in run(
                sb, "cat /proc/net/tcp /proc/net/tcp6 | awk '{print $2}'"
            ).upper().replace(":1FBB", ":8123"):
                assert time.monotonic() < deadline, "the template's CMD did not start"
                time.sleep(0.2)
            with pytest.raises(Conflict, match="used by 1 sandbox"):
                Template.delete("dock:v1", **conn(server))
    finally:
        Template.delete("dock:v1", **conn(server))
        Template.delete("dock", **conn(server))
    assert not [t for t in Template.list(**conn(server)) if t.name.startswith("dock")]


@pytest.mark.slow
def test_debian_apt_pip_and_layer_cache(server: Server) -> None:
    """apt and pip from the real registries on a debootstrapped Debian root; a rebuild with the last
    step changed reuses every earlier layer (same ids, `cached`) and rebuilds only that one."""

    def tpl(marker: str) -> Template:
        return (
            Template("deb", **conn(server))
            .from_base("debian:bookworm")
            .apt_install(["tree"])
            .pip_install(["six"])
            .run(f"echo {marker} > /etc/marker")
        )

    first: list[dict[str, Any]] = []
    info1 = tpl("v1").build(on_event=first.append)
    second: list[dict[str, Any]] = []
    t0 = time.monotonic()
    info2 = tpl("v2").build(on_event=second.append)
    rebuild_s = time.monotonic() - t0
    try:
        done1 = [e for e in first if e["type"] == "step_done"]
        done2 = [e for e in second if e["type"] == "step_done"]
        print(f"first build steps: {[(e['layer'][:16], e['seconds']) for e in done1]}")
        print(f"rebuild ({rebuild_s:.2f}s): {[(e['layer'][:16], e['cached'], e['seconds']) for e in done2]}")
        assert [e["cached"] for e in done2] == [True, True, False]
        assert [e["layer"] for e in done2[:2]] == [e["layer"] for e in done1[:2]]
        assert done2[2]["layer"] != done1[2]["layer"]
        assert [x["id"] for x in info2.layers[:3]] == [x["id"] for x in info1.layers[:3]]
        assert info1.layers[-1]["id"] not in layers_on_disk(server)  # the replaced build's own layer is gone
        with Sandbox.create(template="deb", **conn(server)) as sb:
            out = run(sb, "tree --version; python3 -c 'import six; print(six.__version__)'; cat /etc/marker")
            assert out.startswith("tree v") and out.split("\n")[2] == "v2"
            assert "Debian GNU/Linux 12" in run(sb, "cat /etc/os-release")
            assert run(sb, "id -un").strip() == "user"
            # Its own root survives hibernation (the agent runs from the host's /usr at /.cove/usr).
            sb.exec("sleep 600 &")
            sb.hibernate()
            assert run(sb, "cat /etc/marker") == "v2\n"
    finally:
        Template.delete("deb", **conn(server))


def test_apt_needs_a_full_root(server: Server) -> None:
    with pytest.raises(InvalidRequest) as e:
        Template("noapt", **conn(server)).apt_install(["tree"]).build()
    assert e.value.status == 422 and "debian:bookworm" in str(e.value) and "read-only /usr" in str(e.value)


def _tar(files: dict[str, bytes | None], extra: list[tarfile.TarInfo] = ()) -> bytes:  # type: ignore[assignment]
    """A layer tar: name -> content (None: a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tar.addfile(ti, io.BytesIO(data))
        for ti in extra:
            tar.addfile(ti)
    return buf.getvalue()


def _image(layout: str, cmd: list[str] | None = None) -> bytes:
    """A two-layer image: the second deletes a file (whiteout) and empties a dir (opaque)."""
    link = tarfile.TarInfo("etc/current")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/release"
    layer1 = _tar(
        {
            "etc": None,
            "etc/release": b"one\n",
            "data": None,
            "data/old.txt": b"old\n",
            "gone.txt": b"x\n",
            "cache": None,
            "cache/a": b"a\n",
            "cache/b": b"b\n",
        },
        [link],
    )
    layer2 = _tar(
        {
            "data": None,
            "data/new.txt": b"new\n",
            ".wh.gone.txt": b"",
            "cache": None,
            "cache/.wh..wh..opq": b"",
            "cache/c": b"c\n",
        },
    )
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "IMG=yes"], "WorkingDir": "/data", "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))

        cfg = json.dumps(config).encode()
        if layout == "docker":
            add("l1/layer.tar", layer1)
            add("l2/layer.tar", layer2)
            add("cfg.json", cfg)
            add(
                "manifest.json",
                json.dumps([{"Config": "cfg.json", "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode(),
            )
        else:

            def blob(data: bytes) -> dict[str, Any]:
                digest = hashlib.sha256(data).hexdigest()
                add(f"blobs/sha256/{digest}", data)
                return {"digest": f"sha256:{digest}", "size": len(data)}

            manifest = {
                "schemaVersion": 2,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(cfg)},
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(x)}
                    for x in (layer1, layer2)
                ],
            }
            index = {"schemaVersion": 2, "manifests": [blob(json.dumps(manifest).encode())]}
            add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            add("index.json", json.dumps(index).encode())
    return out.getvalue()


@pytest.mark.parametrize("layout", ["docker", "oci"])
def test_import_image_with_whiteouts(server: Server, tmp_path: Path, layout: str) -> None:
    path = tmp_path / "image.tar"
    path.write_bytes(_image(layout))
    name = f"img-{layout}"
    info = Template.import_image(path, name, **conn(server))
    try:
        assert info.env["IMG"] == "yes" and info.workdir == "/data" and info.start is None
        assert len(info.layers) == 3  # the image's two, and cove's mount points
        # The image has no shell: look at its files through the file API (served by the guest agent).
        with Sandbox.create(template=name, **conn(server)) as sb:
            assert sb.files.read("/data/new.txt") == "new\n"
            assert sb.files.read("/data/old.txt") == "old\n"  # not opaque: the lower layer shows through
            assert sb.files.read("/etc/current") == "one\n"  # a symlink, resolved inside the root
            assert not sb.files.exists("/gone.txt")  # whiteout
            assert sorted(e.name for e in sb.files.list("/cache")) == ["c"]  # opaque dir
    finally:
        Template.delete(name, **conn(server))


def test_image_command_becomes_the_start_command(tmp_path: Path) -> None:
    from cove.storage import oci

    with tarfile.open(fileobj=io.BytesIO(_image("oci", cmd=["/bin/serve", "--x y"]))) as tar:
        image = oci.read_image(tar)
    assert image.start_cmd == "/bin/serve '--x y'" and image.workdir == "/data" and len(image.layers) == 2


def test_bad_input_leaves_nothing(server: Server, tmp_path: Path) -> None:
    before = layers_on_disk(server)
    mounts_before = set(leaks(server))  # (warm pools keep sandboxes of their own)
    # A failing RUN: the failing step and its output.
    with pytest.raises(BuildError) as e:
        Template("bad", **conn(server)).run("echo fine").run("echo 'no such thing' >&2; exit 7").build()
    assert e.value.step == 1 and "exit code 7" in e.value.message and "no such thing" in e.value.output
    # An unknown base: a 404 before anything runs.
    with pytest.raises(NotFound, match="unknown base 'nope'"):
        Template("bad", **conn(server)).from_base("nope").run("true").build()
    with pytest.raises(NotFound, match="debian:bookworm"):
        Template("bad", **conn(server)).from_base("debian:sid").run("true").build()
    # COPY of a missing file: refused by the SDK, and by the server for a context that lacks it.
    with pytest.raises(InvalidArgument, match="does not exist"):
        Template("bad", **conn(server)).copy(tmp_path / "missing.txt", "/x")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}) as api:
        r = api.post(
            "/v1/templates",
            json={"name": "bad", "steps": [{"type": "copy", "src": "missing.txt", "dst": "/x"}]},
        )
        assert r.status_code == 422 and "COPY missing.txt: no such file in the build context" in r.text
        # An unsupported instruction, by name and line.
        r = api.post("/v1/templates", json={"name": "bad", "dockerfile": "FROM base\nHEALTHCHECK CMD true\n"})
        assert r.status_code == 422 and "line 2: HEALTHCHECK is not supported" in r.text
        assert api.get("/v1/templates/bad").status_code == 404
    assert not [t for t in Template.list(**conn(server)) if t.name == "bad"]
    assert layers_on_disk(server) <= before | {
        lid for t in Template.list(**conn(server)) for lid in (x["id"] for x in t.layers)
    }
    assert set(leaks(server)) <= mounts_before  # no build sandbox left behind


@pytest.mark.skipif(not checkpoint.available(), reason="warm templates need CRIU >= 4.1")
def test_warm_template_serves_at_once(server: Server) -> None:
    """The start command runs when the template is sealed, so a new sandbox has it up already: the
    same process (same token, same start time) answers the first request."""
    tpl = (
        Template("web", **conn(server))
        .run(
            "mkdir -p /home/user/www && head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /home/user/www/token"
        )
        .user("user")
        .start_cmd(
            "cd /home/user/www && exec python3 -m http.server 8000", ready=Template.wait_for_port(8000)
        )
    )
    info = tpl.build()
    assert info.warm
    fetch = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/token', timeout=2).read().decode())\""
    try:
        seen = []
        for _ in range(2):
            with Sandbox.create(template="web", **conn(server)) as sb:
                token = run(sb, fetch).strip()  # the first call after create: no waiting
                assert token == run(sb, "cat /home/user/www/token").strip()
                with httpx.Client(
                    base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}
                ) as api:
                    procs = [
                        p
                        for p in api.get(f"/v1/sandboxes/{sb.id}/processes").json()["items"]
                        if p["tag"] == "start"
                    ]
                assert procs and procs[0]["running"]
                seen.append((token, procs[0]["started_at"]))
        assert seen[0] == seen[1]  # both restored from the one sealed process
    finally:
        Template.delete("web", **conn(server))


def test_e2b_template_id_and_cli(server: Server, tmp_path: Path) -> None:
    Template("clitpl", **conn(server)).run("echo from-template > /home/user/mark").build()
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-KEY": server.api_key}) as e2b:
            r = e2b.post("/sandboxes", json={"templateID": "clitpl", "timeout": 60})
            assert r.status_code == 201, r.text
            sid = r.json()["sandboxID"]
            assert r.json()["templateID"] == "clitpl"
            e2b.delete(f"/sandboxes/{sid}")
        env = {"COVE_URL": server.url, "COVE_API_KEY": server.api_key, "COLUMNS": "200"}
        runner = CliRunner()
        out = runner.invoke(app, ["template", "ls"], env=env, catch_exceptions=False)
        assert out.exit_code == 0 and "clitpl" in out.stdout
        out = runner.invoke(app, ["template", "inspect", "clitpl"], env=env, catch_exceptions=False)
        assert out.exit_code == 0 and "RUN echo from-template" in out.stdout
        (tmp_path / "Dockerfile").write_text(
            "FROM clitpl\nRUN cat /home/user/mark > /home/user/mark2\nSTOPSIGNAL 9\n"
        )
        out = runner.invoke(app, ["template", "build", "cli2", "-f", str(tmp_path / "Dockerfile")], env=env)
        assert out.exit_code != 0 and "STOPSIGNAL is not supported" in out.output
        (tmp_path / "Dockerfile").write_text("FROM clitpl\nRUN cat /home/user/mark > /home/user/mark2\n")
        out = runner.invoke(app, ["template", "build", "cli2", "-f", str(tmp_path / "Dockerfile")], env=env)
        assert out.exit_code == 0, out.output
        with Sandbox.create(template="cli2", **conn(server)) as sb:
            assert run(sb, "cat /home/user/mark2") == "from-template\n"
        out = runner.invoke(app, ["template", "rm", "cli2"], env=env, catch_exceptions=False)
        assert out.exit_code == 0
    finally:
        Template.delete("clitpl", **conn(server))
    assert os.path.isdir(server.home)
