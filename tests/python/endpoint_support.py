"""Helpers for test_endpoint.py: the guest app the endpoint tests talk to, an
image import with runtime hooks, a restartable `hearth serve` with its endpoint
port, and small clients for the endpoint (HTTP/1.1 with `requests`, HTTP/2 with
httpx, WebSockets with `websockets`, the agent API).

Python's resolvers do not resolve `<microvm-id>.localhost`, so every client here
connects to 127.0.0.1:EPPORT and sends the endpoint as the Host header (for
WebSockets: a connected socket is handed to `websockets` with the endpoint in
the URI, so its Host header is the endpoint).
"""
import base64
import json
import os
import pathlib
import re
import signal
import socket
import time
import warnings

import botocore.exceptions
import requests

from conftest import (FAST_RATES, HEARTH, IMPORT_ATTEMPTS, REGION, BootHang, client_for, imported_version,
                      kill_qemu_under, make_rootfs, qemu_processes, run_import, start_server, stop_server,
                      wait_for_state)

CONNECTOR = f"arn:aws:lambda:{REGION}:aws:network-connector:aws-network-connector:"
HTTP_INGRESS = CONNECTOR + "HTTP_INGRESS"
SHELL_INGRESS = CONNECTOR + "SHELL_INGRESS"
HOOKS_PORT = 9000
APP_PORT = 8080
WS_PORT = 8081
CLOSED_PORT = 8082  # nothing listens there in the guest
HOOK_PREFIX = "/aws/lambda-microvms/runtime/v1/"
# Token rates high enough for a suite that mints many tokens in a row.
ENDPOINT_RATES = [*FAST_RATES, "--rate-limit", "CreateMicrovmAuthToken=200",
                  "--rate-limit", "CreateMicrovmShellAuthToken=200"]

# The 64 KiB block /big repeats (the test computes the same digest).
PATTERN = bytes(range(256)) * 256

# The guest app (stdlib only: the base image has python3 and nothing else).
#   8080  HTTP/1.1: GET / (JSON echo of what arrived), GET /big?bytes=N[&mode=length]
#         (N bytes of PATTERN, chunked by default), GET /sse (3 events 0.5 s apart),
#         POST /echo (the body back, Content-Length or chunked request bodies).
#   8081  WebSocket echo (handshake by hand): text and binary frames echoed; the
#         text "__info__" answers JSON with the subprotocols and headers the
#         handshake carried. A plain GET answers JSON {"port": 8081, ...}.
#   9000  hooks: POST /aws/lambda-microvms/runtime/v1/<hook> appends
#         "<hook> <body>" to /tmp/hooks.log and answers 200; `run` with
#         runHookPayload "fail" answers 500. GET answers {"hooks": true}.
APP_SOURCE = r'''
import base64, hashlib, http.server, json, os, socketserver, threading, time, urllib.parse

LOG = "/tmp/hooks.log"
LOG_LOCK = threading.Lock()
PATTERN = bytes(range(256)) * 256
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PREFIX = "/aws/lambda-microvms/runtime/v1/"


def read_body(handler):
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        parts = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


class Base(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body, content_type="application/json", extra=()):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class App(Base):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/":
            self.reply(200, {"port": 8080, "method": "GET", "path": self.path, "version": self.request_version,
                             "client": self.client_address[0],
                             "headers": [[k, v] for k, v in self.headers.items()]})
        elif url.path == "/big":
            total = int(query["bytes"][0])
            chunked = query.get("mode", ["chunked"])[0] != "length"
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(total))
            self.end_headers()
            sent = 0
            while sent < total:
                piece = PATTERN[:min(len(PATTERN), total - sent)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for n in range(3):
                if n:
                    time.sleep(0.5)
                event = ("id: %d\nevent: tick\ndata: {\"n\": %d}\n\n" % (n, n)).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.reply(404, {"app": "not found", "path": self.path})

    def do_POST(self):
        body = read_body(self)
        if self.path.startswith("/echo"):
            self.reply(200, body, self.headers.get("Content-Type", "application/octet-stream"),
                       [("X-Echo-Sha256", hashlib.sha256(body).hexdigest()),
                        ("X-Echo-Chunked", str("chunked" in self.headers.get("Transfer-Encoding", "").lower()))])
        else:
            self.reply(404, {"app": "not found", "path": self.path})


class Hooks(Base):
    def do_POST(self):
        body = read_body(self)
        if not self.path.startswith(PREFIX):
            return self.reply(404, {"hooks": "unknown path"})
        hook = self.path[len(PREFIX):]
        with LOG_LOCK, open(LOG, "a") as log:
            log.write("%s %s\n" % (hook, body.decode("utf-8", "replace")))
        code = 200
        if hook == "run":
            try:
                payload = json.loads(body).get("runHookPayload")
            except ValueError:
                payload = None
            if payload == "fail":
                code = 500
        self.reply(code, {"hook": hook})

    def do_GET(self):
        self.reply(200, {"hooks": True, "path": self.path})


class WsServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


class WebSocket(socketserver.StreamRequestHandler):
    def frame(self, opcode, payload):
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([n])
        elif n < 65536:
            head += bytes([126]) + n.to_bytes(2, "big")
        else:
            head += bytes([127]) + n.to_bytes(8, "big")
        self.wfile.write(head + payload)

    def read_frame(self):
        head = self.rfile.read(2)
        if len(head) < 2:
            return None, None, b""
        fin, opcode, masked, n = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(self.rfile.read(2), "big")
        elif n == 127:
            n = int.from_bytes(self.rfile.read(8), "big")
        mask = self.rfile.read(4) if masked else b""
        data = self.rfile.read(n)
        if masked and n:
            key = (mask * (n // 4 + 1))[:n]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        return fin, opcode, data

    def handle(self):
        request_line = self.rfile.readline().decode("latin-1").strip()
        headers = {}
        while True:
            line = self.rfile.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        path = request_line.split(" ")[1] if " " in request_line else ""
        if "websocket" not in ",".join(headers.get("upgrade", [])).lower():
            body = json.dumps({"port": 8081, "path": path, "headers": headers}).encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(body), body))
            return
        offered = [p.strip() for v in headers.get("sec-websocket-protocol", []) for p in v.split(",") if p.strip()]
        accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"][0] + GUID).encode()).digest())
        head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        head += b"Sec-WebSocket-Accept: " + accept + b"\r\n"
        if offered:
            head += ("Sec-WebSocket-Protocol: %s\r\n" % offered[0]).encode()
        self.wfile.write(head + b"\r\n")
        info = json.dumps({"path": path, "protocols": offered, "headers": headers}).encode()
        message, message_opcode = b"", 0
        while True:
            fin, opcode, data = self.read_frame()
            if opcode is None:
                return
            if opcode == 8:
                self.frame(8, data[:2])
                return
            if opcode == 9:
                self.frame(10, data)
                continue
            if opcode == 10:
                continue
            if opcode in (1, 2):
                message, message_opcode = data, opcode
            else:
                message += data
            if not fin:
                continue
            if message_opcode == 1 and message == b"__info__":
                self.frame(1, info)
            else:
                self.frame(message_opcode, message)


def serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()


serve(http.server.ThreadingHTTPServer(("0.0.0.0", 8080), App))
serve(WsServer(("0.0.0.0", 8081), WebSocket))
# The hooks port last: the ready hook answering means the app ports listen.
http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Hooks).serve_forever()
'''
APP_CMD = ["python3", "/app/server.py"]


def make_endpoint_rootfs(dest):
    """The debian-12 tree (conftest.make_rootfs) with the endpoint app as /app/server.py."""
    dest = make_rootfs(dest)
    (pathlib.Path(dest) / "app/server.py").write_text(APP_SOURCE)
    return dest


def import_hook_image(data_dir, account_id, name, rootfs, client, hooks="run,resume,suspend,terminate",
                      hook_timeout=15, memory=256, timeout=300):
    """`hearth image import` with runtime hooks enabled (conftest.import_image has
    no flags for them); retries a build VM that hung at boot (see conftest.HANG_SIGN)
    after deleting the failed image through the API. Returns the JSON output.

    The hook timeout is 15 s, not the reference's 1 s: with the host's 2 CPUs
    shared by other suites' guests, a guest just restored under TCG was seen
    taking more than 5 s to answer /run (the VM then ends with "Run lifecycle
    hook invocation timed out after PT5S.")."""
    argv = [str(HEARTH), "image", "import", "--account", account_id, "--name", name, "--rootfs", str(rootfs),
            "--memory", str(memory), "--data-dir", str(data_dir), "--region", REGION, "--json",
            "--hooks-port", str(HOOKS_PORT), "--microvm-hooks", hooks, "--hook-timeout", str(hook_timeout),
            "--cmd", *APP_CMD]
    for attempt in range(IMPORT_ATTEMPTS):
        out, hung = run_import(argv, data_dir, timeout)
        if not hung:
            break
        if attempt == IMPORT_ATTEMPTS - 1:
            raise BootHang(f"import of {name}: the build VM hung at boot: {out.stderr}")
        warnings.warn(f"import of {name} {imported_version(out.stderr)}: the build VM hung at boot "
                      "(engine bug); retrying")
        try:
            client.delete_microvm_image(imageIdentifier=name)
        except botocore.exceptions.ClientError:
            pass
    assert out.returncode == 0, f"import of {name} failed: {out.stderr}"
    return json.loads(out.stdout)


# ---------------------------------------------------------------- the server


class Hearth:
    """A `hearth serve` of the endpoint tests' own (so a test may kill -9 and
    restart it on the same data directory). api_url, ep_port and client follow
    restarts."""

    def __init__(self, data_dir, account=None):
        self.data_dir = pathlib.Path(data_dir)
        self.account = account
        self.proc = None
        self.api_url = None
        self.ep_port = None
        self.client = None

    @property
    def info(self):
        """The dict conftest's helpers take as `server`."""
        return {"url": self.api_url, "data_dir": self.data_dir, "proc": self.proc}

    def start(self):
        # The server's decisions (idle suspends, resumes, hooks) in DATA/serve-*.log.
        old_log = os.environ.get("HEARTH_LOG")
        os.environ["HEARTH_LOG"] = old_log or "info"
        try:
            self.proc, self.api_url = start_server(self.data_dir, *ENDPOINT_RATES)
        finally:
            if old_log is None:
                os.environ.pop("HEARTH_LOG", None)
        self.ep_port = endpoint_port(self.proc)
        if self.account is not None:
            self.client = client_for(self.info, self.account)
        return self

    def use_account(self, account):
        self.account = account
        self.client = client_for(self.info, account)

    def kill9(self):
        """SIGKILL, as a crash: the microVMs keep running."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self):
        return self.start()

    def stop(self):
        if self.proc is not None:
            stop_server(self.proc)


def endpoint_port(proc, timeout=30):
    """The endpoint proxy's port, from `hearth: endpoints on http://<microvm-id>.localhost:PORT`
    in the server's stdout file (beside the log file start_server records)."""
    out_path = pathlib.Path(proc.log_path).with_suffix(".out")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"endpoints on http://\S+:(\d+)", out_path.read_text())
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no endpoint line in {out_path}: {out_path.read_text()!r}")


def kill_leftover_qemu(data_dir):
    """SIGKILLs QEMU processes of data_dir; returns how many there were."""
    found = qemu_processes(f"{data_dir}/")
    kill_qemu_under(f"{data_dir}/")
    deadline = time.monotonic() + 10
    while qemu_processes(f"{data_dir}/") and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(found)


# ---------------------------------------------------------------- microVMs and tokens


def run_vm(hearth, image, wait=True, connectors=(HTTP_INGRESS, SHELL_INGRESS), **params):
    """RunMicrovm (both ingress connectors by default); waits for RUNNING with wait."""
    out = hearth.client.run_microvm(imageIdentifier=image, ingressNetworkConnectors=list(connectors), **params)
    if wait:
        out = wait_for_state(hearth.client, out["microvmId"], "RUNNING", timeout=60)[0]
    return out


def terminate_quietly(hearth, microvm_id):
    try:
        hearth.client.terminate_microvm(microvmIdentifier=microvm_id)
    except Exception:  # noqa: BLE001 - cleanup; the finalizer kills QEMU anyway
        pass


def app_token(hearth, microvm_id, *ports, minutes=10):
    """An endpoint token; each port is an int, (start, end) for a range, or "all"."""
    allowed = []
    for port in ports:
        if port == "all":
            allowed.append({"allPorts": {}})
        elif isinstance(port, tuple):
            allowed.append({"range": {"startPort": port[0], "endPort": port[1]}})
        else:
            allowed.append({"port": port})
    out = hearth.client.create_microvm_auth_token(microvmIdentifier=microvm_id, expirationInMinutes=minutes,
                                                  allowedPorts=allowed)
    return out["authToken"]["X-aws-proxy-auth"]


def shell_token(hearth, microvm_id, minutes=10):
    out = hearth.client.create_microvm_shell_auth_token(microvmIdentifier=microvm_id, expirationInMinutes=minutes)
    return out["authToken"]["X-aws-proxy-auth"]


def endpoint_of(vm):
    """The `endpoint` field of a RunMicrovm/GetMicrovm output."""
    return vm["endpoint"]


# ---------------------------------------------------------------- endpoint clients


def ep_request(hearth, endpoint, method="GET", path="/", token=None, port=None, headers=None, timeout=60,
               session=None, **kwargs):
    """An HTTP/1.1 request to an endpoint through 127.0.0.1:EPPORT with Host = endpoint."""
    sent = {"Host": endpoint}
    if token is not None:
        sent["X-aws-proxy-auth"] = token
    if port is not None:
        sent["X-aws-proxy-port"] = str(port)
    sent.update(headers or {})
    return (session or requests).request(method, f"http://127.0.0.1:{hearth.ep_port}{path}", headers=sent,
                                         timeout=timeout, **kwargs)


def ws_connect(hearth, endpoint, path="/", subprotocols=None, headers=None, open_timeout=30, max_size=2**24):
    """A websockets sync connection to an endpoint: a socket connected to
    127.0.0.1:EPPORT, the endpoint in the URI (so in the Host header)."""
    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", hearth.ep_port), timeout=open_timeout)
    try:
        return connect(f"ws://{endpoint}{path}", sock=sock, subprotocols=subprotocols,
                       additional_headers=headers, open_timeout=open_timeout, max_size=max_size)
    except BaseException:
        sock.close()
        raise


def ws_status_of(excinfo):
    """The HTTP status of a refused WebSocket handshake (websockets.InvalidStatus)."""
    return excinfo.value.response.status_code


# ---------------------------------------------------------------- agent API


def agent_exec(hearth, endpoint, token, argv, timeout=60, **body):
    """POST /.hearth/v1/exec; returns (stdout bytes, stderr bytes, final line,
    [(arrival time, line) for every line])."""
    if isinstance(body.get("stdin"), bytes):
        body["stdin"] = base64.b64encode(body["stdin"]).decode()
    response = ep_request(hearth, endpoint, "POST", "/.hearth/v1/exec", token=token, json={"argv": argv, **body},
                          stream=True, timeout=timeout)
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/x-ndjson"
    stdout, stderr, lines = b"", b"", []
    for raw in response.iter_lines():
        if not raw:
            continue
        line = json.loads(raw)
        lines.append((time.monotonic(), line))
        stdout += base64.b64decode(line.get("stdout", ""))
        stderr += base64.b64decode(line.get("stderr", ""))
    assert lines and "timedOut" in lines[-1][1], lines
    return stdout, stderr, lines[-1][1], lines


def agent_read(hearth, endpoint, token, path):
    """GET /.hearth/v1/files; the response."""
    return ep_request(hearth, endpoint, "GET", "/.hearth/v1/files", token=token, params={"path": path})


def hook_lines(hearth, endpoint, token):
    """/tmp/hooks.log of a RUNNING microVM as [(hook, body text)], read through the agent API."""
    response = agent_read(hearth, endpoint, token, "/tmp/hooks.log")
    assert response.status_code == 200, (response.status_code, response.text)
    lines = []
    for line in response.text.splitlines():
        hook, _, body = line.partition(" ")
        lines.append((hook, body))
    return lines
