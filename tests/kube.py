"""A real Kubernetes v1.20.2 control plane for the tests, on loopback: etcd, kube-apiserver, kube-scheduler and
kube-controller-manager as child processes, each on free 127.0.0.1 ports, in one temp dir (certificates, tokens,
kubeconfig, etcd's data, one log per process). No kubelet: tests act as node agents over the API themselves.

The binaries are the project's own offline build (scripts/kube/build.sh, run by setup.sh); etcd is Debian's
etcd-server."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import httpx

from cove.devserver import free_port

VERSION = "v1.20.2"
CACHE = Path(os.environ.get("COVE_KUBE_CACHE", "/var/cache/cove/kubernetes-1.20.2"))
BIN = CACHE / "bin"
STAMP = BIN / ".cove-built"  # written by build.sh once all three binaries are built and checked
BINARIES = ("kube-apiserver", "kube-scheduler", "kube-controller-manager")
SERVICE_CIDR = "10.250.0.0/24"  # never routed anywhere: no kube-proxy runs
# etcd's data stays on disk, not tmpfs: measured here, tmpfs made no difference (startup 6.0 vs 5.7 s, 2.1 vs
# 2.2 ms a write) and would hold etcd's preallocated 123 MB WAL in memory, for ever if a run is killed.


def etcd_binary() -> str | None:
    return (
        os.environ.get("COVE_KUBE_ETCD")
        or shutil.which("etcd")
        or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    )


def missing() -> str | None:
    """Why no control plane can be started here, or None."""
    absent = [b for b in BINARIES if not os.access(BIN / b, os.X_OK)]
    if absent or not STAMP.exists():
        what = BIN / (absent[0] if absent else STAMP.name)
        return f"Kubernetes {VERSION} is not built (no {what}): run scripts/kube/build.sh (setup.sh does)"
    if etcd_binary() is None:
        return "etcd is not installed: apt-get install etcd-server (scripts/kube/build.sh does)"
    if shutil.which("openssl") is None:
        return "openssl is missing: it makes the control plane's certificates and service-account key"
    return None


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel kills the child when the test process dies, even by SIGKILL, so that a
    # crashed or killed test run leaves no control plane behind. (It fires when the *thread* that started it
    # ends: start it from a thread that lives as long as the control plane, as pytest's main thread does.)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class KubeControlPlane:
    """`start()` brings it up (or raises, having stopped whatever it had started); `stop()` ends it all."""

    def __init__(self, apiserver_flags: list[str] | None = None, start_timeout: float = 90.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cove-test-kube-"))
        self.apiserver_flags = apiserver_flags or []
        self.start_timeout = start_timeout
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.scheduler_port = free_port()
        self.controller_manager_port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.ca = self.dir / "ca.crt"  # verify the API server against this (no insecure-skip-tls-verify)
        self.kubeconfig = self.dir / "kubeconfig"  # the admin's
        self.token = secrets.token_hex(16)  # the admin's bearer token: user "admin", group system:masters
        self._scheduler_token = secrets.token_hex(16)
        self._controller_manager_token = secrets.token_hex(16)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.startup_s = 0.0  # launch of etcd to all four healthy

    # --- files ---------------------------------------------------------------------------------------------

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30, cwd=self.dir)

    def _write_files(self) -> None:
        # P-256 keys: generated in milliseconds (RSA 2048 takes a noticeable fraction of a second each).
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
        self._openssl(
            "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=cove-test-kube-ca"
        )
        sans = "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
        self._openssl("req", "-x509", "-CA", "ca.crt", "-CAkey", "ca.key", *ec, "-keyout", "apiserver.key",
                      "-out", "apiserver.crt", "-subj", "/CN=kube-apiserver", "-addext", f"subjectAltName={sans}",
                      "-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth")  # fmt: skip
        # The service-account key: the private half signs tokens (API server, controller manager's token
        # controller), the public half verifies them (the API server reads only public keys there).
        self._openssl(
            "genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "sa.key"
        )
        self._openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        # Static tokens (token,user,uid,groups). The scheduler runs as itself under its bootstrap RBAC role;
        # the controller manager is in system:masters because its own narrow role presumes
        # --use-service-account-credentials (per-controller tokens: one more thing on the start path).
        (self.dir / "tokens.csv").write_text(
            f"{self.token},admin,admin,system:masters\n"
            f"{self._scheduler_token},system:kube-scheduler,system:kube-scheduler\n"
            f"{self._controller_manager_token},system:kube-controller-manager,system:kube-controller-manager,system:masters\n"
        )
        for name, token in (("kubeconfig", self.token), ("scheduler.kubeconfig", self._scheduler_token),
                            ("controller-manager.kubeconfig", self._controller_manager_token)):  # fmt: skip
            self._write_kubeconfig(self.dir / name, token)
        for p in self.dir.iterdir():
            p.chmod(0o600)

    def _write_kubeconfig(self, path: Path, token: str) -> None:
        # JSON is YAML: kubectl, client-go and the Python kubernetes client all read it.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "cove-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca)},
                }
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "cove-test", "context": {"cluster": "cove-test", "user": "user"}}],
            "current-context": "cove-test",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")

    # --- processes -----------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 (open as long as the process runs)
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.dir, preexec_fn=_die_with_parent)  # fmt: skip

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait(self, name: str, url: str, deadline: float, headers: dict[str, str] | None = None,
              verify: Any = False) -> None:  # fmt: skip
        """Until GET `url` answers 200 "ok"; raises with the log's tail if the process exits or time runs out."""
        last = ""
        with httpx.Client(verify=verify, headers=headers or {}, timeout=2.0) as c:
            while True:
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{self.log_tail(name)}")
                try:
                    r = c.get(url)
                    # "ok" from the Kubernetes components, {"health":"true"...} from etcd
                    if r.status_code == 200 and (r.text.strip() == "ok" or '"health":"true"' in r.text):
                        return
                    last = f"{r.status_code} {r.text[-500:]}"
                except httpx.HTTPError as e:
                    last = repr(e)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready at {url} after {self.start_timeout:.0f} s "
                                       f"(last answer: {last}):\n{self.log_tail(name)}")  # fmt: skip
                time.sleep(0.1)

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._write_files()
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        d = self.dir
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._spawn("etcd", [
            str(etcd_binary()), "--name", "default", "--data-dir", str(d / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}", "--initial-cluster-state", "new",
            "--log-level", "warn",
        ])  # fmt: skip
        self._wait("etcd", f"{etcd_url}/health", deadline)
        self._spawn("kube-apiserver", [
            str(BIN / "kube-apiserver"),
            "--etcd-servers", etcd_url,
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--cert-dir={d / 'certs'}",
            f"--token-auth-file={d / 'tokens.csv'}",
            # No anonymous user: a request without a token is refused (401), as /version would otherwise
            # answer anyone (system:public-info-viewer).
            "--anonymous-auth=false",
            "--allow-privileged=true",  # cove's node and API pods are privileged (deploy/), as clusters allow
            # RBAC, as real clusters run: the project's controllers and node agents get tested under the
            # permissions they will have, not under allow-all (the admin token is in system:masters).
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
            # Nothing runs pods' containers here (no kubelet), so no token to mount; this admission plugin
            # would otherwise refuse every pod until the token controller has minted the default account's.
            "--disable-admission-plugins=ServiceAccount",
            # No endpoints for the `kubernetes` Service: no pod would reach 127.0.0.1 of the host anyway.
            "--endpoint-reconciler-type=none",
            # Pods leave an unreachable node after 5 s (not 300): failover tests take seconds.
            "--default-not-ready-toleration-seconds=5", "--default-unreachable-toleration-seconds=5",
            *self.apiserver_flags,
        ])  # fmt: skip
        auth = {"Authorization": f"Bearer {self.token}"}
        self._wait(
            "kube-apiserver", f"{self.server}/readyz", deadline, headers=auth, verify=self.ssl_context()
        )
        # Both serve only /healthz et al. on their own ports (HTTPS, self-signed: checked without verifying);
        # no plain-HTTP port (--port=0), so that two control planes never collide on 10251/10252.
        self._spawn("kube-scheduler", [
            str(BIN / "kube-scheduler"), f"--kubeconfig={d / 'scheduler.kubeconfig'}", "--leader-elect=false",
            "--port=0", "--bind-address=127.0.0.1", f"--secure-port={self.scheduler_port}",
            f"--cert-dir={d / 'certs'}",
        ])  # fmt: skip
        self._spawn("kube-controller-manager", [
            str(BIN / "kube-controller-manager"), f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
            "--leader-elect=false",
            # Node health and eviction, ReplicaSets, orphaned pods and owner references; namespace (else a
            # deleted namespace stays Terminating for ever), serviceaccount and serviceaccount-token (each
            # namespace's `default` account and its token, which clients expect).
            "--controllers=nodelifecycle,replicaset,podgc,garbagecollector,namespace,serviceaccount,serviceaccount-token",
            # A node that stops renewing its Lease is unknown after 8 s (not 40), checked every second.
            "--node-monitor-grace-period=8s", "--node-monitor-period=1s",
            f"--service-account-private-key-file={d / 'sa.key'}", f"--root-ca-file={self.ca}",
            "--port=0", "--bind-address=127.0.0.1", f"--secure-port={self.controller_manager_port}",
            f"--cert-dir={d / 'certs'}",
        ])  # fmt: skip
        self._wait("kube-scheduler", f"https://127.0.0.1:{self.scheduler_port}/healthz", deadline)
        self._wait(
            "kube-controller-manager", f"https://127.0.0.1:{self.controller_manager_port}/healthz", deadline
        )
        self.startup_s = time.monotonic() - t0

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the API server's certificate (signed by `.ca`, for 127.0.0.1 and localhost)."""
        return ssl.create_default_context(cafile=str(self.ca))

    def client(self, **kwargs: Any) -> httpx.Client:
        """An HTTP client for the API server, as the admin."""
        return httpx.Client(base_url=self.server, verify=self.ssl_context(), timeout=10.0,
                            headers={"Authorization": f"Bearer {self.token}"}, **kwargs)  # fmt: skip

    def rss_mib(self) -> dict[str, float]:
        """Resident memory of each process still running, in MiB."""
        out = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) / 1024
        return out

    def processes(self) -> list[int]:
        """The pids of its processes still running (none of them forks: each is one Go or etcd process)."""
        return [proc.pid for proc in self.procs.values() if proc.poll() is None]

    def stop(self) -> None:
        """Ends every process it started and removes its temp dir. Idempotent. All get SIGTERM at once: a
        throwaway cluster needs no orderly shutdown, and each exits in about a second."""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(list(self.procs.values())):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for log in self._logs:
            log.close()
        self._logs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
