"""Read/write throughput on a volume and on a bucket mount inside a sandbox, beside the same
operations on the host on the same storage (the floor), measured interleaved in one run.

- volume: `dd` of SIZE MiB (write with fsync, then a cold read after dropping the page cache) at
  /data inside the sandbox, and on the host into the volume's own directory (same btrfs, same qgroup);
- bucket: moto's S3 server on loopback; inside, `dd` into the rclone mount and until the object is
  in the bucket (rclone uploads on close), then a cold read; on the host, the same `dd` on the same
  rclone mount from outside the sandbox.
"""

from __future__ import annotations

import re
import secrets
import statistics
import subprocess
import time
from pathlib import Path

from cove import BucketMount, Sandbox, Volume
from cove.devserver import Server, free_port

VOLUME_MB = 256
BUCKET_MB = 32
_SECONDS = re.compile(r"copied, ([0-9.]+) s")


def _dd_seconds(output: str) -> float:
    m = _SECONDS.search(output)
    if not m:
        raise RuntimeError(f"dd said: {output[-300:]}")
    return float(m.group(1))


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _host_dd(args: str) -> float:
    done = subprocess.run(f"dd {args} 2>&1", shell=True, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"dd {args}: {done.stdout[-300:]}; {subprocess.getoutput('grep fuse /proc/self/mountinfo')}"
        )
    return _dd_seconds(done.stdout)


def _sb_dd(sb: Sandbox, args: str) -> float:
    res = sb.exec(f"dd {args} 2>&1", timeout=300)
    if res.exit_code != 0:
        raise RuntimeError(res.stdout + res.stderr)
    return _dd_seconds(res.stdout)


def _wait_object(s3: object, bucket: str, key: str, size: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == size:  # type: ignore[attr-defined]
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{key} never reached the bucket")


def run(runs: int = 3) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )
    bucket = "bench-" + secrets.token_hex(4)
    s3.create_bucket(Bucket=bucket)
    srv = Server("bench-volumes")
    srv.start()
    res: dict[str, list[float]] = {
        k: [] for k in ("vol_w", "vol_r", "host_vol_w", "host_vol_r", "b_w", "b_r", "host_b_w", "host_b_r")
    }
    try:
        vol = Volume.create("bench", size_mb=VOLUME_MB * 4, url=srv.url, api_key=srv.api_key)
        mount = BucketMount(
            bucket=bucket, path="/bucket", endpoint=endpoint, access_key_id="bench", secret_access_key="bench"
        )
        sb = Sandbox.create(
            volumes=[vol.mount("/data")], mounts=[mount], url=srv.url, api_key=srv.api_key, timeout=1800
        )
        vol_dir = next((srv.home / "storage" / "volumes").glob("vol-*"))
        fuse_dir = srv.home / "sandboxes" / sb.id / "fuse" / "1" / "mnt"  # mount 1: after the volume
        n = VOLUME_MB
        for i in range(runs):
            res["vol_w"].append(n / _sb_dd(sb, f"if=/dev/zero of=/data/f{i} bs=1M count={n} conv=fsync"))
            _drop_caches()
            res["vol_r"].append(n / _sb_dd(sb, f"if=/data/f{i} of=/dev/null bs=1M"))
            sb.exec(f"rm /data/f{i}")
            res["host_vol_w"].append(
                n / _host_dd(f"if=/dev/zero of={vol_dir}/h{i} bs=1M count={n} conv=fsync")
            )
            _drop_caches()
            res["host_vol_r"].append(n / _host_dd(f"if={vol_dir}/h{i} of=/dev/null bs=1M"))
            (vol_dir / f"h{i}").unlink()

            m = BUCKET_MB
            t = time.perf_counter()
            _sb_dd(sb, f"if=/dev/zero of=/bucket/s{i} bs=1M count={m}")
            _wait_object(s3, bucket, f"s{i}", m << 20)
            res["b_w"].append(m / (time.perf_counter() - t))
            _drop_caches()
            res["b_r"].append(m / _sb_dd(sb, f"if=/bucket/s{i} of=/dev/null bs=1M"))
            t = time.perf_counter()
            _host_dd(f"if=/dev/zero of={fuse_dir}/h{i} bs=1M count={m}")
            _wait_object(s3, bucket, f"h{i}", m << 20)
            res["host_b_w"].append(m / (time.perf_counter() - t))
            _drop_caches()
            res["host_b_r"].append(m / _host_dd(f"if={fuse_dir}/h{i} of=/dev/null bs=1M"))
        sb.kill()
        vol.delete()
    finally:
        srv.close()
        moto.stop()
    return {k: statistics.median(v) for k, v in res.items()}


def render(res: dict) -> list[str]:
    def row(what: str, inside: float, host: float) -> str:
        return f"| {what} | {inside:.0f} MB/s | {host:.0f} MB/s | {inside / host:.2f}× |"

    return [
        "## Volumes and bucket mounts",
        f"`dd` with 1 MiB blocks: {VOLUME_MB} MiB on a volume (write with fsync; read after dropping the page",
        f"cache), {BUCKET_MB} MiB on a bucket mount (moto's S3 server on loopback; write until the object is in",
        "the bucket, rclone uploading on close). The host runs the same `dd` on the same volume directory and",
        "the same rclone mount, from outside the sandbox. Medians.",
        "",
        "| measurement | in the sandbox | on the host | ratio |",
        "|---|---|---|---|",
        row("volume write", res["vol_w"], res["host_vol_w"]),
        row("volume read (cold)", res["vol_r"], res["host_vol_r"]),
        row("bucket write (to the bucket)", res["b_w"], res["host_b_w"]),
        row("bucket read (cold)", res["b_r"], res["host_b_r"]),
    ]


if __name__ == "__main__":
    print("\n".join(render(run())))
