"""The quick start's app: a web server on 8080 and lifecycle hooks on 9000.

It warms up when it starts (before the image's snapshot is taken, so every
microVM launched from the image starts warm), answers the `ready` hook once
warm, and learns its microVM's id from the `run` hook, which hearth calls on
each microVM the image launches. GET / on 8080 answers JSON: the id, the run
hook's payload, a hit counter kept in memory (it survives suspend and resume)
and the process id (the same in every microVM: the snapshot's process).
"""
import hashlib
import http.server
import json
import os
import threading

HOOK_PREFIX = "/aws/lambda-microvms/runtime/v1/"
# Stands for the work an app does at start (loading a model, filling a cache).
WARM = hashlib.sha256(b"warm" * 1_000_000).hexdigest()[:16]
STATE = {"microvmId": None, "payload": None, "hits": 0}
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class App(Handler):
    def do_GET(self):
        with LOCK:
            STATE["hits"] += 1
            body = dict(STATE)
        body.update(greeting=os.environ.get("GREETING"), pid=os.getpid(), warm=WARM)
        self.reply(200, body)


class Hooks(Handler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        hook = self.path[len(HOOK_PREFIX):] if self.path.startswith(HOOK_PREFIX) else None
        if hook == "run":
            request = json.loads(raw or b"{}")
            with LOCK:
                STATE["microvmId"] = request.get("microvmId")
                STATE["payload"] = request.get("runHookPayload")
        self.reply(200 if hook else 404, {"hook": hook})

    do_GET = do_POST  # the ready hook


app = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), App)
threading.Thread(target=app.serve_forever, daemon=True).start()
# The hooks port last: once the ready hook answers, the app's port listens.
http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Hooks).serve_forever()
