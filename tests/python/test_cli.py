"""The CLI's client verbs against a real `hearth serve` with real guests:
`hearth exec` (streaming, exit status, stdin, a terminal), `hearth cp` both
ways, `hearth port-forward` (HTTP and WebSocket through it), `--json` errors,
and the AWS conventions (endpoint variables, credentials, profiles).

The binary runs as a subprocess with HOME pointed at an empty directory, so
no config file of the machine's user is read. MicroVMs: one with
HTTP_INGRESS + SHELL_INGRESS (the endpoint app of endpoint_support), and one
with HTTP_INGRESS only, briefly, for the error exec gives without a shell
connector.
"""
import hashlib
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import termios
import fcntl
import time

import pytest
import requests

from conftest import HEARTH, REGION, create_account, short_data_dir
from endpoint_support import (APP_PORT, HTTP_INGRESS, WS_PORT, Hearth, import_hook_image, kill_leftover_qemu,
                              make_endpoint_rootfs, run_vm, terminate_quietly)

IMAGE = "cli-app"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def hearth(model_path, guest_cleanup, tmp_path_factory, request):
    data_dir = short_data_dir(tmp_path_factory, "cli")
    request.addfinalizer(lambda: kill_leftover_qemu(data_dir))
    server = Hearth(data_dir).start()
    request.addfinalizer(server.stop)
    server.use_account(create_account(server.info, "cli-tenant"))
    return server


@pytest.fixture(scope="module")
def vm(hearth, tmp_path_factory):
    rootfs = make_endpoint_rootfs(tmp_path_factory.mktemp("cli-rootfs") / "tree")
    import_hook_image(hearth.data_dir, hearth.account["accountId"], IMAGE, rootfs, hearth.client)
    out = run_vm(hearth, IMAGE)
    yield out["microvmId"]
    terminate_quietly(hearth, out["microvmId"])


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-home")


def cli_env(hearth, home, **extra):
    """The environment of a CLI run: keys and endpoint from the environment,
    an empty HOME, nothing of the caller's AWS settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HEARTH_"))}
    env.update(HOME=str(home), AWS_ACCESS_KEY_ID=hearth.account["accessKeyId"],
               AWS_SECRET_ACCESS_KEY=hearth.account["secretAccessKey"], HEARTH_ENDPOINT_URL=hearth.api_url)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def cli(hearth, home, *args, input=None, timeout=120, env=None):
    return subprocess.run([str(HEARTH), *args], input=input, capture_output=True, timeout=timeout,
                          env=env or cli_env(hearth, home))


# ---------------------------------------------------------------- exec


def test_exec_streams_output_as_it_comes_and_exits_with_the_status(hearth, vm, home):
    script = "echo first; echo oops >&2; sleep 3; echo second; exit 7"
    proc = subprocess.Popen([str(HEARTH), "exec", vm, "--", "sh", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(hearth, home))
    try:
        first = proc.stdout.readline()
        first_at = time.monotonic()
        assert first == b"first\n"
        rest = proc.stdout.read()
        done_at = time.monotonic()
        assert proc.wait(timeout=60) == 7
    finally:
        proc.kill()
    assert rest == b"second\n"
    # The first line arrived while the command was still sleeping.
    assert done_at - first_at >= 2, (first_at, done_at)
    assert b"oops\n" in proc.stderr.read()


def test_exec_signal_env_cwd_and_timeout(hearth, vm, home):
    out = cli(hearth, home, "exec", vm, "--", "sh", "-c", "kill -TERM $$")
    assert out.returncode == 128 + 15, out
    out = cli(hearth, home, "exec", "--env", "GREETING=hi there", "--cwd", "/tmp", vm, "--",
              "sh", "-c", 'echo "$GREETING"; pwd')
    assert out.returncode == 0, out
    assert out.stdout == b"hi there\n/tmp\n"
    started = time.monotonic()
    out = cli(hearth, home, "exec", "--timeout", "2", vm, "--", "sleep", "60")
    assert out.returncode == 124, out
    assert time.monotonic() - started < 30


def test_exec_forwards_stdin(hearth, vm, home):
    data = os.urandom(3 * MIB)
    out = cli(hearth, home, "exec", "-i", vm, "--", "sha256sum", input=data)
    assert out.returncode == 0, out
    assert out.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # Without -i the command's stdin is empty, whatever ours holds.
    out = cli(hearth, home, "exec", vm, "--", "wc", "-c", input=b"ignored")
    assert out.stdout.strip() == b"0", out


def test_exec_on_a_terminal(hearth, vm, home):
    """-t: the command gets a terminal of our size, follows a resize, and our
    terminal is back in its own mode afterwards."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    before = termios.tcgetattr(slave)
    script = "tty; stty size; read line; stty size; exit 3"
    proc = subprocess.Popen([str(HEARTH), "exec", "-t", vm, "--", "sh", "-c", script],
                            stdin=slave, stdout=slave, stderr=slave, env=cli_env(hearth, home, TERM="xterm"),
                            start_new_session=True)
    output = b""
    resized = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            output += os.read(master, 4096)
        elif proc.poll() is not None:
            break
        if not resized and b"33 111" in output:
            # Raw mode is on while the command runs.
            assert not termios.tcgetattr(slave)[3] & termios.ICANON
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 122, 0, 0))
            proc.send_signal(signal.SIGWINCH)
            time.sleep(1)
            os.write(master, b"go\r")
            resized = True
    try:
        assert proc.wait(timeout=30) == 3, output
        assert b"/dev/pts/" in output, output
        assert b"44 122" in output, output
        after = termios.tcgetattr(slave)
        assert after[3] == before[3] and after[0] == before[0], (before, after)
    finally:
        proc.kill()
        os.close(master)
        os.close(slave)


def test_exec_without_shell_ingress_says_so(hearth, vm, home):
    out = hearth.client.run_microvm(imageIdentifier=IMAGE, ingressNetworkConnectors=[HTTP_INGRESS])
    try:
        res = cli(hearth, home, "exec", "--json", out["microvmId"], "--", "true")
        assert res.returncode == 1, res
        error = json.loads(res.stderr)["error"]
        assert error["code"] == "ValidationException", error
        assert "SHELL_INGRESS" in error["message"] and "--shell" in error["message"], error
    finally:
        terminate_quietly(hearth, out["microvmId"])


# ---------------------------------------------------------------- cp


def test_cp_both_ways_keeps_content_and_mode(hearth, vm, home, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(17 * MIB + 123)
    src.write_bytes(data)
    src.chmod(0o640)
    digest = hashlib.sha256(data).hexdigest()
    out = cli(hearth, home, "cp", "--json", str(src), f"{vm}:/tmp/up/big.bin", timeout=300)
    assert out.returncode == 0, out
    assert json.loads(out.stdout)["bytes"] == len(data)
    out = cli(hearth, home, "exec", vm, "--", "sh", "-c", "stat -c %a /tmp/up/big.bin; sha256sum /tmp/up/big.bin")
    mode, remote_sum = out.stdout.decode().split()[:2]
    assert (mode, remote_sum) == ("640", digest), out
    # A remote path ending in / takes the local name.
    out = cli(hearth, home, "cp", str(src), f"{vm}:/tmp/up/", timeout=300)
    assert out.returncode == 0, out

    back = tmp_path / "back"
    back.mkdir()
    out = cli(hearth, home, "cp", f"{vm}:/tmp/up/big.bin", str(back), timeout=300)
    assert out.returncode == 0, out
    assert hashlib.sha256((back / "big.bin").read_bytes()).hexdigest() == digest
    assert not list(back.glob("*.hearth-partial"))


def test_cp_errors(hearth, vm, home, tmp_path):
    out = cli(hearth, home, "cp", str(tmp_path), f"{vm}:/tmp/dir")
    assert out.returncode == 1 and b"is a directory" in out.stderr, out
    out = cli(hearth, home, "cp", "--json", f"{vm}:/no/such/file", str(tmp_path / "x"))
    assert out.returncode == 1, out
    assert "error" in json.loads(out.stderr)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- port-forward


def start_forward(hearth, home, vm, port):
    proc = subprocess.Popen([str(HEARTH), "port-forward", "--json", vm, f":{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(hearth, home))
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line)["localAddress"]


def test_port_forward_http_and_websocket(hearth, vm, home):
    proc, address = start_forward(hearth, home, vm, APP_PORT)
    try:
        with requests.Session() as session:
            for _ in range(3):  # several requests on one local connection
                response = session.get(f"http://{address}/?x=1", timeout=60)
                assert response.status_code == 200, response.text
                echo = response.json()
                assert echo["path"] == "/?x=1", echo
        body = os.urandom(MIB)
        response = requests.post(f"http://{address}/echo", data=body, timeout=60)
        assert response.status_code == 200 and response.content == body
        curl = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{address}/"],
                              capture_output=True, timeout=60)
        assert curl.stdout == b"200", curl
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0

    from websockets.sync.client import connect
    proc, address = start_forward(hearth, home, vm, WS_PORT)
    try:
        with connect(f"ws://{address}/", open_timeout=30) as ws:
            ws.send("hello through the forward")
            assert ws.recv(timeout=30) == "hello through the forward"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------- errors and configuration


def test_json_errors_and_exit_codes(hearth, home):
    out = cli(hearth, home, "get", "--json", "microvm-doesnotexist")
    assert out.returncode == 1, out
    error = json.loads(out.stderr)["error"]
    assert error["code"] == "ResourceNotFoundException", error
    assert error["message"], error
    out = cli(hearth, home, "get", "--json")
    assert out.returncode == 2, out
    assert json.loads(out.stderr)["error"]["code"] == "UsageError"
    out = cli(hearth, home, "ls", "--json", env=cli_env(hearth, home, HEARTH_ENDPOINT_URL=None,
                                                        AWS_ENDPOINT_URL="http://127.0.0.1:1"))
    assert out.returncode == 1, out
    assert json.loads(out.stderr)["error"]["code"] == "ConnectionError"
    out = cli(hearth, home, "ls", "--json", env=cli_env(hearth, home, AWS_SECRET_ACCESS_KEY="wrong"))
    assert out.returncode == 1, out
    assert json.loads(out.stderr)["error"]["code"] in ("InvalidSignatureException", "AccessDeniedException",
                                                       "UnrecognizedClientException"), out.stderr


def test_endpoint_variables_and_profiles(hearth, vm, home, tmp_path):
    def listed(env, *flags):
        out = cli(hearth, home, "ls", "--json", *flags, env=env)
        assert out.returncode == 0, out
        return {item["microvmId"] for item in json.loads(out.stdout)["items"]}

    # The service's own variable beats AWS_ENDPOINT_URL.
    env = cli_env(hearth, home, HEARTH_ENDPOINT_URL=None, AWS_ENDPOINT_URL="http://127.0.0.1:1",
                  AWS_ENDPOINT_URL_LAMBDA_MICROVMS=hearth.api_url)
    assert vm in listed(env)
    env = cli_env(hearth, home, HEARTH_ENDPOINT_URL=None, AWS_ENDPOINT_URL=hearth.api_url)
    assert vm in listed(env)

    # A profile: keys in the credentials file, endpoint in a services block, region.
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[cli]\naws_access_key_id = {hearth.account['accessKeyId']}\n"
                           f"aws_secret_access_key = {hearth.account['secretAccessKey']}\n")
    credentials.chmod(0o600)
    config = tmp_path / "config"
    config.write_text(f"[profile cli]\nregion = {REGION}\nservices = local\n\n"
                      f"[services local]\nlambda_microvms =\n  endpoint_url = {hearth.api_url}\n")
    env = cli_env(hearth, home, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, HEARTH_ENDPOINT_URL=None,
                  AWS_SHARED_CREDENTIALS_FILE=str(credentials), AWS_CONFIG_FILE=str(config))
    assert vm in listed(env, "--profile", "cli")
    assert vm in listed({**env, "AWS_PROFILE": "cli"})
    out = cli(hearth, home, "ls", "--json", "--profile", "nope", env=env)
    assert out.returncode == 1
    assert json.loads(out.stderr)["error"]["code"] == "ConfigError"
    # The same files found under HOME as ~/.aws/{config,credentials}.
    aws_home = tmp_path / "home"
    (aws_home / ".aws").mkdir(parents=True)
    (aws_home / ".aws/credentials").write_text(credentials.read_text())
    (aws_home / ".aws/config").write_text(config.read_text())
    env = cli_env(hearth, aws_home, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, HEARTH_ENDPOINT_URL=None,
                  AWS_PROFILE="cli")
    assert vm in listed(env)
