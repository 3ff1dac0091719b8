"""Fixtures: a real `hearth serve` on a free loopback port, accounts made with
`hearth account create`, and boto3 clients built from the API model file.

botocore does not ship the Lambda MicroVMs model yet, so the suite points
AWS_DATA_PATH at a directory laid out like botocore's own data
(`lambda-microvms/2025-09-09/service-2.json`) holding the model from the repo.
"""
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import boto3
import botocore.config
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "crates/hearth-api/model/lambda-microvms-2025-09-09.json"
HEARTH = pathlib.Path(os.environ.get("HEARTH_BIN", ROOT / "target/debug/hearth"))
REGION = "us-east-1"


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    data = tmp_path_factory.mktemp("botocore-data")
    target = data / "lambda-microvms" / "2025-09-09"
    target.mkdir(parents=True)
    shutil.copy(MODEL, target / "service-2.json")
    os.environ["AWS_DATA_PATH"] = str(data)
    return data


def start_server(data_dir, *extra):
    """Starts `hearth serve` on a free port; returns (process, base URL)."""
    proc = subprocess.Popen(
        [str(HEARTH), "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--region", REGION, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"hearth serve did not start: {line!r} {proc.stderr.read()}")
    return proc, line.strip().rsplit(" ", 1)[-1]


@pytest.fixture(scope="session")
def server(model_path, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("hearth-data")
    proc, url = start_server(data_dir)
    yield {"url": url, "data_dir": data_dir}
    proc.terminate()
    proc.wait(timeout=10)


def create_account(server, name):
    out = subprocess.run(
        [str(HEARTH), "account", "create", "--name", name, "--json", "--data-dir", str(server["data_dir"])],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def client_for(server, account, **overrides):
    session = boto3.session.Session()
    return session.client(
        "lambda-microvms",
        endpoint_url=server["url"],
        region_name=overrides.pop("region", REGION),
        aws_access_key_id=overrides.pop("key_id", account["accessKeyId"]),
        aws_secret_access_key=overrides.pop("secret", account["secretAccessKey"]),
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="session")
def account(server):
    return create_account(server, "tenant-a")


@pytest.fixture(scope="session")
def client(server, account):
    return client_for(server, account)
