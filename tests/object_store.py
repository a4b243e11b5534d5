"""An S3-compatible object store on loopback for tests: moto's server mode, started and stopped by the test.

The credentials are the environment's, as in a real job: the fixture sets ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (how an S3-compatible
store such as MinIO is named to boto3) for the test and for the processes it launches.

Usage::

    with s3_store() as store:            # store.env: the variables a launched run needs
        store.upload(local_dir, "corpus", "shar/train")
        ... data.train=s3://corpus/shar/train ...
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "test-access-key", "test-secret-key-never-printed"


class Store:
    def __init__(self, port: int):
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def upload(self, local: Path, bucket: str, prefix: str) -> str:
        client = self.client()
        if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=bucket)
        local = Path(local)
        for path in sorted(local.rglob("*") if local.is_dir() else [local]):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(local)}" if local.is_dir() else prefix
                client.upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{prefix}"

    @contextlib.contextmanager
    def requiring_auth(self):
        """Requests must carry credentials the store knows (none are registered: every key is wrong)."""
        import moto.settings

        before = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        try:
            yield
        finally:
            moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = before


@contextlib.contextmanager
def s3_store():
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    store = Store(port)
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    from common.data import remote

    remote._S3.clear()  # a client made before this endpoint existed would not see it
    try:
        yield store
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        remote._S3.clear()
        server.stop()
