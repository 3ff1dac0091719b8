"""MicroVM endpoints end to end: a real `hearth serve` (its own, so a test can
kill -9 and restart it), one image imported with runtime hooks (the app of
endpoint_support.APP_SOURCE), real guests under QEMU, and clients speaking
HTTP/1.1, h2c, WebSocket and the shell protocol to the endpoint proxy.

MicroVMs (few: the guests run under TCG on a small machine):
  vm      the shared one (HTTP_INGRESS + SHELL_INGRESS, runHookPayload "hello-from-run"),
          for the token matrix, the protocols, the shell and the agent API
  other   a second one, briefly, for tokens of the wrong microVM
  short-lived ones for the failing /run hook and the lifetime
  idle A  maxIdle 60 s, autoResume, suspended for at most 600 s
  idle B  maxIdle 60 s, no autoResume, suspended for at most 15 s
The idle phase comes last: both idle VMs start together, the server is killed
with SIGKILL 20 s after their last traffic and started again, and both must be
suspended 60 s after that traffic (not 60 s after the restart); then A answers
50 concurrent requests with one resume, and B ends after 15 s suspended.
"""
import base64
import concurrent.futures
import hashlib
import json
import os
import re
import threading
import time
import uuid

import botocore.exceptions
import httpx
import pytest
import requests
import websockets.exceptions

from conftest import client_for, create_account, qemu_vm_dirs, short_data_dir, vm_dir_name, wait_for_state
from endpoint_support import (APP_PORT, CLOSED_PORT, HOOKS_PORT, HTTP_INGRESS, PATTERN, WS_PORT, Hearth,
                              agent_exec, agent_read, app_token, ep_request, hook_lines, import_hook_image,
                              kill_leftover_qemu, make_endpoint_rootfs, run_vm, shell_token, terminate_quietly,
                              ws_connect, ws_status_of)

IMAGE = "endpoint-app"
RUN_PAYLOAD = "hello-from-run"
MIB = 1024 * 1024
IDLE_SECONDS = 60
B_SUSPENDED_SECONDS = 15
KILL_AFTER = 20  # seconds after the idle VMs' last traffic
# How late a suspend may be observed after its deadline: the watcher's 1 s
# tick, the /suspend hook, saving 256 MiB of RAM under TCG, and GetMicrovm polling.
SUSPEND_SLACK = 16


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hearth(model_path, guest_cleanup, tmp_path_factory, request):
    data_dir = short_data_dir(tmp_path_factory, "ep")
    # Whatever happens, no QEMU process of this data directory outlives the module.
    request.addfinalizer(lambda: kill_leftover_qemu(data_dir))
    server = Hearth(data_dir).start()
    request.addfinalizer(server.stop)
    server.use_account(create_account(server.info, "endpoint-tenant"))
    yield server
    for microvm_id in live_microvms(server):
        terminate_quietly(server, microvm_id)


@pytest.fixture(scope="module")
def image(hearth, tmp_path_factory):
    rootfs = make_endpoint_rootfs(tmp_path_factory.mktemp("ep-rootfs") / "tree")
    out = import_hook_image(hearth.data_dir, hearth.account["accountId"], IMAGE, rootfs, hearth.client)
    assert out["imageVersion"] == "1.0", out
    return IMAGE


@pytest.fixture(scope="module")
def vm(hearth, image):
    out = run_vm(hearth, image, runHookPayload=RUN_PAYLOAD)
    yield out
    terminate_quietly(hearth, out["microvmId"])


@pytest.fixture(scope="module")
def tokens(hearth, vm):
    """Tokens of the shared microVM."""
    microvm_id = vm["microvmId"]
    return {
        "app": app_token(hearth, microvm_id, APP_PORT),
        "ws": app_token(hearth, microvm_id, WS_PORT),
        "all": app_token(hearth, microvm_id, "all"),
        "range": app_token(hearth, microvm_id, (APP_PORT, CLOSED_PORT)),
        "hooks": app_token(hearth, microvm_id, HOOKS_PORT),
        "hooks-range": app_token(hearth, microvm_id, (HOOKS_PORT - 1, HOOKS_PORT + 1)),
        "shell": shell_token(hearth, microvm_id),
    }


def live_microvms(hearth):
    try:
        pages = hearth.client.get_paginator("list_microvms").paginate()
        return [item["microvmId"] for page in pages for item in page["items"] if item["state"] != "TERMINATED"]
    except Exception:  # noqa: BLE001 - used in cleanup
        return []


def tampered(token):
    """The token with one character of its middle changed (never a separator)."""
    i = len(token) // 2
    while token[i] == ".":
        i += 1
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]


def app_headers(response):
    """{lowercase name: value} of the headers the app saw (GET / echoes them)."""
    return {name.lower(): value for name, value in response.json()["headers"]}


def is_uuid(text):
    try:
        uuid.UUID(text)
        return True
    except (TypeError, ValueError):
        return False


def ws_recv_until(ws, predicate, timeout=30):
    """Binary frames of a shell as text, until predicate(text so far) holds."""
    seen = ""
    deadline = time.monotonic() + timeout
    while not predicate(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"shell output never matched; got {seen!r}"
        try:
            message = ws.recv(timeout=left)
        except TimeoutError:
            raise AssertionError(f"shell output never matched; got {seen!r}") from None
        assert isinstance(message, bytes), f"a text frame in the shell stream: {message!r}"
        seen += message.decode(errors="replace")
    return seen


# ---------------------------------------------------------------- the endpoint


def test_endpoint_answers_with_a_token(hearth, vm, tokens):
    """RunMicrovm's endpoint is <id>.localhost:EPPORT and a token reaches port 8080."""
    microvm_id = vm["microvmId"]
    assert vm["endpoint"] == f"{microvm_id}.localhost:{hearth.ep_port}"
    response = ep_request(hearth, vm["endpoint"], token=tokens["app"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["port"] == APP_PORT and body["path"] == "/" and body["method"] == "GET"
    # The app sees the proxy's connection from inside the guest and the endpoint as Host.
    assert body["client"] == "127.0.0.1"
    assert app_headers(response)["host"] == vm["endpoint"]
    # An unknown microVM host under the endpoint domain is not an endpoint.
    unknown = ep_request(hearth, f"microvm-{uuid.uuid4()}.localhost:{hearth.ep_port}", token=tokens["app"])
    assert unknown.status_code in (403, 404), unknown.text


def test_token_matrix(hearth, image, vm, tokens):
    """Who gets through: missing, wrong, tampered, other-VM and other-port tokens
    are 403; ranges and allPorts cover ports but never the hooks port; a port
    nothing listens on is 502."""
    endpoint = vm["endpoint"]
    other = run_vm(hearth, image, connectors=[HTTP_INGRESS])
    try:
        other_token = app_token(hearth, other["microvmId"], APP_PORT)
        # A microVM run without SHELL_INGRESS gets no shell token.
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            shell_token(hearth, other["microvmId"])
        assert excinfo.value.response["Error"]["Code"] == "ValidationException"

        cases = [
            # (token, X-aws-proxy-port, expected status, port that answered)
            (None, None, 403, None),
            ("", None, 403, None),
            ("not-a-token", None, 403, None),
            (tampered(tokens["app"]), None, 403, None),
            (tokens["app"][:-4], None, 403, None),
            (other_token, None, 403, None),
            (tokens["shell"], None, 403, None),
            (tokens["shell"], APP_PORT, 403, None),
            (tokens["app"], None, 200, APP_PORT),
            (tokens["app"], APP_PORT, 200, APP_PORT),
            (tokens["app"], WS_PORT, 403, None),
            (tokens["app"], HOOKS_PORT, 403, None),
            (tokens["ws"], None, 403, None),
            (tokens["ws"], WS_PORT, 200, WS_PORT),
            (tokens["range"], APP_PORT, 200, APP_PORT),
            (tokens["range"], WS_PORT, 200, WS_PORT),
            (tokens["range"], CLOSED_PORT, 502, None),
            (tokens["range"], CLOSED_PORT + 1, 403, None),
            (tokens["range"], HOOKS_PORT, 403, None),
            (tokens["all"], None, 200, APP_PORT),
            (tokens["all"], WS_PORT, 200, WS_PORT),
            (tokens["all"], CLOSED_PORT, 502, None),
            (tokens["all"], 65535, 502, None),
            # The hooks port only with a token that names it.
            (tokens["all"], HOOKS_PORT, 403, None),
            (tokens["hooks"], HOOKS_PORT, 200, HOOKS_PORT),
            (tokens["hooks"], None, 403, None),
            (tokens["hooks-range"], HOOKS_PORT, 403, None),
            (tokens["hooks-range"], HOOKS_PORT + 1, 502, None),
        ]
        failures = []
        for token, port, status, answered in cases:
            response = ep_request(hearth, endpoint, token=token, port=port)
            got = response.status_code
            label = f"token={'none' if token is None else token[:12] + '...'} port={port}"
            if got != status:
                failures.append(f"{label}: {got} (wanted {status}) {response.text[:200]}")
                continue
            # Every answer, the proxy's own included, carries a request id.
            if not is_uuid(response.headers.get("x-amzn-requestid")):
                failures.append(f"{label}: no request id: {dict(response.headers)}")
            if status == 200:
                body = response.json()
                if answered == HOOKS_PORT:
                    ok = body.get("hooks") is True
                else:
                    ok = body.get("port") == answered
                if not ok:
                    failures.append(f"{label}: answered by {body}")
            elif status in (403, 502):
                # The proxy's own errors are JSON with a message.
                if "message" not in response.json():
                    failures.append(f"{label}: body {response.text!r}")
        assert not failures, "\n".join(failures)

        # The other microVM's token works on its own endpoint, and ours does not.
        assert ep_request(hearth, other["endpoint"], token=other_token).json()["port"] == APP_PORT
        assert ep_request(hearth, other["endpoint"], token=tokens["all"]).status_code == 403
    finally:
        terminate_quietly(hearth, other["microvmId"])
    wait_for_state(hearth.client, other["microvmId"], "TERMINATED", timeout=30)
    # A token of a terminated microVM opens nothing.
    assert ep_request(hearth, other["endpoint"], token=other_token).status_code in (403, 404)


def test_token_validation(hearth, vm):
    """expirationInMinutes is 1-60 and allowedPorts entries name real ports."""
    loose = client_for(hearth.info, hearth.account, parameter_validation=False)
    microvm_id = vm["microvmId"]
    bad = [
        {"expirationInMinutes": 0, "allowedPorts": [{"port": 8080}]},
        {"expirationInMinutes": 61, "allowedPorts": [{"port": 8080}]},
        {"expirationInMinutes": 5, "allowedPorts": [{"port": 0}]},
        {"expirationInMinutes": 5, "allowedPorts": [{"port": 65536}]},
        {"expirationInMinutes": 5, "allowedPorts": [{"range": {"startPort": 9000, "endPort": 8000}}]},
    ]
    for params in bad:
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            loose.create_microvm_auth_token(microvmIdentifier=microvm_id, **params)
        error = excinfo.value.response
        assert (error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]) == ("ValidationException", 400), \
            (params, error)
    ok = loose.create_microvm_auth_token(microvmIdentifier=microvm_id, expirationInMinutes=60,
                                         allowedPorts=[{"port": 1}, {"range": {"startPort": 2, "endPort": 3}}])
    assert set(ok["authToken"]) == {"X-aws-proxy-auth"} and ok["authToken"]["X-aws-proxy-auth"]


def test_port_header(hearth, vm, tokens):
    """X-aws-proxy-port picks the guest port; anything but 1-65535 in digits is 400."""
    endpoint = vm["endpoint"]
    for port, answered in [(APP_PORT, APP_PORT), (WS_PORT, WS_PORT), ("08081", WS_PORT)]:
        response = ep_request(hearth, endpoint, token=tokens["all"], port=port)
        assert response.status_code == 200, (port, response.text)
        assert response.json()["port"] == answered
    for bad in ["abc", "0", "65536", "-1", "80a", "0x50", "1e3", "8080,8081"]:
        response = ep_request(hearth, endpoint, token=tokens["all"], port=bad)
        assert response.status_code == 400, (bad, response.status_code, response.text)
        assert "message" in response.json()
    # One client connection, alternating ports (8081 answers with Connection: close).
    with requests.Session() as session:
        answered = [ep_request(hearth, endpoint, token=tokens["all"], port=port, session=session).json()["port"]
                    for port in (APP_PORT, WS_PORT, APP_PORT, APP_PORT, WS_PORT, APP_PORT)]
    assert answered == [APP_PORT, WS_PORT, APP_PORT, APP_PORT, WS_PORT, APP_PORT]
    # Also over a WebSocket subprotocol.
    with pytest.raises(websockets.exceptions.InvalidStatus) as excinfo:
        ws_connect(hearth, endpoint, "/ws", subprotocols=[
            "lambda-microvms", f"lambda-microvms.authentication.{tokens['all']}", "lambda-microvms.port.x"])
    assert ws_status_of(excinfo) == 400


def test_proxy_headers_are_stripped_and_request_id_added(hearth, vm, tokens):
    endpoint = vm["endpoint"]
    sent = {"X-Aws-Proxy-Debug": "1", "x-aws-proxy-anything": "secret", "X-Custom": "kept",
            "X-Forwarded-Example": "also-kept"}
    first = ep_request(hearth, endpoint, path="/?q=1", token=tokens["app"], port=APP_PORT, headers=sent)
    assert first.status_code == 200, first.text
    seen = app_headers(first)
    assert not [name for name in seen if name.startswith("x-aws-proxy-")], seen
    assert seen["x-custom"] == "kept" and seen["x-forwarded-example"] == "also-kept"
    assert first.json()["path"] == "/?q=1"
    # The app sees the request id the client gets back.
    assert is_uuid(seen["x-amzn-requestid"]), seen
    assert first.headers["x-amzn-requestid"] == seen["x-amzn-requestid"]
    second = ep_request(hearth, endpoint, token=tokens["app"])
    assert app_headers(second)["x-amzn-requestid"] != seen["x-amzn-requestid"]
    # Keep-alive: several requests on one client connection.
    with requests.Session() as session:
        ids = {app_headers(ep_request(hearth, endpoint, token=tokens["app"], session=session))["x-amzn-requestid"]
               for _ in range(5)}
    assert len(ids) == 5


def test_streams_100_mib_response(hearth, vm, tokens):
    """A 100 MiB chunked response streams through whole (sha256), and a
    Content-Length one keeps its length."""
    size = 100 * MIB
    expected = hashlib.sha256()
    for _ in range(size // len(PATTERN)):
        expected.update(PATTERN)
    started = time.monotonic()
    response = ep_request(hearth, vm["endpoint"], path=f"/big?bytes={size}", token=tokens["app"], stream=True,
                          timeout=120)
    assert response.status_code == 200
    assert response.headers.get("transfer-encoding") == "chunked"
    digest, received, first_byte = hashlib.sha256(), 0, None
    for chunk in response.iter_content(chunk_size=1024 * 1024):
        if first_byte is None:
            first_byte = time.monotonic() - started
        digest.update(chunk)
        received += len(chunk)
    elapsed = time.monotonic() - started
    print(f"100 MiB through the endpoint in {elapsed:.1f}s ({size / MIB / elapsed:.1f} MiB/s), "
          f"first byte after {first_byte:.2f}s")
    assert received == size
    assert digest.hexdigest() == expected.hexdigest()
    # Streamed, not buffered whole: the first bytes came long before the end.
    assert first_byte < elapsed / 2

    length = 16 * MIB + 123
    response = ep_request(hearth, vm["endpoint"], path=f"/big?bytes={length}&mode=length", token=tokens["app"],
                          timeout=120)
    assert response.status_code == 200
    assert response.headers["content-length"] == str(length)
    assert len(response.content) == length
    assert response.content[:len(PATTERN)] == PATTERN and response.content[-123:] == PATTERN[:123]


def test_server_sent_events_arrive_as_sent(hearth, vm, tokens):
    """Three events 0.5 s apart each arrive when sent, not at the end of the stream."""
    started = time.monotonic()
    response = ep_request(hearth, vm["endpoint"], path="/sse", token=tokens["app"], stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    buffer, events = b"", []
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append((time.monotonic() - started, event.decode()))
    ended = time.monotonic() - started
    assert [json.loads(e.split("data: ", 1)[1])["n"] for _, e in events] == [0, 1, 2], events
    assert all("event: tick" in e for _, e in events)
    times = [t for t, _ in events]
    # The app sleeps 0.5 s between events: each arrives on its own, the first
    # about a second before the last (a buffering proxy would deliver all at the end).
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.1, times
    assert times[2] - times[0] >= 0.6 and ended - times[0] >= 0.6, (times, ended)


def test_post_echoes_10_mib(hearth, vm, tokens):
    body = os.urandom(10 * MIB)
    response = ep_request(hearth, vm["endpoint"], "POST", "/echo", token=tokens["app"], data=body,
                          headers={"Content-Type": "application/x-test"}, timeout=120)
    assert response.status_code == 200, response.text[:200]
    assert response.headers["x-echo-sha256"] == hashlib.sha256(body).hexdigest()
    assert response.headers["content-type"] == "application/x-test"
    assert response.content == body

    # A chunked upload (no Content-Length) streams to the app as well.
    pieces = [os.urandom(MIB) for _ in range(3)] + [b"tail"]
    response = ep_request(hearth, vm["endpoint"], "POST", "/echo", token=tokens["app"], data=iter(pieces),
                          timeout=120)
    assert response.status_code == 200
    assert response.content == b"".join(pieces)


def test_http2_prior_knowledge(hearth, vm, tokens):
    """h2c with prior knowledge: requests, a POST body and concurrent streams on one
    connection; the app still gets HTTP/1.1 with the endpoint as Host."""
    headers = {"Host": vm["endpoint"], "X-aws-proxy-auth": tokens["app"]}
    url = f"http://127.0.0.1:{hearth.ep_port}"
    with httpx.Client(http1=False, http2=True, timeout=60) as client:
        response = client.get(f"{url}/?h2=1", headers=headers)
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["path"] == "/?h2=1" and body["version"] == "HTTP/1.1"
        seen = {name.lower(): value for name, value in body["headers"]}
        assert seen["host"] == vm["endpoint"]
        assert not [name for name in seen if name.startswith("x-aws-proxy-")]
        assert seen["x-amzn-requestid"] == response.headers["x-amzn-requestid"]

        payload = os.urandom(512 * 1024)
        echoed = client.post(f"{url}/echo", headers=headers, content=payload)
        assert echoed.http_version == "HTTP/2" and echoed.content == payload

        denied = client.get(f"{url}/", headers={"Host": vm["endpoint"]})
        assert denied.http_version == "HTTP/2" and denied.status_code == 403

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: client.get(f"{url}/?stream={i}", headers=headers), range(8)))
        assert [r.status_code for r in results] == [200] * 8
        assert [r.json()["path"] for r in results] == [f"/?stream={i}" for i in range(8)]


def test_websocket_echo_and_subprotocols(hearth, vm, tokens):
    """Token and port as subprotocols, stripped before the app; the app's own
    subprotocol passes through and is the one chosen."""
    endpoint = vm["endpoint"]
    offered = ["lambda-microvms", f"lambda-microvms.authentication.{tokens['ws']}",
               f"lambda-microvms.port.{WS_PORT}", "chat.v1"]
    with ws_connect(hearth, endpoint, "/chat", subprotocols=offered) as ws:
        assert ws.subprotocol == "chat.v1"
        ws.send("hello")
        assert ws.recv(timeout=30) == "hello"
        ws.send("héllo ✓")
        assert ws.recv(timeout=30) == "héllo ✓"
        blob = os.urandom(200 * 1024)
        ws.send(blob)
        assert ws.recv(timeout=30) == blob
        ws.send("__info__")
        info = json.loads(ws.recv(timeout=30))
        assert info["path"] == "/chat"
        assert info["protocols"] == ["chat.v1"]
        assert not [name for name in info["headers"] if name.startswith("x-aws-proxy-")], info["headers"]
        assert info["headers"]["host"] == [endpoint]
        ws.close()
    assert ws.close_code == 1000

    # Only the proxy's subprotocols: the app sees none, the client gets lambda-microvms back.
    with ws_connect(hearth, endpoint, "/", subprotocols=offered[:3]) as ws:
        assert ws.subprotocol == "lambda-microvms"
        ws.send("__info__")
        info = json.loads(ws.recv(timeout=30))
        assert info["protocols"] == [] and "sec-websocket-protocol" not in info["headers"]

    # Token and port as headers instead.
    with ws_connect(hearth, endpoint, "/h", headers={"X-aws-proxy-auth": tokens["all"],
                                                     "X-aws-proxy-port": str(WS_PORT)}) as ws:
        assert ws.subprotocol is None
        ws.send("via headers")
        assert ws.recv(timeout=30) == "via headers"

    # A token for 8080 only does not open port 8081; a missing one opens nothing.
    for protocols in (
        ["lambda-microvms", f"lambda-microvms.authentication.{tokens['app']}", f"lambda-microvms.port.{WS_PORT}"],
        ["lambda-microvms", f"lambda-microvms.port.{WS_PORT}", "chat.v1"],
        ["lambda-microvms", f"lambda-microvms.authentication.{tampered(tokens['ws'])}",
         f"lambda-microvms.port.{WS_PORT}"],
    ):
        with pytest.raises(websockets.exceptions.InvalidStatus) as excinfo:
            ws_connect(hearth, endpoint, "/", subprotocols=protocols)
        assert ws_status_of(excinfo) == 403


def test_shell_session(hearth, vm, tokens):
    """session_init, PTY bytes, resize, and close 1000 when the shell exits."""
    protocols = ["lambda-microvms", f"lambda-microvms.authentication.{tokens['shell']}"]
    with ws_connect(hearth, vm["endpoint"], "/shell", subprotocols=protocols) as ws:
        assert ws.subprotocol == "lambda-microvms"
        init = json.loads(ws.recv(timeout=30))
        assert init["type"] == "session_init" and is_uuid(init["session_id"]), init
        ws.send(json.dumps({"type": "resize", "cols": 100, "rows": 30}))
        ws.send(b"echo hello-$((6*7))\n")
        ws_recv_until(ws, lambda text: "hello-42" in text)
        ws.send(b"stty size; echo \"uid=$(id -u) cwd=$(pwd)\"\n")
        out = ws_recv_until(ws, lambda text: re.search(r"uid=\d+ cwd=\S+", text) is not None)
        assert re.search(r"[\r\n]30 100\r?\n", out), out
        assert "uid=0 cwd=/root" in out
        # The same guest as the app: its hooks log is there.
        ws.send(b"grep -c ^run /tmp/hooks.log\n")
        ws_recv_until(ws, lambda text: re.search(r"[\r\n]1\r?\n", text) is not None)
        ws.send(b"exit\n")
        with pytest.raises(websockets.exceptions.ConnectionClosedOK):
            while True:
                ws.recv(timeout=30)
    assert ws.close_code == 1000
    assert ws.close_reason == "shell exited"

    # An app token (even allPorts) opens no shell: /shell then goes to the app,
    # which has no such page.
    for token in (tokens["all"], tokens["app"]):
        with pytest.raises(websockets.exceptions.InvalidStatus) as excinfo:
            ws_connect(hearth, vm["endpoint"], "/shell",
                       subprotocols=["lambda-microvms", f"lambda-microvms.authentication.{token}"])
        status = ws_status_of(excinfo)
        assert status in (403, 404), status
        if status == 404:
            assert json.loads(excinfo.value.response.body)["app"] == "not found"
    with pytest.raises(websockets.exceptions.InvalidStatus) as excinfo:
        ws_connect(hearth, vm["endpoint"], "/shell", subprotocols=["lambda-microvms"])
    assert ws_status_of(excinfo) == 403


def test_agent_api(hearth, vm, tokens):
    """Streamed exec and file transfer with a shell token (hearth extension)."""
    endpoint, token = vm["endpoint"], tokens["shell"]
    stdout, stderr, end, _ = agent_exec(hearth, endpoint, token, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (stdout, stderr) == (b"out\n", b"err\n")
    assert end["exitCode"] == 3 and end["timedOut"] is False

    stdout, _, end, _ = agent_exec(hearth, endpoint, token, ["sh", "-c", 'echo "$GREETING"; pwd; cat'],
                                   env={"GREETING": "hi there"}, cwd="/tmp", stdin=b"from stdin\n")
    assert stdout == b"hi there\n/tmp\nfrom stdin\n" and end["exitCode"] == 0

    # Output streams while the process runs.
    _, _, end, lines = agent_exec(hearth, endpoint, token, ["sh", "-c", "echo first; sleep 1.5; echo second"])
    firsts = [t for t, line in lines if base64.b64decode(line.get("stdout", "")) == b"first\n"]
    assert firsts and lines[-1][0] - firsts[0] >= 0.75, lines

    _, _, end, _ = agent_exec(hearth, endpoint, token, ["sleep", "30"], timeoutInSeconds=1)
    assert end["timedOut"] is True and end.get("exitCode") != 0

    content = os.urandom(3 * MIB + 7)
    put = ep_request(hearth, endpoint, "PUT", "/.hearth/v1/files", token=token,
                     params={"path": "/root/up/data.bin", "mode": "600"}, data=content, timeout=120)
    assert put.status_code == 201, put.text
    assert put.json() == {"bytes": len(content)}
    got = agent_read(hearth, endpoint, token, "/root/up/data.bin")
    assert got.status_code == 200 and got.content == content
    stdout, _, _, _ = agent_exec(hearth, endpoint, token, ["stat", "-c", "%a %s", "/root/up/data.bin"])
    assert stdout.decode().split() == ["600", str(len(content))]

    missing = agent_read(hearth, endpoint, token, "/no/such/file")
    assert missing.status_code == 404
    relative = agent_read(hearth, endpoint, token, "relative/path")
    assert relative.status_code == 400

    # Only a shell token opens the agent API.
    for wrong in (None, tokens["all"], tokens["app"], tampered(token)):
        response = ep_request(hearth, endpoint, "POST", "/.hearth/v1/exec", token=wrong, json={"argv": ["true"]})
        assert response.status_code == 403, (wrong, response.status_code, response.text)


def test_run_hook_gets_the_payload(hearth, vm, tokens):
    """/run was called once, before RUNNING, with the microVM id and the payload;
    the image's ready hook ran at import (its line is in the snapshot)."""
    lines = hook_lines(hearth, vm["endpoint"], tokens["shell"])
    hooks = [hook for hook, _ in lines]
    assert "ready" in hooks, lines
    runs = [json.loads(body) for hook, body in lines if hook == "run"]
    assert runs == [{"microvmId": vm["microvmId"], "runHookPayload": RUN_PAYLOAD}], lines
    assert hooks.index("run") > max(i for i, hook in enumerate(hooks) if hook == "ready")
    assert not {"suspend", "resume", "terminate"} & set(hooks), lines


def test_failing_run_hook_terminates(hearth, image):
    out = hearth.client.run_microvm(imageIdentifier=image, runHookPayload="fail",
                                    ingressNetworkConnectors=[HTTP_INGRESS])
    microvm_id = out["microvmId"]
    try:
        final, seen = wait_for_state(hearth.client, microvm_id, "TERMINATED", timeout=60)
    finally:
        terminate_quietly(hearth, microvm_id)
    assert "RUNNING" not in seen, seen
    assert final["stateReason"] == "Run lifecycle hook returned HTTP status 500."
    assert vm_dir_name(microvm_id) not in qemu_vm_dirs(hearth.data_dir).values()


def test_lifetime_ends_the_microvm(hearth, image):
    """maximumDurationInSeconds=5: RUNNING, answering, then TERMINATED at about 5 s."""
    out = hearth.client.run_microvm(imageIdentifier=image, maximumDurationInSeconds=5,
                                    ingressNetworkConnectors=[HTTP_INGRESS])
    microvm_id = out["microvmId"]
    try:
        running, _ = wait_for_state(hearth.client, microvm_id, "RUNNING", timeout=30)
        token = app_token(hearth, microvm_id, APP_PORT)
        started = running["startedAt"].timestamp()
        if time.time() - started < 4:
            assert ep_request(hearth, running["endpoint"], token=token).status_code == 200
        final, seen = wait_for_state(hearth.client, microvm_id, "TERMINATED", timeout=30, interval=0.2)
    finally:
        terminate_quietly(hearth, microvm_id)
    assert final["stateReason"] == "The MicroVM reached its maximum duration."
    lived = final["terminatedAt"].timestamp() - started
    assert 5 <= lived <= 20, (lived, seen)
    assert ep_request(hearth, running["endpoint"], token=token).status_code in (403, 404)
    assert vm_dir_name(microvm_id) not in qemu_vm_dirs(hearth.data_dir).values()


# ---------------------------------------------------------------- idle policy and restart


class IdleWatch:
    """Polls GetMicrovm for the idle microVMs and records when each state was
    first seen (monotonic), across server restarts (errors while the server is
    down are skipped)."""

    def __init__(self, hearth, ids):
        self.hearth = hearth
        self.first_seen = {i: {} for i in ids}
        self.last = {}

    def poll(self):
        for microvm_id, seen in self.first_seen.items():
            try:
                out = self.hearth.client.get_microvm(microvmIdentifier=microvm_id)
            except Exception:  # noqa: BLE001 - the server may be restarting
                continue
            seen.setdefault(out["state"], (time.monotonic(), time.time()))
            self.last[microvm_id] = out

    def until(self, predicate, timeout, interval=0.5):
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if predicate():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; states first seen: {self.first_seen}")
            time.sleep(interval)

    def state(self, microvm_id):
        return self.last[microvm_id]["state"]

    def when(self, microvm_id, state):
        """Monotonic time the state was first seen, or None."""
        return self.first_seen[microvm_id].get(state, (None, None))[0]

    def when_wall(self, microvm_id, state):
        return self.first_seen[microvm_id].get(state, (None, None))[1]


@pytest.fixture(scope="module")
def idle(hearth, image):
    """Two idle-policy microVMs started together, each sent one request (their
    last traffic) once RUNNING."""
    policies = {
        "a": {"maxIdleDurationSeconds": IDLE_SECONDS, "suspendedDurationSeconds": 600, "autoResumeEnabled": True},
        "b": {"maxIdleDurationSeconds": IDLE_SECONDS, "suspendedDurationSeconds": B_SUSPENDED_SECONDS,
              "autoResumeEnabled": False},
    }
    vms = {key: run_vm(hearth, image, wait=False, idlePolicy=policy) for key, policy in policies.items()}
    ctx = {"ids": {key: out["microvmId"] for key, out in vms.items()}}
    try:
        for key, microvm_id in ctx["ids"].items():
            vms[key] = wait_for_state(hearth.client, microvm_id, "RUNNING", timeout=60)[0]
            assert vms[key]["idlePolicy"] == policies[key], vms[key]
        ctx["vms"] = vms
        ctx["tokens"] = {key: app_token(hearth, ctx["ids"][key], APP_PORT) for key in vms}
        ctx["shell"] = shell_token(hearth, ctx["ids"]["a"])
        ctx["traffic"] = {}
        for key in vms:
            before = time.monotonic()
            response = ep_request(hearth, vms[key]["endpoint"], token=ctx["tokens"][key])
            assert response.status_code == 200, response.text
            ctx["traffic"][key] = (before, time.monotonic())
        ctx["watch"] = IdleWatch(hearth, ctx["ids"].values())
        yield ctx
    finally:
        for microvm_id in ctx["ids"].values():
            terminate_quietly(hearth, microvm_id)


def endpoint_now(hearth, vm_out):
    """A microVM's endpoint on the current endpoint port (it changes when the server restarts on port 0)."""
    return f"{vm_out['microvmId']}.localhost:{hearth.ep_port}"


def test_idle_timers_survive_a_server_restart(hearth, idle):
    """kill -9 of the server 20 s after the last traffic, a restart: both idle
    microVMs are still suspended 60 s after that traffic, not 60 s after the restart."""
    watch, ids = idle["watch"], idle["ids"]
    last_after = max(after for _, after in idle["traffic"].values())
    time.sleep(max(0, last_after + KILL_AFTER - time.monotonic()))
    watch.poll()
    assert {watch.state(i) for i in ids.values()} == {"RUNNING"}, watch.last
    dirs = {vm_dir_name(i) for i in ids.values()}
    hearth.kill9()
    killed_at = time.monotonic()
    assert dirs <= set(qemu_vm_dirs(hearth.data_dir).values()), "the microVMs did not outlive the server"
    hearth.restart()
    restarted_at = time.monotonic()
    print(f"server restarted in {restarted_at - killed_at:.1f}s")
    watch.poll()
    assert {watch.state(i) for i in ids.values()} == {"RUNNING"}, watch.last
    watch.until(lambda: all(watch.when(i, "SUSPENDED") for i in ids.values()),
                timeout=IDLE_SECONDS + SUSPEND_SLACK + 15)
    for key, microvm_id in ids.items():
        before, after = idle["traffic"][key]
        suspended = watch.when(microvm_id, "SUSPENDED")
        print(f"idle {key}: SUSPENDED seen {suspended - after:.1f}s after its last traffic, "
              f"{suspended - restarted_at:.1f}s after the restart")
        assert suspended - after >= IDLE_SECONDS - 1, (key, suspended - after)
        assert suspended - before <= IDLE_SECONDS + SUSPEND_SLACK, (key, suspended - before)
        assert suspended < restarted_at + IDLE_SECONDS - 5, "the timer restarted with the server"
    # The restarted server's endpoints carry its new port.
    for key, microvm_id in ids.items():
        got = hearth.client.get_microvm(microvmIdentifier=microvm_id)
        assert got["endpoint"] == endpoint_now(hearth, got), got["endpoint"]


def test_suspended_duration_terminates(hearth, idle):
    """Without autoResume a request with a valid token does not wake a SUSPENDED
    microVM (502); after suspendedDurationSeconds suspended it is TERMINATED with
    a reason."""
    microvm_id, token = idle["ids"]["b"], idle["tokens"]["b"]
    watch = idle["watch"]
    watch.until(lambda: watch.when(microvm_id, "SUSPENDED"), timeout=IDLE_SECONDS + SUSPEND_SLACK)
    suspended = watch.when(microvm_id, "SUSPENDED")
    assert time.monotonic() - suspended < B_SUSPENDED_SECONDS - 5, "too late to check a request while suspended"
    assert vm_dir_name(microvm_id) not in qemu_vm_dirs(hearth.data_dir).values()
    response = ep_request(hearth, endpoint_now(hearth, idle["vms"]["b"]), token=token)
    assert response.status_code == 502, (response.status_code, response.text)
    time.sleep(1)
    assert hearth.client.get_microvm(microvmIdentifier=microvm_id)["state"] == "SUSPENDED"
    watch.until(lambda: watch.when(microvm_id, "TERMINATED"), timeout=B_SUSPENDED_SECONDS + 30)
    final = hearth.client.get_microvm(microvmIdentifier=microvm_id)
    # terminatedAt against the wall clock of the first SUSPENDED seen (polled every 0.5 s).
    after = final["terminatedAt"].timestamp() - watch.when_wall(microvm_id, "SUSPENDED")
    print(f"idle b: TERMINATED {after:.1f}s after SUSPENDED was first seen")
    assert B_SUSPENDED_SECONDS - 1.5 <= after <= B_SUSPENDED_SECONDS + 15, after
    assert [s for s, (t, _) in watch.first_seen[microvm_id].items() if t > suspended] in (
        ["TERMINATED"], ["TERMINATING", "TERMINATED"]), watch.first_seen[microvm_id]
    assert final["stateReason"] and "suspended" in final["stateReason"].lower(), final["stateReason"]
    assert vm_dir_name(microvm_id) not in qemu_vm_dirs(hearth.data_dir).values()


def test_idle_suspend_then_one_auto_resume_for_50_requests(hearth, idle):
    """A SUSPENDED microVM (its /suspend hook called, its QEMU gone): requests
    without a valid token never wake it; 50 concurrent requests with a token all
    get 200 through exactly one resume."""
    microvm_id, token = idle["ids"]["a"], idle["tokens"]["a"]
    endpoint = endpoint_now(hearth, idle["vms"]["a"])
    watch = idle["watch"]
    watch.until(lambda: watch.when(microvm_id, "SUSPENDED"), timeout=IDLE_SECONDS + SUSPEND_SLACK)
    assert hearth.client.get_microvm(microvmIdentifier=microvm_id)["state"] == "SUSPENDED"
    assert vm_dir_name(microvm_id) not in qemu_vm_dirs(hearth.data_dir).values()

    for wrong, port in [(None, None), ("not-a-token", None), (tampered(token), None),
                        (idle["tokens"]["b"], None), (token, WS_PORT), (token, HOOKS_PORT)]:
        response = ep_request(hearth, endpoint, token=wrong, port=port)
        assert response.status_code == 403, (wrong, port, response.status_code, response.text)
    # Nor does the agent API without a shell token.
    assert ep_request(hearth, endpoint, "POST", "/.hearth/v1/exec", token=token,
                      json={"argv": ["true"]}).status_code == 403
    time.sleep(2)
    assert hearth.client.get_microvm(microvmIdentifier=microvm_id)["state"] == "SUSPENDED"
    assert vm_dir_name(microvm_id) not in qemu_vm_dirs(hearth.data_dir).values()

    barrier = threading.Barrier(50)

    def one(i):
        barrier.wait(timeout=30)
        started = time.monotonic()
        response = ep_request(hearth, endpoint, path=f"/?n={i}", token=token, timeout=90)
        return response.status_code, response.json().get("path"), time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    statuses = [status for status, _, _ in results]
    elapsed = sorted(elapsed for _, _, elapsed in results)
    print(f"50 requests to a suspended microVM: answered after {elapsed[0]:.1f}s (first), "
          f"{elapsed[25]:.1f}s (median), {elapsed[-1]:.1f}s (last)")
    assert statuses == [200] * 50, results
    assert [path for _, path, _ in results] == [f"/?n={i}" for i in range(50)]
    assert hearth.client.get_microvm(microvmIdentifier=microvm_id)["state"] == "RUNNING"

    lines = hook_lines(hearth, endpoint, idle["shell"])
    hooks = [hook for hook, _ in lines if hook != "ready"]
    assert hooks == ["run", "suspend", "resume"], lines


def test_terminate_leaves_no_qemu(hearth):
    """Terminating every microVM of the module ends all its QEMU processes."""
    ids = live_microvms(hearth)
    for microvm_id in ids:
        hearth.client.terminate_microvm(microvmIdentifier=microvm_id)
    for microvm_id in ids:
        final, _ = wait_for_state(hearth.client, microvm_id, "TERMINATED", timeout=60, interval=0.2)
        assert final["stateReason"], final
    deadline = time.monotonic() + 10
    while qemu_vm_dirs(hearth.data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_vm_dirs(hearth.data_dir) == {}
