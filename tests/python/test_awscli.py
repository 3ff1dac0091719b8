"""The AWS CLI as a second real client: every one of the 24 operations of
Lambda MicroVMs 2025-09-09 through `aws lambda-microvms ... --output json`
(awscli 1.46.3, pinned by scripts/setup-host, ships the model), and the code
artifact uploaded with `aws s3 cp` to the server's built-in S3 store.

Each call is a subprocess with the account's keys in its environment (and no
AWS configuration of the machine's); the JSON it prints is what the asserts
read. OPERATIONS is the model's list, written out: every call records its
operation, and the last test fails if one of them was never called.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from conftest import MODEL, REGION, create_account, short_data_dir
from endpoint_support import HTTP_INGRESS, SHELL_INGRESS, Hearth, agent_exec, ep_request, kill_leftover_qemu

AWS = pathlib.Path(sys.executable).with_name("aws")
BASE_ARN = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian-12"
ROLE = "arn:aws:iam::123456789012:role/hearth-build"
BUCKET = "cli-artifacts"
IMAGE = "cli-web"

OPERATIONS = [
    "CreateMicrovmAuthToken", "CreateMicrovmImage", "CreateMicrovmShellAuthToken", "DeleteMicrovmImage",
    "DeleteMicrovmImageVersion", "GetMicrovm", "GetMicrovmImage", "GetMicrovmImageBuild",
    "GetMicrovmImageVersion", "ListManagedMicrovmImageVersions", "ListManagedMicrovmImages",
    "ListMicrovmImageBuilds", "ListMicrovmImageVersions", "ListMicrovmImages", "ListMicrovms", "ListTags",
    "ResumeMicrovm", "RunMicrovm", "SuspendMicrovm", "TagResource", "TerminateMicrovm", "UntagResource",
    "UpdateMicrovmImage", "UpdateMicrovmImageVersion",
]
CALLED = set()

# The app: 8080 counts its GETs in memory (so a resume that kept memory shows
# the count going on) and says which release it is; 9000 answers the hooks.
APP = r'''
import http.server, json, threading

HITS = 0
RELEASE = open("release.txt").read().strip()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class App(Handler):
    def do_GET(self):
        global HITS
        HITS += 1
        self.reply({"hits": HITS, "release": RELEASE})


class Hooks(Handler):
    def do_GET(self):
        self.reply({"hook": self.path})

    do_POST = do_GET


threading.Thread(target=http.server.ThreadingHTTPServer(("0.0.0.0", 8080), App).serve_forever,
                 daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Hooks).serve_forever()
'''
DOCKERFILE = """\
FROM debian-12
WORKDIR /srv
COPY app.py release.txt ./
CMD ["python3", "app.py"]
"""


def kebab(operation):
    return "".join("-" + c.lower() if c.isupper() else c for c in operation).lstrip("-")


class Cli:
    """Runs `aws` against one server with one account's keys."""

    def __init__(self, hearth, account, home):
        self.hearth = hearth
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "AWS_ACCESS_KEY_ID": account["accessKeyId"],
            "AWS_SECRET_ACCESS_KEY": account["secretAccessKey"],
            "AWS_DEFAULT_REGION": REGION,
            # Nothing from the machine's own AWS configuration.
            "AWS_CONFIG_FILE": str(home / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
            "AWS_MAX_ATTEMPTS": "1",
        }
        # botocore without the model (an old one) reads the repo's copy.
        if "AWS_DATA_PATH" in os.environ:
            self.env["AWS_DATA_PATH"] = os.environ["AWS_DATA_PATH"]

    def run(self, *argv, timeout=120):
        return subprocess.run([str(AWS), *argv, "--endpoint-url", self.hearth.api_url, "--region", REGION],
                              capture_output=True, text=True, timeout=timeout, env=self.env)

    def call(self, operation, *args, check=True):
        """`aws lambda-microvms <operation> ARGS --output json`; returns the JSON
        it printed ({} for none), or with check=False the CompletedProcess."""
        assert operation in OPERATIONS, operation
        CALLED.add(operation)
        out = self.run("lambda-microvms", kebab(operation), *args, "--output", "json")
        if not check:
            return out
        assert out.returncode == 0, f"{operation}: {out.stderr}"
        return json.loads(out.stdout) if out.stdout.strip() else {}

    def wait(self, operation, args, field, wanted, timeout=900):
        """Calls operation until out[field] is in wanted; returns the output."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.call(operation, *args)
            if out[field] in wanted:
                return out
            assert time.monotonic() < deadline, f"{operation} {args}: {field} is still {out[field]}"
            time.sleep(1)


def upload(cli, tmp_path, key, release):
    """Writes the app's context as a zip and puts it into the store with `aws s3 cp`."""
    import zipfile

    path = tmp_path / f"{release}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {"Dockerfile": DOCKERFILE, "app.py": APP, "release.txt": release}.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o100644 << 16
            z.writestr(info, data)
    out = cli.run("s3", "cp", str(path), f"s3://{BUCKET}/{key}")
    assert out.returncode == 0 and f"s3://{BUCKET}/{key}" in out.stdout, out.stderr
    return f"s3://{BUCKET}/{key}"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hearth(model_path, guest_cleanup, tmp_path_factory, request):
    if not AWS.exists():
        pytest.skip(f"no AWS CLI at {AWS}: run scripts/setup-host --with-python")
    data_dir = short_data_dir(tmp_path_factory, "awscli")
    request.addfinalizer(lambda: kill_leftover_qemu(data_dir))
    server = Hearth(data_dir).start()
    request.addfinalizer(server.stop)
    server.use_account(create_account(server.info, "cli-tenant"))
    return server


@pytest.fixture(scope="module")
def cli(hearth, tmp_path_factory):
    cli = Cli(hearth, hearth.account, tmp_path_factory.mktemp("aws-home"))
    out = cli.run("s3", "mb", f"s3://{BUCKET}")
    assert out.returncode == 0 and BUCKET in out.stdout, out.stderr
    return cli


@pytest.fixture(scope="module")
def image(cli, tmp_path_factory):
    """The app built through the CLI: `aws s3 cp` of the artifact, then
    create-microvm-image, polled with get-microvm-image until CREATED."""
    uri = upload(cli, tmp_path_factory.mktemp("ctx"), "web/v1.zip", "release-1")
    hooks = {"port": 9000, "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 300}}
    created = cli.call("CreateMicrovmImage", "--name", IMAGE, "--base-image-arn", BASE_ARN,
                       "--build-role-arn", ROLE, "--code-artifact", json.dumps({"uri": uri}),
                       "--resources", json.dumps([{"minimumMemoryInMiB": 512}]), "--hooks", json.dumps(hooks),
                       "--tags", json.dumps({"team": "cli"}))
    assert created["name"] == IMAGE and created["state"] == "CREATING" and created["imageVersion"] == "1.0"
    assert created["codeArtifact"] == {"uri": uri}, created
    done = cli.wait("GetMicrovmImage", ["--image-identifier", IMAGE], "state", ("CREATED", "CREATE_FAILED"))
    assert done["state"] == "CREATED", done
    return created


# ---------------------------------------------------------------- the operations


def test_managed_images(cli):
    managed = cli.call("ListManagedMicrovmImages")["items"]
    names = [item["imageArn"] for item in managed]
    assert BASE_ARN in names, managed
    versions = cli.call("ListManagedMicrovmImageVersions", "--image-identifier", BASE_ARN)["items"]
    # awscli 1.46.3 carries its own older copy of the model, whose
    # ManagedMicrovmImageVersion has no `status` or `supportedCpuConfigurations`
    # (and whose Architecture enum is ARM_64 alone): the CLI drops members its
    # model lacks, so only the others show (test_api.py checks them with boto3).
    assert versions[0]["imageArn"] == BASE_ARN and versions[0]["imageVersion"] == "1.0", versions
    assert isinstance(versions[0]["createdAt"], (int, float)), versions


def test_image_built_from_an_s3_cp_artifact(cli, image):
    got = cli.call("GetMicrovmImage", "--image-identifier", IMAGE)
    assert got["imageArn"] == image["imageArn"] and got["latestActiveImageVersion"] == "1.0", got
    listed = cli.call("ListMicrovmImages")["items"]
    assert [i["name"] for i in listed] == [IMAGE], listed
    versions = cli.call("ListMicrovmImageVersions", "--image-identifier", IMAGE)["items"]
    assert [(v["imageVersion"], v["state"]) for v in versions] == [("1.0", "SUCCESSFUL")], versions
    version = cli.call("GetMicrovmImageVersion", "--image-identifier", IMAGE, "--image-version", "1.0")
    assert version["status"] == "ACTIVE" and version["state"] == "SUCCESSFUL", version
    builds = cli.call("ListMicrovmImageBuilds", "--image-identifier", IMAGE, "--image-version", "1.0")["items"]
    assert len(builds) == 1, builds
    build = cli.call("GetMicrovmImageBuild", "--image-identifier", IMAGE, "--image-version", "1.0",
                     "--build-id", builds[0]["buildId"])
    assert build["buildState"] == "SUCCESSFUL", build


def test_microvm_lifecycle_tokens_and_endpoint(cli, hearth, image):
    run = cli.call("RunMicrovm", "--image-identifier", IMAGE,
                   "--ingress-network-connectors", json.dumps([HTTP_INGRESS, SHELL_INGRESS]))
    microvm_id = run["microvmId"]
    try:
        assert run["state"] == "PENDING" and run["imageArn"] == image["imageArn"], run
        vm = cli.wait("GetMicrovm", ["--microvm-identifier", microvm_id], "state", ("RUNNING", "TERMINATED"),
                      timeout=120)
        assert vm["state"] == "RUNNING", vm
        listed = cli.call("ListMicrovms")["items"]
        assert microvm_id in [item["microvmId"] for item in listed], listed

        minted = cli.call("CreateMicrovmAuthToken", "--microvm-identifier", microvm_id,
                          "--expiration-in-minutes", "5", "--allowed-ports", json.dumps([{"port": 8080}]))
        token = minted["authToken"]["X-aws-proxy-auth"]
        first = ep_request(hearth, vm["endpoint"], token=token)
        assert first.status_code == 200 and first.json() == {"hits": 1, "release": "release-1"}, first.text

        shell = cli.call("CreateMicrovmShellAuthToken", "--microvm-identifier", microvm_id,
                         "--expiration-in-minutes", "5")
        stdout, _, final, _ = agent_exec(hearth, vm["endpoint"], shell["authToken"]["X-aws-proxy-auth"],
                                         ["cat", "/srv/release.txt"])
        assert stdout.strip() == b"release-1" and final.get("exitCode") == 0, (stdout, final)

        cli.call("SuspendMicrovm", "--microvm-identifier", microvm_id)
        cli.wait("GetMicrovm", ["--microvm-identifier", microvm_id], "state", ("SUSPENDED",), timeout=120)
        cli.call("ResumeMicrovm", "--microvm-identifier", microvm_id)
        cli.wait("GetMicrovm", ["--microvm-identifier", microvm_id], "state", ("RUNNING",), timeout=120)
        again = ep_request(hearth, vm["endpoint"], token=token)
        assert again.status_code == 200 and again.json()["hits"] == 2, again.text
    finally:
        cli.call("TerminateMicrovm", "--microvm-identifier", microvm_id)
    cli.wait("GetMicrovm", ["--microvm-identifier", microvm_id], "state", ("TERMINATED",), timeout=120)


def test_tags(cli, image):
    arn = image["imageArn"]
    assert cli.call("ListTags", "--resource", arn) == {"Tags": {"team": "cli"}}
    assert cli.call("TagResource", "--resource", arn, "--tags", json.dumps({"stage": "test"})) == {}
    assert cli.call("ListTags", "--resource", arn) == {"Tags": {"team": "cli", "stage": "test"}}
    assert cli.call("UntagResource", "--resource", arn, "--tag-keys", "team") == {}
    assert cli.call("ListTags", "--resource", arn) == {"Tags": {"stage": "test"}}


def test_update_deactivate_and_delete(cli, image, tmp_path):
    uri = upload(cli, tmp_path, "web/v2.zip", "release-2")
    updated = cli.call("UpdateMicrovmImage", "--image-identifier", IMAGE, "--base-image-arn", BASE_ARN,
                       "--build-role-arn", ROLE, "--code-artifact", json.dumps({"uri": uri}),
                       "--resources", json.dumps([{"minimumMemoryInMiB": 512}]))
    assert updated["imageVersion"] == "2.0" and updated["state"] == "UPDATING", updated
    done = cli.wait("GetMicrovmImage", ["--image-identifier", IMAGE], "state", ("UPDATED", "UPDATE_FAILED"))
    assert done["state"] == "UPDATED" and done["latestActiveImageVersion"] == "2.0", done

    inactive = cli.call("UpdateMicrovmImageVersion", "--image-identifier", IMAGE, "--image-version", "1.0",
                        "--status", "INACTIVE")
    assert inactive["imageVersion"] == "1.0" and inactive["status"] == "INACTIVE", inactive
    # awscli 1.x exits 255 on a service error (2.x says 254).
    refused = cli.call("RunMicrovm", "--image-identifier", IMAGE, "--image-version", "1.0", check=False)
    assert refused.returncode == 255 and "ResourceNotFoundException" in refused.stderr, refused.stderr

    deleted = cli.call("DeleteMicrovmImageVersion", "--image-identifier", IMAGE, "--image-version", "1.0")
    assert deleted["imageVersion"] == "1.0", deleted
    versions = cli.call("ListMicrovmImageVersions", "--image-identifier", IMAGE)["items"]
    assert [v["imageVersion"] for v in versions] == ["2.0"], versions

    gone = cli.call("DeleteMicrovmImage", "--image-identifier", IMAGE)
    assert gone["imageIdentifier"] in (IMAGE, image["imageArn"]), gone
    missing = cli.call("GetMicrovmImage", "--image-identifier", IMAGE, check=False)
    assert missing.returncode == 255 and "ResourceNotFoundException" in missing.stderr, missing.stderr


def test_every_operation_was_called():
    """Runs last: the tests above called each of the model's 24 operations."""
    model = json.loads(pathlib.Path(MODEL).read_text())
    assert sorted(model["operations"]) == sorted(OPERATIONS)
    assert not set(OPERATIONS) - CALLED, f"never called: {sorted(set(OPERATIONS) - CALLED)}"
