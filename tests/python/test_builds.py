"""Dockerfile builds end to end (issue 4), driven with boto3 only: the code
artifact goes up with boto3's s3 client to the server's built-in S3 store,
CreateMicrovmImage / UpdateMicrovmImage build it in microVMs, RunMicrovm
launches the snapshot and the app answers through the endpoint with state it
made before the snapshot. Crafted artifacts produce every build error code.
"""

import io
import pathlib
import json
import re
import time
import zipfile

import boto3
import botocore.config
import pytest

from conftest import REGION, client_for, create_account, error_of, run_in, short_data_dir, wait_for_state
from endpoint_support import (
    HTTP_INGRESS,
    Hearth,
    app_token,
    ep_request,
    kill_leftover_qemu,
    run_vm,
    terminate_quietly,
)

BASE_ARN = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian-12"
ROLE = "arn:aws:iam::123456789012:role/hearth-build"
INTERNET_EGRESS = f"arn:aws:lambda:{REGION}:aws:network-connector:aws-network-connector:INTERNET_EGRESS"
APP_PORT = 8080
HOOKS_PORT = 9000

# The app: computes a value and a token at start-up (before the snapshot),
# serves them on 8080, and has a ready hook on 9000 that says 503 twice.
APP = r'''
import hashlib, http.server, json, os, pwd, secrets, threading, time

STARTED = time.time()
COMPUTED = hashlib.sha256(b"x" * 5_000_000).hexdigest()
TOKEN = secrets.token_hex(8)
READY_CALLS = 0


class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({
            "started": STARTED,
            "computed": COMPUTED,
            "token": TOKEN,
            "user": pwd.getpwuid(os.getuid()).pw_name,
            "cwd": os.getcwd(),
            "greeting": os.environ.get("GREETING"),
            "image_env": os.environ.get("FROM_IMAGE"),
            "version": os.environ.get("AWS_LAMBDA_MICROVM_IMAGE_VERSION"),
            "image_name": os.environ.get("AWS_LAMBDA_MICROVM_IMAGE_NAME"),
            "build_stamp": open("build-stamp.txt").read().strip(),
            "release": open("release.txt").read().strip(),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Hooks(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        global READY_CALLS
        status = 200
        if self.path.endswith("/ready"):
            READY_CALLS += 1
            status = 503 if READY_CALLS <= 2 else 200
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass


hooks = http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Hooks)
threading.Thread(target=hooks.serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), App).serve_forever()
'''

DOCKERFILE = """\
FROM debian-12
ENV GREETING=hello-from-dockerfile
RUN useradd -m -u 1500 appuser && mkdir -p /srv/app && chown appuser /srv/app
WORKDIR /srv/app
COPY app.py ./
COPY release.txt ./
RUN date +%s > build-stamp.txt
USER appuser
EXPOSE 8080
CMD ["python3", "app.py"]
"""


def zip_bytes(files):
    """A zip of {name: bytes or str}, files mode 0644 (as `zip` records them;
    zipfile's writestr would say 0600, and COPY keeps modes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return out.getvalue()


def app_zip(release="1"):
    return zip_bytes({"Dockerfile": DOCKERFILE, "app.py": APP, "release.txt": release})


def s3_client(hearth, account):
    return boto3.session.Session().client(
        "s3",
        endpoint_url=hearth.api_url,
        region_name=REGION,
        aws_access_key_id=account["accessKeyId"],
        aws_secret_access_key=account["secretAccessKey"],
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def wait_image(client, name, wanted, timeout=900):
    """Polls GetMicrovmImage until its state is one of `wanted` (a tuple)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        image = client.get_microvm_image(imageIdentifier=name)
        if image["state"] in wanted:
            return image
        time.sleep(1)
    raise AssertionError(f"{name} did not reach {wanted}: {image}")


def build_of(client, name, version):
    builds = client.list_microvm_image_builds(imageIdentifier=name, imageVersion=version)["items"]
    assert len(builds) == 1, builds
    return client.get_microvm_image_build(imageIdentifier=name, imageVersion=version,
                                          buildId=builds[0]["buildId"])


def hooks(validate=False):
    image_hooks = {"ready": "ENABLED", "readyTimeoutInSeconds": 120}
    if validate:
        image_hooks["validate"] = "ENABLED"
        image_hooks["validateTimeoutInSeconds"] = 60
    return {"port": HOOKS_PORT, "microvmImageHooks": image_hooks}


def create(client, name, uri, **extra):
    params = dict(name=name, baseImageArn=BASE_ARN, buildRoleArn=ROLE, codeArtifact={"uri": uri},
                  resources=[{"minimumMemoryInMiB": 512}])
    params.update(extra)
    return client.create_microvm_image(**params)


def build_log(hearth, build_id):
    """The build's log through the extension route (hearth image logs)."""
    import subprocess

    from conftest import HEARTH

    out = subprocess.run(
        [str(HEARTH), "image", "logs", "--endpoint-url", hearth.api_url, "--region", REGION, *build_id],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": hearth.account["accessKeyId"],
             "AWS_SECRET_ACCESS_KEY": hearth.account["secretAccessKey"]},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hearth(model_path, guest_cleanup, tmp_path_factory, request):
    data_dir = short_data_dir(tmp_path_factory, "bld")
    request.addfinalizer(lambda: kill_leftover_qemu(data_dir))
    server = Hearth(data_dir).start()
    request.addfinalizer(server.stop)
    server.use_account(create_account(server.info, "build-tenant"))
    return server


@pytest.fixture(scope="module")
def s3(hearth):
    s3 = s3_client(hearth, hearth.account)
    s3.create_bucket(Bucket="build-artifacts")
    return s3


@pytest.fixture(scope="module")
def built(hearth, s3):
    """The app built once through boto3; returns (name, first build, seconds)."""
    s3.put_object(Bucket="build-artifacts", Key="app/v1.zip", Body=app_zip("1"))
    started = time.monotonic()
    out = create(hearth.client, "webapp", "s3://build-artifacts/app/v1.zip", hooks=hooks(validate=True),
                 environmentVariables={"FROM_IMAGE": "image-level"})
    assert out["state"] == "CREATING" and out["imageVersion"] == "1.0", out
    image = wait_image(hearth.client, "webapp", ("CREATED", "CREATE_FAILED"))
    elapsed = time.monotonic() - started
    build = build_of(hearth.client, "webapp", "1.0")
    assert image["state"] == "CREATED", build
    return "webapp", build, elapsed


# ---------------------------------------------------------------- the app


def test_built_app_answers_with_state_from_before_the_snapshot(hearth, built):
    name, build, _ = built
    assert build["buildState"] == "SUCCESSFUL"
    sizes = build["snapshotBuild"]
    assert sizes["memorySnapshotSizeInBytes"] > 0 and sizes["diskSnapshotSizeInBytes"] > 0
    assert sizes["codeInstallSizeInBytes"] > len(APP)
    version = hearth.client.get_microvm_image_version(imageIdentifier=name, imageVersion="1.0")
    assert version["state"] == "SUCCESSFUL" and version["status"] == "ACTIVE"

    answers = []
    for _ in range(2):
        launched_at = time.time()
        vm = run_vm(hearth, name, connectors=(HTTP_INGRESS,))
        try:
            token = app_token(hearth, vm["microvmId"], APP_PORT)
            response = ep_request(hearth, vm["endpoint"], token=token)
            assert response.status_code == 200, response.text
            answer = response.json()
            # Initialised before the snapshot: older than the launch.
            assert answer["started"] < launched_at - 1, (answer, launched_at)
            answers.append(answer)
        finally:
            terminate_quietly(hearth, vm["microvmId"])
    first, second = answers
    assert first["computed"] == __import__("hashlib").sha256(b"x" * 5_000_000).hexdigest()
    # Both microVMs come from one snapshot: the same start-up state.
    assert first["token"] == second["token"] and first["started"] == second["started"]
    assert first["user"] == "appuser" and first["cwd"] == "/srv/app"
    assert first["greeting"] == "hello-from-dockerfile"
    assert first["image_env"] == "image-level"
    assert first["version"] == "1.0" and first["image_name"] == name
    assert first["release"] == "1"


def test_build_log_shows_the_steps(hearth, built):
    name, build, _ = built
    log = build_log(hearth, [name, "--version", "1.0"])
    assert "[1/10] FROM debian-12" in log, log
    assert "RUN useradd" in log
    assert "waiting for the ready hook on port 9000" in log
    assert "validate hook answered 200" in log
    assert "build SUCCESSFUL" in log


def test_update_makes_version_2_while_1_keeps_running(hearth, s3, built):
    name, _, _ = built
    vm = run_vm(hearth, name, connectors=(HTTP_INGRESS,))
    try:
        token = app_token(hearth, vm["microvmId"], APP_PORT)
        s3.put_object(Bucket="build-artifacts", Key="app/v2.zip", Body=app_zip("2"))
        out = hearth.client.update_microvm_image(imageIdentifier=name, baseImageArn=BASE_ARN, buildRoleArn=ROLE,
                                                 codeArtifact={"uri": "s3://build-artifacts/app/v2.zip"},
                                                 resources=[{"minimumMemoryInMiB": 512}], hooks=hooks())
        assert out["imageVersion"] == "2.0" and out["state"] == "UPDATING", out
        # Version 1.0 serves during the build.
        assert ep_request(hearth, vm["endpoint"], token=token).json()["release"] == "1"
        image = wait_image(hearth.client, name, ("UPDATED", "UPDATE_FAILED"))
        assert image["state"] == "UPDATED", build_of(hearth.client, name, "2.0")
        assert image["latestActiveImageVersion"] == "2.0"
        assert ep_request(hearth, vm["endpoint"], token=token).json()["release"] == "1"
    finally:
        terminate_quietly(hearth, vm["microvmId"])
    vm2 = run_vm(hearth, name, connectors=(HTTP_INGRESS,))
    try:
        token = app_token(hearth, vm2["microvmId"], APP_PORT)
        answer = ep_request(hearth, vm2["endpoint"], token=token).json()
        assert answer["release"] == "2" and answer["version"] == "2.0"
    finally:
        terminate_quietly(hearth, vm2["microvmId"])
    # An INACTIVE version refuses RunMicrovm, pinned, as the reference does.
    hearth.client.update_microvm_image_version(imageIdentifier=name, imageVersion="1.0", status="INACTIVE")
    with pytest.raises(hearth.client.exceptions.ResourceNotFoundException) as excinfo:
        hearth.client.run_microvm(imageIdentifier=name, imageVersion="1.0")
    assert "No active version" in excinfo.value.response["Error"]["Message"]
    assert error_of(excinfo) == ("ResourceNotFoundException", 404)


def test_unchanged_rebuild_comes_from_the_cache(hearth, s3, built):
    name, _, first_seconds = built
    s3.put_object(Bucket="build-artifacts", Key="app/v1-again.zip", Body=app_zip("1"))
    started = time.monotonic()
    hearth.client.update_microvm_image(imageIdentifier=name, baseImageArn=BASE_ARN, buildRoleArn=ROLE,
                                       codeArtifact={"uri": "s3://build-artifacts/app/v1-again.zip"},
                                       resources=[{"minimumMemoryInMiB": 512}], hooks=hooks())
    image = wait_image(hearth.client, name, ("UPDATED", "UPDATE_FAILED"))
    seconds = time.monotonic() - started
    version = image["latestActiveImageVersion"]
    assert image["state"] == "UPDATED", build_of(hearth.client, name, version)
    log = build_log(hearth, [name, "--version", version])
    match = re.search(r"steps: (\d+) run, (\d+) from the cache", log)
    assert match and match.group(1) == "0" and int(match.group(2)) >= 5, log
    assert "starting a build VM" not in log
    print(f"first build {first_seconds:.1f} s, cached rebuild {seconds:.1f} s")


def test_the_step_cache_is_never_shared_between_accounts(hearth, s3):
    """Two accounts build the same Dockerfile, whose RUN writes a random secret:
    each account's microVM reads the secret of its own build, and the second
    build runs its RUN step instead of taking the first account's layer."""
    dockerfile = ("FROM debian-12\n"
                  "RUN head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /secret\n"
                  'CMD ["sleep", "infinity"]\n')
    artifact = zip_bytes({"Dockerfile": dockerfile})
    other = create_account(hearth.info, "cache-tenant-b")
    tenants = [(hearth.account, hearth.client, s3),
               (other, client_for(hearth.info, other), s3_client(hearth, other))]
    secrets = []
    for account, client, store in tenants:
        store.create_bucket(Bucket=f"secret-{account['accountId']}")
        store.put_object(Bucket=f"secret-{account['accountId']}", Key="app.zip", Body=artifact)
        create(client, "secret", f"s3://secret-{account['accountId']}/app.zip")
        image = wait_image(client, "secret", ("CREATED", "CREATE_FAILED"))
        assert image["state"] == "CREATED", build_of(client, "secret", "1.0")
        build = build_of(client, "secret", "1.0")
        log = client_log(hearth, account, build)
        assert re.search(r"steps: 1 run, 0 from the cache", log), log
        assert " ---> cached" not in log, log
        vm = client.run_microvm(imageIdentifier="secret")
        try:
            wait_for_state(client, vm["microvmId"], "RUNNING", timeout=120)
            secret = run_in(hearth.info, account, vm["microvmId"], "cat /secret").strip()
            assert re.fullmatch(r"[0-9a-f]{32}", secret), secret
            secrets.append(secret)
        finally:
            terminate_quietly_as(client, vm["microvmId"])
    assert secrets[0] != secrets[1], "account B got account A's RUN layer"


def client_log(hearth, account, build):
    """A build's whole log through the extension route, as `account`."""
    import subprocess

    from conftest import HEARTH

    out = subprocess.run(
        [str(HEARTH), "image", "logs", "--endpoint-url", hearth.api_url, "--region", REGION, "secret"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": account["accessKeyId"],
             "AWS_SECRET_ACCESS_KEY": account["secretAccessKey"]},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def terminate_quietly_as(client, microvm_id):
    try:
        client.terminate_microvm(microvmIdentifier=microvm_id)
    except Exception:  # noqa: BLE001 - cleanup only
        pass


# ---------------------------------------------------------------- failures


def failed_reason(hearth, name, uri, **extra):
    create(hearth.client, name, uri, **extra)
    image = wait_image(hearth.client, name, ("CREATED", "CREATE_FAILED"), timeout=600)
    assert image["state"] == "CREATE_FAILED", image
    assert image["latestFailedImageVersion"] == "1.0"
    build = build_of(hearth.client, name, "1.0")
    assert build["buildState"] == "FAILED"
    assert "snapshotBuild" not in build
    return build["stateReason"]


def bomb_zip():
    """A deflate bomb: 2 GiB of zeros in a few MiB."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("Dockerfile", "FROM debian-12\n")
        with z.open("zeros.bin", "w", force_zip64=True) as f:
            chunk = b"\0" * (1 << 20)
            for _ in range(2048):
                f.write(chunk)
    return out.getvalue()


def traversal_zip():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("Dockerfile", "FROM debian-12\n")
        z.writestr("../../etc/evil", "x")
    return out.getvalue()


@pytest.fixture(scope="module")
def other_bucket(hearth):
    """A bucket of another account."""
    other = create_account(hearth.info, "other-tenant")
    s3 = s3_client(hearth, other)
    s3.create_bucket(Bucket="someone-elses")
    s3.put_object(Bucket="someone-elses", Key="app.zip", Body=app_zip())
    return "someone-elses"


@pytest.mark.parametrize(
    "case, code",
    [
        ("no-bucket", "S3_NO_SUCH_BUCKET"),
        ("no-key", "S3_NO_SUCH_KEY"),
        ("other-account", "S3_ACCESS_DENIED"),
        ("not-s3", "S3_INVALID_OBJECT"),
        ("no-dockerfile", "ARCHIVE_DOCKERFILE_NOT_FOUND"),
        ("not-a-zip", "ARCHIVE_INVALID"),
        ("traversal", "ARCHIVE_INVALID"),
        ("bomb", "ARCHIVE_INVALID"),
        ("failing-run", "CONTAINER_BUILD_FAILED"),
        ("bad-dockerfile", "CONTAINER_BUILD_FAILED"),
        ("disk-full", "DISK_STORAGE_FULL"),
    ],
)
def test_crafted_artifacts_fail_with_the_reference_codes(hearth, s3, other_bucket, case, code):
    bucket = "build-artifacts"
    uri = f"s3://{bucket}/bad/{case}.zip"
    body = {
        "no-dockerfile": lambda: zip_bytes({"app.py": "x"}),
        "not-a-zip": lambda: b"this is not a zip file" * 100,
        "traversal": traversal_zip,
        "bomb": bomb_zip,
        "failing-run": lambda: zip_bytes({"Dockerfile": "FROM debian-12\nRUN echo fine\n"
                                          "RUN echo 'it broke here' >&2 && exit 7\n"}),
        "bad-dockerfile": lambda: zip_bytes({"Dockerfile": "FROM debian-12\nFROBNICATE now\n"}),
        "disk-full": lambda: zip_bytes({"Dockerfile": "FROM debian-12\n"
                                        "RUN fallocate -l 64G /fill\n"}),
    }.get(case)
    if body is not None:
        s3.put_object(Bucket=bucket, Key=f"bad/{case}.zip", Body=body())
    if case == "no-bucket":
        uri = "s3://no-such-bucket-here/app.zip"
    elif case == "other-account":
        uri = f"s3://{other_bucket}/app.zip"
    elif case == "not-s3":
        uri = "https://example.com/app.zip"
    started = time.monotonic()
    reason = failed_reason(hearth, f"bad-{case}", uri)
    assert reason.startswith(code), reason
    if case == "failing-run":
        assert "line 3" in reason and "it broke here" in reason and "7" in reason, reason
    if case == "bad-dockerfile":
        assert "line 2" in reason and "FROBNICATE" in reason.upper(), reason
    if case in ("bomb", "traversal"):
        assert time.monotonic() - started < 60, "refused in bounded time"


def test_build_requests_are_validated(hearth):
    client = hearth.client
    with pytest.raises(client.exceptions.ValidationException):
        create(client, "v1", "s3://b/k", baseImageArn=f"arn:aws:lambda:{REGION}:aws:microvm-image:no-such-base")
    with pytest.raises(client.exceptions.ValidationException):
        create(client, "v2", "s3://b/k", cpuConfigurations=[{"architecture": "ARM_64"}])
    with pytest.raises(client.exceptions.ValidationException):
        create(client, "v3", "s3://b/k", hooks={"port": 9000, "microvmHooks": {"run": "ENABLED"}})
    with pytest.raises(client.exceptions.ValidationException):
        create(client, "v4", "s3://b/k", hooks={"microvmImageHooks": {"ready": "ENABLED"}})


def test_create_twice_conflicts_and_client_token_replays(hearth, s3, built):
    name, _, _ = built
    with pytest.raises(hearth.client.exceptions.ConflictException):
        create(hearth.client, name, "s3://build-artifacts/app/v1.zip")
    first = create(hearth.client, "replayed", "s3://no-such-bucket-here/x.zip", clientToken="token-1")
    again = create(hearth.client, "replayed", "s3://no-such-bucket-here/x.zip", clientToken="token-1")
    assert first["imageVersion"] == again["imageVersion"] == "1.0"
    wait_image(hearth.client, "replayed", ("CREATE_FAILED",), timeout=120)


# ---------------------------------------------------------------- the CLI and the network


def hearth_cli(hearth, *argv, timeout=600):
    import subprocess

    from conftest import HEARTH

    return subprocess.run(
        [str(HEARTH), *argv, "--endpoint-url", hearth.api_url, "--region", REGION],
        capture_output=True, text=True, timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": hearth.account["accessKeyId"],
             "AWS_SECRET_ACCESS_KEY": hearth.account["secretAccessKey"]},
    )


def test_cli_builds_streams_the_log_and_masks_build_args(hearth, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM debian-12\nARG TOKEN\nARG PLAIN=visible-default\n"
        "RUN echo \"token is $TOKEN, plain is $PLAIN\" && test \"$TOKEN\" = s3cr3t-value\n"
        "COPY notes.txt /notes.txt\n"
        "CMD [\"python3\", \"-c\", \"import time; time.sleep(1000000)\"]\n")
    (ctx / "notes.txt").write_text("n\n")
    (ctx / "skip.me").write_text("x\n")
    (ctx / ".dockerignore").write_text("*.me\n")
    out = hearth_cli(hearth, "image", "build", str(ctx), "--name", "cli-app", "--build-arg", "TOKEN=s3cr3t-value")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "token is ***, plain is visible-default" in out.stdout, out.stdout
    assert "s3cr3t-value" not in out.stdout + out.stderr
    assert "build SUCCESSFUL" in out.stdout
    logs = hearth_cli(hearth, "image", "logs", "cli-app")
    assert logs.returncode == 0 and "token is ***" in logs.stdout and "s3cr3t-value" not in logs.stdout
    # The secret never reaches the server's log or the database either.
    data = pathlib.Path(hearth.data_dir)
    for path in [*data.glob("serve-*.log"), *data.glob("*.db*")]:
        assert b"s3cr3t-value" not in path.read_bytes(), path
    # A failing build: exit 1 with the reason.
    (ctx / "Dockerfile").write_text("FROM debian-12\nRUN exit 42\n")
    out = hearth_cli(hearth, "image", "build", str(ctx), "--name", "cli-app")
    assert out.returncode == 1, out.stdout
    assert "CONTAINER_BUILD_FAILED" in out.stderr and "line 2" in out.stderr, out.stderr
    assert "version 2.0" in out.stderr


def test_run_steps_reach_the_network_only_with_internet_egress(hearth, s3, test_internet):
    """A RUN step reaches the (stand-in) internet by address and by name with
    INTERNET_EGRESS, and nothing without it; never the host's loopback."""
    import secrets
    import socket
    import threading

    from conftest import INTERNET_NAME, INTERNET_WEB

    if test_internet is None:
        pytest.skip("VM networks need root")
    marker = secrets.token_hex(8)
    # A service on the host's loopback: QEMU's user network let build steps
    # reach it as 10.0.2.2; nothing may now.
    loopback = socket.socket()
    loopback.bind(("127.0.0.1", 0))
    loopback.listen(8)
    loopback.settimeout(0.2)
    port = loopback.getsockname()[1]
    hits = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                hits.append(loopback.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    fetch = "import urllib.request as u; print(u.urlopen('http://{}/{}', timeout=20).read().decode())"
    probe = f"import socket; socket.create_connection(('10.0.2.2', {port}), timeout=3)"
    try:
        dockerfile = (
            "FROM debian-12\n"
            f"RUN python3 -c \"{fetch.format(INTERNET_WEB, marker)}\"\n"
            f"RUN python3 -c \"{fetch.format(INTERNET_NAME, marker + '-by-name')}\"\n"
            f"RUN python3 -c \"{probe}\" && echo loopback-reached || echo loopback-unreachable\n"
        )
        s3.put_object(Bucket="build-artifacts", Key="net.zip", Body=zip_bytes({"Dockerfile": dockerfile}))
        create(hearth.client, "with-egress", "s3://build-artifacts/net.zip", egressNetworkConnectors=[INTERNET_EGRESS])
        image = wait_image(hearth.client, "with-egress", ("CREATED", "CREATE_FAILED"))
        build = build_of(hearth.client, "with-egress", "1.0")
        assert image["state"] == "CREATED", build
        log = build_log(hearth, ["with-egress"])
        assert f"internet:/{marker}" in log and f"internet:/{marker}-by-name" in log, log
        assert "loopback-unreachable" in log and not hits, log
        reason = failed_reason(hearth, "without-egress", "s3://build-artifacts/net.zip")
        assert reason.startswith("CONTAINER_BUILD_FAILED") and "line 2" in reason, reason
    finally:
        stop.set()
        loopback.close()


# ---------------------------------------------------------------- FROM a registry


def start_registry(directory, test_internet):
    """Debian's docker-registry (scripts/setup-host installs it); returns
    (process, host:port). As root it runs inside the session's stand-in
    internet namespace on a documentation address the host routes to (no
    registry on the host's own addresses for anything to reach); without root
    (no namespaces), on a free loopback port."""
    import socket
    import subprocess

    import requests

    from conftest import INTERNET_REGISTRY

    binary = pathlib.Path("/usr/bin/docker-registry")
    assert binary.exists(), f"{binary} is missing: run scripts/setup-host"
    if test_internet is not None:
        addr = f"{INTERNET_REGISTRY}:5000"
        prefix = ["ip", "netns", "exec", test_internet["netns"]]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        addr = f"127.0.0.1:{port}"
        prefix = []
    config = directory / "registry.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {directory / 'data'}\nhttp:\n  addr: {addr}\n")
    proc = subprocess.Popen([*prefix, str(binary), "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(directory / "registry.log", "w"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://{addr}/v2/", timeout=1).status_code == 200:
                return proc, addr
        except requests.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"docker-registry did not start: {(directory / 'registry.log').read_text()}")


def push_image(addr, name, tag, files, config):
    """Pushes a one-layer image (files: {path: bytes}) through the distribution API."""
    import gzip
    import hashlib
    import tarfile

    import requests

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    layer_tar = raw.getvalue()
    layer = gzip.compress(layer_tar)

    def push_blob(blob):
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        start = requests.post(f"http://{addr}/v2/{name}/blobs/uploads/", timeout=10)
        assert start.status_code == 202, start.text
        location = start.headers["Location"]
        if location.startswith("/"):
            location = f"http://{addr}{location}"
        sep = "&" if "?" in location else "?"
        done = requests.put(f"{location}{sep}digest={digest}", data=blob,
                            headers={"Content-Type": "application/octet-stream"}, timeout=30)
        assert done.status_code == 201, done.text
        return digest

    config = dict(config, rootfs={"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]})
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": push_blob(config_bytes),
                   "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": push_blob(layer),
                    "size": len(layer)}],
    }
    out = requests.put(f"http://{addr}/v2/{name}/manifests/{tag}", data=json.dumps(manifest),
                       headers={"Content-Type": manifest["mediaType"]}, timeout=10)
    assert out.status_code == 201, out.text


def test_from_an_image_of_the_configured_registry(model_path, guest_cleanup, test_internet, tmp_path_factory,
                                                  request):
    """`hearth serve --registry`: FROM pulls through the distribution API; the
    image's Env and WorkingDir carry into the build."""
    from conftest import start_server, stop_server

    reg_dir = tmp_path_factory.mktemp("registry")
    registry, addr = start_registry(reg_dir, test_internet)
    request.addfinalizer(registry.kill)
    push_image(addr, "tiny", "1", {"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n", "srv/base.txt": b"base\n"},
               {"architecture": "amd64", "os": "linux", "config": {"Env": ["FROM_IMAGE=yes"], "WorkingDir": "/srv"}})
    data_dir = short_data_dir(tmp_path_factory, "reg")
    request.addfinalizer(lambda: kill_leftover_qemu(data_dir))
    proc, url = start_server(data_dir, "--registry", addr, "--registry-insecure")
    request.addfinalizer(lambda: stop_server(proc))
    server = {"url": url, "data_dir": data_dir, "proc": proc}
    account = create_account(server, "registry-tenant")
    from conftest import client_for

    client = client_for(server, account)
    hearth = Hearth(data_dir, account)
    hearth.api_url = url
    s3 = s3_client(hearth, account)
    s3.create_bucket(Bucket="reg")
    s3.put_object(Bucket="reg", Key="app.zip", Body=zip_bytes({
        "Dockerfile": f"FROM {addr}/tiny:1\nCOPY hello.txt ./\n",
        "hello.txt": "hello\n",
    }))
    create(client, "from-registry", "s3://reg/app.zip")
    image = wait_image(client, "from-registry", ("CREATED", "CREATE_FAILED"), timeout=300)
    build = build_of(client, "from-registry", "1.0")
    assert image["state"] == "CREATED", build
    log = build_log(hearth, ["from-registry"])
    assert f"resolving {addr}/tiny:1" in log, log
    # A name the registry does not have fails the build with its name.
    s3.put_object(Bucket="reg", Key="missing.zip", Body=zip_bytes({"Dockerfile": f"FROM {addr}/nothing:1\n"}))
    create(client, "missing-base", "s3://reg/missing.zip")
    image = wait_image(client, "missing-base", ("CREATED", "CREATE_FAILED"), timeout=120)
    reason = build_of(client, "missing-base", "1.0")["stateReason"]
    assert image["state"] == "CREATE_FAILED" and reason.startswith("CONTAINER_BUILD_FAILED") and "nothing" in reason


def test_restart_sweeps_the_step_cache_and_keeps_images(hearth, s3, built):
    """At start the server removes step-cache files no build or image needs
    (e.g. left by an interrupted build); built images and cached steps stay."""
    import shutil

    name, _, _ = built
    layers = pathlib.Path(hearth.data_dir) / "build-cache" / "layers"
    some_layer = next(layers.glob("layer-*.qcow2"))
    orphan = layers / "layer-00orphan00.qcow2"
    shutil.copy(some_layer, orphan)
    hearth.stop()
    hearth.restart()
    assert not orphan.exists()
    assert some_layer.exists()
    vm = run_vm(hearth, name, connectors=(HTTP_INGRESS,))
    try:
        token = app_token(hearth, vm["microvmId"], APP_PORT)
        assert ep_request(hearth, vm["endpoint"], token=token).status_code == 200
    finally:
        terminate_quietly(hearth, vm["microvmId"])
    s3 = s3_client(hearth, hearth.account)  # the API listens on a new port
    s3.put_object(Bucket="build-artifacts", Key="app/after-restart.zip", Body=app_zip("2"))
    hearth.client.update_microvm_image(imageIdentifier=name, baseImageArn=BASE_ARN, buildRoleArn=ROLE,
                                       codeArtifact={"uri": "s3://build-artifacts/app/after-restart.zip"},
                                       resources=[{"minimumMemoryInMiB": 512}], hooks=hooks())
    image = wait_image(hearth.client, name, ("UPDATED", "UPDATE_FAILED"))
    version = image["latestActiveImageVersion"]
    assert image["state"] == "UPDATED", build_of(hearth.client, name, version)
    log = build_log(hearth, [name, "--version", version])
    assert re.search(r"steps: 0 run, \d+ from the cache", log), log


def test_a_build_interrupted_by_kill9_runs_again_after_the_restart(hearth, s3, built):
    """kill -9 of the server in the middle of a build: the restarted server
    runs the build again from its stored request (finished steps from the step
    cache), and the version it makes works."""
    name, _, _ = built
    s3 = s3_client(hearth, hearth.account)  # an earlier test's restart moved the API's port
    s3.put_object(Bucket="build-artifacts", Key="app/crash.zip", Body=app_zip("crash"))
    out = hearth.client.update_microvm_image(imageIdentifier=name, baseImageArn=BASE_ARN, buildRoleArn=ROLE,
                                             codeArtifact={"uri": "s3://build-artifacts/app/crash.zip"},
                                             resources=[{"minimumMemoryInMiB": 512}], hooks=hooks())
    version = out["imageVersion"]
    # Killed as soon as the build is under way.
    deadline = time.monotonic() + 300
    while build_of(hearth.client, name, version)["buildState"] != "IN_PROGRESS":
        assert time.monotonic() < deadline, build_of(hearth.client, name, version)
        time.sleep(0.1)
    hearth.kill9()
    hearth.restart()
    image = wait_image(hearth.client, name, ("UPDATED", "UPDATE_FAILED"))
    build = build_of(hearth.client, name, version)
    assert build["buildState"] == "SUCCESSFUL", build
    assert image["latestActiveImageVersion"] == version, image
    log = build_log(hearth, [name, "--version", version])
    assert "restarted during this build" in log, log
    vm = run_vm(hearth, name, connectors=(HTTP_INGRESS,), imageVersion=version)
    try:
        token = app_token(hearth, vm["microvmId"], APP_PORT)
        answer = ep_request(hearth, vm["endpoint"], token=token)
        assert answer.status_code == 200 and answer.json()["release"] == "crash", answer.text
    finally:
        terminate_quietly(hearth, vm["microvmId"])
