"""Fixtures of the SDK's suite: a real `hearth serve` (target/debug/hearth,
started the way tests/python starts it, with that suite's helpers loaded from
tests/python/conftest.py), an account whose keys and endpoint are put in the
environment as a user's would be (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, HEARTH_ENDPOINT_URL), so the SDK is called without connection
arguments.

The server keeps microVMs running after it ends: the session ends by killing
every QEMU process started under its temporary directory or RAM directory."""
import importlib.util
import os
import pathlib
import shutil
import tempfile
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _load_suite():
    spec = importlib.util.spec_from_file_location("hearth_suite_conftest", ROOT / "tests/python/conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite = _load_suite()

ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_PROFILE", "HEARTH_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_LAMBDA_MICROVMS",
            "HEARTH_RAM_DIR")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A `hearth serve` and an account, in the environment."""
    if not suite.BASE_ROOTFS.is_file():
        pytest.skip(f"no base image at {suite.BASE_ROOTFS}: run scripts/setup-host")
    saved = {key: os.environ.get(key) for key in ENV_KEYS}
    base = str(tmp_path_factory.getbasetemp())
    ram_dir = pathlib.Path(f"/dev/shm/hearth-sdk-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.environ["HEARTH_RAM_DIR"] = str(ram_dir)
    # Not under pytest's basetemp: /tmp/pytest-of-USER keeps only the newest
    # three sessions' directories, and a concurrent pytest (another suite) would
    # delete this one, database included, under the running server.
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="hearth-sdk-", dir="/tmp"))
    proc, url = suite.start_server(data_dir, *suite.FAST_RATES)
    try:
        account = suite.create_account({"data_dir": data_dir}, "sdk")
        for key in ENV_KEYS:
            if key != "HEARTH_RAM_DIR":
                os.environ.pop(key, None)
        os.environ.update({
            "AWS_ACCESS_KEY_ID": account["accessKeyId"],
            "AWS_SECRET_ACCESS_KEY": account["secretAccessKey"],
            "AWS_REGION": suite.REGION,
            "AWS_DEFAULT_REGION": suite.REGION,
            "HEARTH_ENDPOINT_URL": url,
        })
        yield {"url": url, "data_dir": data_dir, "proc": proc, "account": account}
    finally:
        suite.stop_server(proc)
        suite.kill_qemu_under(f"{base}/")
        suite.kill_qemu_under(f"{data_dir}/")
        suite.kill_qemu_under(f"{ram_dir}/")
        # The server's VM networks (namespaces, its nft table): this session
        # has no tests/python session fixture to remove them.
        suite.remove_test_network()
        shutil.rmtree(ram_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
