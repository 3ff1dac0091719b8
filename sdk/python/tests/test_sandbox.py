"""The SDK end to end against a real `hearth serve` and real guests: an image
built with Image.build from a small directory, sandboxes, commands, files,
the endpoint, suspend/resume, connect/list and the context manager."""
import os
import time

import boto3
import pytest

import hearth

APP = r'''
import http.server, json, os

COUNT = [0]
print("app started", flush=True)


class App(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        COUNT[0] += 1
        print(f"GET {self.path}", flush=True)
        body = json.dumps({"greeting": os.environ.get("GREETING"), "pid": os.getpid(), "count": COUNT[0],
                           "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("0.0.0.0", 8080), App).serve_forever()
'''

DOCKERFILE = """FROM debian-12
ENV GREETING=hello
WORKDIR /app
COPY . /app
CMD ["python3", "/app/app.py"]
"""


@pytest.fixture(scope="module")
def image(server, tmp_path_factory):
    """The test image, built through the SDK; (Image, the log it streamed)."""
    context = tmp_path_factory.mktemp("context")
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "app.py").write_text(APP)
    (context / "secret.txt").write_text("not for the image")
    (context / ".dockerignore").write_text("secret.txt\n")
    log = []
    built = hearth.Image.build(context, "sdk-web", memory=512, on_log=log.append)
    return built, "".join(log)


@pytest.fixture(scope="module")
def sandbox(image):
    with hearth.Sandbox.create("sdk-web", envs={"FROM_SANDBOX": "yes"}) as sandbox:
        yield sandbox


def lambda_client():
    return boto3.client("lambda-microvms", endpoint_url=os.environ["HEARTH_ENDPOINT_URL"],
                        region_name=os.environ["AWS_REGION"])


def state_of(microvm_id):
    return lambda_client().get_microvm(microvmIdentifier=microvm_id)["state"]


def test_image_build_streams_the_log(image):
    built, log = image
    assert built.name == "sdk-web"
    assert built.version == "1.0"
    assert built.arn.endswith(":microvm-image:sdk-web") or "sdk-web" in built.arn
    assert "COPY" in log, log


def test_a_failed_build_raises_build_error(server, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM debian-12\nRUN echo about to fail; exit 7\n")
    with pytest.raises(hearth.BuildError) as excinfo:
        hearth.Image.build(tmp_path, "sdk-broken", memory=512, on_log=None)
    assert "CONTAINER_BUILD_FAILED" in (excinfo.value.state_reason or ""), excinfo.value.state_reason
    assert "about to fail" in excinfo.value.log


def test_run_captures_stdout_stderr_and_exit_code(sandbox):
    result = sandbox.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)


def test_non_zero_exit_raises_command_exit_error(sandbox):
    with pytest.raises(hearth.CommandExitError) as excinfo:
        sandbox.commands.run("echo partial; echo broken >&2; exit 3")
    error = excinfo.value
    assert (error.exit_code, error.stdout, error.stderr) == (3, "partial\n", "broken\n")


def test_cwd_envs_and_user(sandbox):
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    out = sandbox.commands.run('echo "$FROM_SANDBOX $EXTRA"', envs={"EXTRA": "x"}).stdout
    assert out == "yes x\n"
    assert sandbox.commands.run('echo "$FROM_SANDBOX"', envs={"FROM_SANDBOX": "override"}).stdout == "override\n"
    assert sandbox.commands.run("id -un", user="nobody").stdout == "nobody\n"


def test_output_callbacks_see_output_as_it_arrives(sandbox):
    seen = []
    started = time.monotonic()
    result = sandbox.commands.run("echo one; sleep 2; echo two; echo three >&2",
                                  on_stdout=lambda text: seen.append(("out", text, time.monotonic() - started)),
                                  on_stderr=lambda text: seen.append(("err", text, time.monotonic() - started)))
    assert "".join(t for kind, t, _ in seen if kind == "out") == result.stdout == "one\ntwo\n"
    assert "".join(t for kind, t, _ in seen if kind == "err") == "three\n"
    first = next(at for kind, text, at in seen if "one" in text)
    assert first < time.monotonic() - started - 1.5, seen


def test_timeout_kills_the_command(sandbox):
    started = time.monotonic()
    with pytest.raises(hearth.CommandTimeoutError):
        sandbox.commands.run("echo begun; sleep 30", timeout=2)
    assert time.monotonic() - started < 20


def test_background_wait_and_kill(sandbox):
    handle = sandbox.commands.run("sleep 1; echo done", background=True)
    assert handle.wait(timeout=60).stdout == "done\n"

    handle = sandbox.commands.run("echo $$ > /tmp/bg.pid; exec sleep 1000", background=True)
    deadline = time.monotonic() + 30
    while not sandbox.files.exists("/tmp/bg.pid"):
        assert time.monotonic() < deadline, "the background command did not start"
        time.sleep(0.2)
    pid = sandbox.files.read("/tmp/bg.pid").strip()
    assert sandbox.commands.run(f"kill -0 {pid}").exit_code == 0
    assert handle.kill() is True
    with pytest.raises(hearth.CommandExitError) as excinfo:
        handle.wait(timeout=30)
    assert excinfo.value.exit_code == 137
    # Closing the request killed the process in the guest.
    deadline = time.monotonic() + 15
    while True:
        try:
            sandbox.commands.run(f"kill -0 {pid} 2>/dev/null")
        except hearth.CommandExitError:
            break
        assert time.monotonic() < deadline, f"process {pid} outlived kill()"
        time.sleep(0.2)


def test_files_write_read_list(sandbox):
    info = sandbox.files.write("/root/data/note.txt", "hello\nworld\n")
    assert (info.path, info.size) == ("/root/data/note.txt", 12)
    payload = bytes(range(256)) * 1000
    sandbox.files.write("/root/data/blob.bin", payload)
    assert sandbox.files.read("/root/data/note.txt") == "hello\nworld\n"
    assert sandbox.files.read("/root/data/blob.bin", format="bytes") == payload
    assert b"".join(sandbox.files.read("/root/data/blob.bin", format="stream")) == payload
    assert sandbox.files.make_dir("/root/data/sub") is True
    assert sandbox.files.make_dir("/root/data/sub") is False
    entries = {e.name: e for e in sandbox.files.list("/root/data")}
    assert set(entries) == {"note.txt", "blob.bin", "sub"}
    assert (entries["note.txt"].type, entries["note.txt"].size) == ("file", 12)
    assert entries["blob.bin"].size == len(payload)
    assert entries["sub"].type == "dir"
    assert entries["note.txt"].path == "/root/data/note.txt"
    with pytest.raises(hearth.NotFoundError):
        sandbox.files.read("/root/data/missing")
    with pytest.raises(hearth.NotFoundError):
        sandbox.files.list("/root/nowhere")
    sandbox.files.remove("/root/data/sub")
    assert not sandbox.files.exists("/root/data/sub")
    # .dockerignore kept secret.txt out of the image.
    names = {e.name for e in sandbox.files.list("/app")}
    assert "app.py" in names and "secret.txt" not in names, names


def test_http_reaches_the_app(sandbox):
    assert sandbox.get_host(8080) == sandbox.endpoint
    assert sandbox.get_url(8080) == f"http://{sandbox.endpoint}"
    assert sandbox.endpoint.startswith(f"{sandbox.id}.localhost:")
    response = sandbox.http().get("/hello")
    assert response.status_code == 200, response.text
    assert response.json()["greeting"] == "hello"
    assert response.json()["path"] == "/hello"
    # Nothing listens on 9999: the proxy answers 502.
    assert sandbox.http(9999).get("/").status_code == 502
    # Without the session's token the endpoint refuses.
    import requests
    host = sandbox.endpoint
    refused = requests.get(f"http://127.0.0.1:{host.rsplit(':', 1)[1]}/", headers={"Host": host}, timeout=30)
    assert refused.status_code == 403


def test_logs_hold_what_the_app_printed_after_the_launch(sandbox):
    """sandbox.logs() through the real logs route: the app's line for a
    request made now, on stdout; its start-up line (printed before the image's
    snapshot, so the build's) is not this sandbox's."""
    assert sandbox.http().get("/logged-by-the-app").status_code == 200
    deadline = time.monotonic() + 30
    events = []
    while time.monotonic() < deadline:
        events = sandbox.logs()
        if any(e.message == "GET /logged-by-the-app" for e in events):
            break
        time.sleep(0.5)
    lines = [(e.stream, e.message) for e in events]
    assert ("stdout", "GET /logged-by-the-app") in lines, lines
    assert ("stdout", "app started") not in lines, lines


def test_suspend_resume_keeps_state_and_connect(sandbox):
    sandbox.files.write("/root/kept.txt", "kept")
    before = sandbox.http().get("/").json()
    sandbox.suspend()
    assert state_of(sandbox.id) == "SUSPENDED"
    # connect resumes a suspended sandbox.
    again = hearth.Sandbox.connect(sandbox.id)
    assert state_of(sandbox.id) == "RUNNING"
    after = again.http().get("/").json()
    assert after["pid"] == before["pid"]
    assert after["count"] == before["count"] + 1
    assert again.files.read("/root/kept.txt") == "kept"
    sandbox.suspend()
    sandbox.resume()
    assert sandbox.commands.run("cat /root/kept.txt").stdout == "kept"
    assert sandbox.id in {info.sandbox_id for info in hearth.Sandbox.list()}


def test_context_manager_terminates(image):
    with hearth.Sandbox.create("sdk-web", timeout=600) as sandbox:
        assert sandbox.commands.run("echo inside").stdout == "inside\n"
        microvm_id = sandbox.id
    assert state_of(microvm_id) in ("TERMINATING", "TERMINATED")
    assert microvm_id not in {info.sandbox_id for info in hearth.Sandbox.list()}
    assert microvm_id in {info.sandbox_id for info in hearth.Sandbox.list(include_terminated=True)}


def test_memory_is_checked_against_the_image(image):
    with pytest.raises(hearth.ValidationError, match="512 MiB"):
        hearth.Sandbox.create("sdk-web", memory=4096)


def test_unknown_sandbox_is_not_found(server, sandbox):
    other = sandbox.id[:-4] + ("0000" if not sandbox.id.endswith("0000") else "1111")
    with pytest.raises(hearth.NotFoundError):
        hearth.Sandbox.connect(other)


def test_api_errors_are_typed(image):
    # The lifetime is at most 28,800 s: the server answers ValidationException.
    with pytest.raises(hearth.ValidationError) as excinfo:
        hearth.Sandbox.create("sdk-web", timeout=999_999)
    assert (excinfo.value.code, excinfo.value.status) == ("ValidationException", 400)
    with pytest.raises(hearth.NotFoundError) as excinfo:
        hearth.Sandbox.create("sdk-no-such-image")
    assert excinfo.value.code == "ResourceNotFoundException"
