"""An S3 server on loopback for the tests: moto's standalone server in its own process (real HTTP,
real SigV4), with one bucket. tests/test_object_store.py runs its own, with IAM users."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import boto3

from cove.devserver import free_port

KEYS = ("cove-test-key", "cove-test-secret")  # moto accepts any keys without IAM set up


class Moto:
    def __init__(self, bucket: str = "cove-durable") -> None:
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Moto:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("moto's server exited at start")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.05)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEYS[0],
            aws_secret_access_key=KEYS[1],
            region_name="us-east-1",
        )

    def env(self, prefix: str) -> dict[str, str]:
        """A cove server's settings for this bucket."""
        return {
            "COVE_OBJECT_STORE": f"s3://{self.bucket}/{prefix}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": KEYS[0],
            "AWS_SECRET_ACCESS_KEY": KEYS[1],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix`, relative to it."""
        out: list[str] = []
        for page in (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/")
        ):
            out += [o["Key"][len(prefix) + 1 :] for o in page.get("Contents", [])]
        return out

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
