"""Unit tests that need no server: sandbox.logs() against a local fake of the
log route's contract, .dockerignore rules and the context zip, the error
mapping, and the endpoint transport."""
import datetime as dt
import http.server
import io
import json
import threading
import urllib.parse
import zipfile

import boto3
import pytest

import hearth
from hearth import exceptions
from hearth._endpoint import EndpointSession, loopback_target
from hearth.image import ignored, zip_context

KEY_ID, SECRET = "HKIAFAKEKEY", "fake-secret"


class FakeServer:
    """An HTTP server on 127.0.0.1 that records requests and answers with
    `answer(path, query) -> (status, headers, body)`."""

    def __init__(self, answer):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                parsed = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parsed.query))
                outer.requests.append({"path": parsed.path, "query": query, "headers": dict(self.headers)})
                status, headers, body = answer(parsed.path, query)
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def sandbox_on(url):
    session = boto3.session.Session(aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    connection = hearth.Connection(url, "us-east-1", session)
    return hearth.Sandbox(connection, {"microvmId": "mvm-0123", "endpoint": "mvm-0123.localhost:1"})


PAGES = {
    None: ([{"timestamp": 1_700_000_000_000, "stream": "stdout", "message": "app started"},
            {"timestamp": 1_700_000_000_500, "stream": "stderr", "message": "warning: x"}], "c1"),
    "c1": ([{"timestamp": 1_700_000_001_000, "stream": "stdout", "message": "GET /"}], "c2"),
    "c2": ([], "c2"),
}


@pytest.fixture
def log_server():
    def answer(path, query):
        if path != "/hearth/2025-09-09/microvms/mvm-0123/logs":
            return 404, {"x-amzn-errortype": "ResourceNotFoundException"}, {"message": "no such microVM"}
        events, next_offset = PAGES[query.get("offset")]
        return 200, {}, {"events": events, "nextOffset": next_offset}

    server = FakeServer(answer)
    yield server
    server.close()


def test_logs_pages_through_the_route_signed(log_server):
    events = sandbox_on(log_server.url).logs(since=dt.datetime(2023, 11, 14, tzinfo=dt.timezone.utc))
    assert [(e.stream, e.message) for e in events] == [
        ("stdout", "app started"), ("stderr", "warning: x"), ("stdout", "GET /")]
    assert events[0].timestamp == dt.datetime.fromtimestamp(1_700_000_000, dt.timezone.utc)
    # One request per page, each following the previous page's cursor.
    assert [r["query"].get("offset") for r in log_server.requests] == [None, "c1", "c2"]
    for request in log_server.requests:
        assert request["query"]["follow"] == "false"
        assert request["query"]["since"] == str(int(dt.datetime(2023, 11, 14, tzinfo=dt.timezone.utc).timestamp()
                                                    * 1000))
        authorization = request["headers"]["Authorization"]
        assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential={KEY_ID}/")
        assert "/us-east-1/lambda/aws4_request" in authorization
        assert "X-Amz-Date" in request["headers"]


def test_logs_signature_verifies(log_server):
    """The signature is SigV4 over the request as sent (recomputed here)."""
    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials

    sandbox_on(log_server.url).logs()
    first = log_server.requests[0]
    query = urllib.parse.urlencode(first["query"])
    request = botocore.awsrequest.AWSRequest(method="GET", url=f"{log_server.url}{first['path']}?{query}", data=b"")
    request.context["timestamp"] = first["headers"]["X-Amz-Date"]
    signer = botocore.auth.SigV4Auth(botocore.credentials.Credentials(KEY_ID, SECRET), "lambda", "us-east-1")
    request.headers["X-Amz-Date"] = first["headers"]["X-Amz-Date"]
    canonical = signer.canonical_request(request)
    string_to_sign = signer.string_to_sign(request, canonical)
    expected = signer.signature(string_to_sign, request)
    assert first["headers"]["Authorization"].endswith(f"Signature={expected}")


def test_logs_errors_are_typed():
    server = FakeServer(lambda path, query: (404, {"x-amzn-errortype": "ResourceNotFoundException"},
                                             {"message": "MicroVM mvm-0123 not found"}))
    try:
        with pytest.raises(hearth.NotFoundError, match="not found"):
            sandbox_on(server.url).logs()
    finally:
        server.close()


@pytest.mark.parametrize("code,status,cls", [
    ("ResourceNotFoundException", 404, hearth.NotFoundError),
    ("ConflictException", 409, hearth.ConflictError),
    ("ValidationException", 400, hearth.ValidationError),
    ("ThrottlingException", 429, hearth.ThrottlingError),
    ("ServiceQuotaExceededException", 402, hearth.QuotaExceededError),
    ("AccessDeniedException", 403, hearth.AccessDeniedError),
    ("InternalServerException", 500, hearth.ServerError),
    ("", 502, hearth.ServerError),
    ("", 403, hearth.AccessDeniedError),
])
def test_error_codes_map_to_types(code, status, cls):
    from botocore.exceptions import ClientError

    err = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                      "Op")
    mapped = exceptions.from_client_error(err)
    assert type(mapped) is cls
    assert (mapped.code, mapped.status, mapped.message) == (code, status, "m")


def test_command_exit_error_carries_the_output():
    error = hearth.CommandExitError(stdout="o", stderr="first\nlast line\n", exit_code=2)
    assert (error.stdout, error.stderr, error.exit_code) == ("o", "first\nlast line\n", 2)
    assert "exit code 2" in str(error) and "last line" in str(error)
    assert issubclass(hearth.CommandTimeoutError, TimeoutError)


@pytest.mark.parametrize("path,patterns,expected", [
    ("secret.txt", ["secret.txt"], True),
    ("app.py", ["secret.txt"], False),
    ("logs/a/b.log", ["logs"], True),
    ("logs/a/b.log", ["logs", "!logs/a/b.log"], False),
    ("src/x.pyc", ["**/*.pyc"], True),
    ("x.pyc", ["**/*.pyc"], True),
    ("src/x.py", ["*.py"], False),
    ("x.py", ["/*.py"], True),
    ("a1", ["a[0-9]"], True),
    ("ab", ["a[^0-9]"], True),
    ("a?", ["a\\?"], True),
    ("ab", ["a\\?"], False),
    ("node_modules/x", ["# comment", "", "node_modules/"], True),
])
def test_dockerignore_rules(path, patterns, expected):
    assert ignored(path, patterns) is expected


def test_zip_context_leaves_out_ignored_files(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM debian-12\n")
    (tmp_path / "app.py").write_text("print(1)\n")
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / ".dockerignore").write_text("*.log\nbuild\n")
    (tmp_path / "debug.log").write_text("x")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "out").write_text("x")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "link").symlink_to("app.py")
    archive = zipfile.ZipFile(io.BytesIO(zip_context(tmp_path)))
    names = sorted(archive.namelist())
    assert names == [".dockerignore", "Dockerfile", "app.py", "pkg/", "pkg/mod.py", "run.sh"]
    assert archive.read("Dockerfile") == b"FROM debian-12\n"
    assert (archive.getinfo("run.sh").external_attr >> 16) & 0o777 == 0o755
    # An unchanged directory zips to the same bytes.
    assert zip_context(tmp_path) == zip_context(tmp_path)


def test_loopback_target_keeps_the_host():
    assert loopback_target("http://mvm-1.localhost:9080/a?b=1") == ("http://127.0.0.1:9080/a?b=1",
                                                                     "mvm-1.localhost:9080")
    assert loopback_target("https://example.com/x") == ("https://example.com/x", None)


def test_endpoint_session_adds_token_and_port_for_its_host_only():
    seen = []

    def answer(path, query):
        return 200, {}, {"ok": True}

    server = FakeServer(answer)
    try:
        port = server.url.rsplit(":", 1)[1]
        minted = []
        session = EndpointSession(f"http://mvm-1.localhost:{port}", 3000,
                                  lambda: minted.append(1) or "TOKEN")
        assert session.get("/path?q=1").json() == {"ok": True}
        sent = server.requests[-1]
        assert sent["path"] == "/path" and sent["query"] == {"q": "1"}
        assert sent["headers"]["Host"] == f"mvm-1.localhost:{port}"
        assert sent["headers"]["X-aws-proxy-auth"] == "TOKEN"
        assert sent["headers"]["X-aws-proxy-port"] == "3000"
        # Another host gets no token.
        session.get(f"{server.url}/elsewhere")
        assert "X-aws-proxy-auth" not in server.requests[-1]["headers"]
        seen.append(len(minted))
    finally:
        server.close()
    assert seen == [1]


def test_endpoint_and_region_resolution(monkeypatch):
    for key in ("HEARTH_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_LAMBDA_MICROVMS", "AWS_REGION",
                "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    session = lambda: boto3.session.Session(aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)  # noqa: E731
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert hearth.Connection(session=session()).endpoint_url == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA_MICROVMS", "http://127.0.0.1:2")
    assert hearth.Connection(session=session()).endpoint_url == "http://127.0.0.1:2"
    monkeypatch.setenv("HEARTH_ENDPOINT_URL", "http://127.0.0.1:3")
    connection = hearth.Connection(session=session())
    assert (connection.endpoint_url, connection.region) == ("http://127.0.0.1:3", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    connection = hearth.Connection("http://127.0.0.1:4", session=session())
    assert (connection.endpoint_url, connection.region) == ("http://127.0.0.1:4", "eu-west-1")
    assert hearth.Connection(region="ap-south-1", session=session()).region == "ap-south-1"
