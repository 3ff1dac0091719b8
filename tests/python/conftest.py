"""Fixtures: a real `hearth serve` on a free loopback port, accounts made with
`hearth account create`, and boto3 clients built from the API model file.

botocore (1.44.18, pinned by scripts/setup-host) ships the Lambda MicroVMs
model, so the clients are plain `boto3.client("lambda-microvms")`, as users
write them. Only an older botocore without it gets AWS_DATA_PATH pointed at a
directory laid out like botocore's own data
(`lambda-microvms/2025-09-09/{service-2,paginators-1}.json`) holding the
model from the repo.

Guests: images are made with `hearth image import` from a root filesystem
directory unpacked once per session from the debian-12 base image (with
`debugfs rdump`), plus a small app. The server keeps VMs running across its own
exit, so the session ends by killing any QEMU process whose command line names
a directory of this session, and removing the session's RAM directory.
"""
import base64
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import warnings

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "crates/hearth-api/model/lambda-microvms-2025-09-09.json"
PAGINATORS = ROOT / "crates/hearth-api/model/lambda-microvms-2025-09-09.paginators.json"
HEARTH = pathlib.Path(os.environ.get("HEARTH_BIN", ROOT / "target/debug/hearth"))
REGION = "us-east-1"
CACHE = pathlib.Path(os.environ.get("HEARTH_CACHE", pathlib.Path.home() / ".cache/hearth"))
BASE_ROOTFS = CACHE / "images/debian-12/current/rootfs.ext4"
# Generous rates for the session server: the suite runs, suspends and resumes
# in quick succession and its boto3 clients do not retry throttled calls
# (test_api.py checks the reference rates on a server of its own).
FAST_RATES = [
    arg
    for op in ["RunMicrovm", "SuspendMicrovm", "ResumeMicrovm", "TerminateMicrovm"]
    for arg in ("--rate-limit", f"{op}=100")
]
HOOKS_PORT = 9000

# The app baked into test images: an HTTP server on 0.0.0.0:9000 whose ready
# hook answers 503 for its first second, then 200. At start it records its pid
# and a random token, so a test can tell a process restored from the snapshot
# from one started anew.
APP_SERVER = r'''
import http.server, os, secrets, time

START = time.monotonic()
with open("/tmp/app.pid", "w") as f:
    f.write(str(os.getpid()))
with open("/tmp/boot-token", "w") as f:
    f.write(secrets.token_hex(16))


class Hooks(http.server.BaseHTTPRequestHandler):
    def answer(self):
        ready = time.monotonic() - START >= 1.0
        code, body = (200, b"ok") if ready or not self.path.endswith("/ready") else (503, b"not yet")
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Hooks).serve_forever()
'''
APP_CMD = ["python3", "/app/server.py"]
IDLE_CMD = ["python3", "-c", "import time; time.sleep(100000)"]


# ---------------------------------------------------------------- session-wide


# ---------------------------------------------------------------- the test internet
#
# Every server of the session gives its VMs networks whose packets all go to a
# stand-in internet in a network namespace of the session's (a policy route for
# the VMs' address pool), so nothing a guest sends leaves the machine. In it, on
# its loopback: a web server 198.51.100.10 (documentation range) that answers
# `internet:<path>`, a DNS server 198.51.100.53 that answers `web.hn.test`, and
# forbidden destinations (a private address, the metadata address). One TCP
# listener on port 80 serves them all and appends the address each connection
# was made to to a file (`connections`).
NET_TAG = os.getpid() % 10000
# `hnp`, or `$HEARTH_TEST_NET_PREFIX` + `p` when several people test on one
# host (at most 3 letters: a server's --vm-net-name has at most 8).
NET_PREFIX = (os.environ.get("HEARTH_TEST_NET_PREFIX", "hn")[:3] or "hn") + "p"
NET_NAME = f"{NET_PREFIX}{NET_TAG}"
VM_POOL = f"10.214.{NET_TAG % 64 * 4}.0/22"
INTERNET_WEB = "198.51.100.10"
INTERNET_DNS = "198.51.100.53"
INTERNET_NAME = "web.hn.test"
INTERNET_FORBIDDEN = ["10.99.0.10", "169.254.169.254"]
# The build tests' image registry (test_builds.py), served inside the
# namespace too and routed to from the host only (the server pulls, guests do
# not): no test daemon listens on the host's own addresses.
INTERNET_REGISTRY = "198.51.100.30"
NET_ARGS = ["--vm-net-name", NET_NAME, "--vm-address-pool", VM_POOL, "--dns", INTERNET_DNS]

INTERNET_SERVER = r'''
import http.server, socket, socketserver, struct, sys, threading
record = sys.argv[1]
class Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"internet:{self.path}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Recording(http.server.ThreadingHTTPServer):
    def verify_request(self, request, client_address):
        with open(record, "a") as f:
            f.write(request.getsockname()[0] + "\n")
        return True
def dns():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("198.51.100.53", 53))
    while True:
        query, peer = sock.recvfrom(512)
        at, labels = 12, []
        while query[at]:
            labels.append(query[at + 1:at + 1 + query[at]].decode().lower())
            at += 1 + query[at]
        qtype = struct.unpack(">H", query[at + 1:at + 3])[0]
        found = ".".join(labels) == "web.hn.test"
        answer = found and qtype == 1
        reply = query[:2] + (b"\x81\x80" if found else b"\x81\x83") + b"\x00\x01"
        reply += struct.pack(">H", 1 if answer else 0) + b"\x00\x00\x00\x00" + query[12:at + 5]
        if answer:
            reply += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton("198.51.100.10")
        sock.sendto(reply, peer)
threading.Thread(target=dns, daemon=True).start()
Recording(("0.0.0.0", 80), Web).serve_forever()
'''


def ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def remove_test_network():
    """Everything the session's networks made: the stand-in internet, the
    VMs' namespaces and links (their QEMU is gone), the servers' nft table."""
    ip("rule", "del", "from", VM_POOL, check=False)
    ip("route", "flush", "table", str(43000 + NET_TAG), check=False)
    ip("link", "delete", f"{NET_PREFIX}i{NET_TAG}", check=False)
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split(" ")[0]
        if name == f"{NET_PREFIX}-inet-{NET_TAG}" or name.startswith(f"{NET_NAME}-"):
            ip("netns", "delete", name, check=False)
    subprocess.run(["nft", "delete", "table", "inet", NET_NAME], capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def test_internet(tmp_path_factory):
    """The stand-in internet (see above); yields the `connections` file."""
    if os.geteuid() != 0:
        # The servers run without VM networks; network tests skip.
        yield None
        return
    remove_test_network()
    netns, link = f"{NET_PREFIX}-inet-{NET_TAG}", f"{NET_PREFIX}i{NET_TAG}"
    transit = NET_TAG % 64 * 4
    host, inner = f"203.0.113.{transit + 1}", f"203.0.113.{transit + 2}"
    ip("netns", "add", netns)
    ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
    ip("addr", "add", f"{host}/30", "dev", link)
    ip("link", "set", link, "up")
    ip("-n", netns, "link", "set", "lo", "up")
    ip("-n", netns, "addr", "add", f"{inner}/30", "dev", "eth0")
    ip("-n", netns, "link", "set", "eth0", "up")
    ip("-n", netns, "route", "add", "default", "via", host)
    for address in [INTERNET_WEB, INTERNET_DNS, INTERNET_REGISTRY, *INTERNET_FORBIDDEN]:
        ip("-n", netns, "addr", "add", f"{address}/32", "dev", "lo")
    ip("route", "add", f"{INTERNET_REGISTRY}/32", "via", inner, "dev", link)
    table = str(43000 + NET_TAG)
    ip("route", "add", "default", "via", inner, "dev", link, "table", table)
    ip("rule", "add", "from", VM_POOL, "lookup", table, "priority", "101")
    connections = tmp_path_factory.mktemp("internet") / "connections"
    connections.write_text("")
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-c", INTERNET_SERVER, str(connections)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c",
                                f"import socket; socket.create_connection(('{INTERNET_WEB}', 80), timeout=1)"],
                               capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(0.1)
    yield {"connections": connections, "host_address": host, "netns": netns}
    proc.terminate()
    proc.wait(timeout=10)
    remove_test_network()


@pytest.fixture(scope="session", autouse=True)
def guest_cleanup(tmp_path_factory, test_internet):
    """Gives the session its own RAM directory; at the end kills every QEMU
    process started under the session's temporary directory and removes it."""
    base = str(tmp_path_factory.getbasetemp())
    ram_dir = pathlib.Path(f"/dev/shm/hearth-pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    old_ram = os.environ.get("HEARTH_RAM_DIR")
    os.environ["HEARTH_RAM_DIR"] = str(ram_dir)
    yield base
    kill_qemu_under(f"{base}/")
    kill_qemu_under(f"{short_base(tmp_path_factory)}/")
    kill_qemu_under(f"{ram_dir}/")
    shutil.rmtree(ram_dir, ignore_errors=True)
    if old_ram is None:
        os.environ.pop("HEARTH_RAM_DIR", None)
    else:
        os.environ["HEARTH_RAM_DIR"] = old_ram


def botocore_ships_the_model():
    import botocore.exceptions
    import botocore.loaders

    try:
        botocore.loaders.Loader().load_service_model("lambda-microvms", "service-2")
        return True
    except botocore.exceptions.UnknownServiceError:
        return False


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """Where the model comes from: botocore's own (None) or, for a botocore
    without it, a data directory holding the repo's copy."""
    if botocore_ships_the_model():
        return None
    data = tmp_path_factory.mktemp("botocore-data")
    target = data / "lambda-microvms" / "2025-09-09"
    target.mkdir(parents=True)
    shutil.copy(MODEL, target / "service-2.json")
    shutil.copy(PAGINATORS, target / "paginators-1.json")
    os.environ["AWS_DATA_PATH"] = str(data)
    return data


def start_server(data_dir, *extra, timeout=120):
    """Starts `hearth serve` on a free port; returns (process, base URL).
    Its output goes to files in data_dir (a pipe nobody reads would fill)."""
    data_dir = pathlib.Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # No warm pool unless a test asks for one: slots are QEMUs no microVM
    # owns, and the tests count QEMUs (the pool has its own tests).
    if not any(str(arg).startswith("--warm-pool") for arg in extra):
        extra = ("--warm-pool-max", "0", *extra)
    stamp = f"{time.time_ns()}"
    out_path = data_dir / f"serve-{stamp}.out"
    err_path = data_dir / f"serve-{stamp}.log"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [str(HEARTH), "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--endpoint-listen", "127.0.0.1:0", "--region", REGION, *NET_ARGS, *extra],
            stdout=out,
            stderr=err,
            text=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out_path.read_text().splitlines():
            if "listening on" in line:
                proc.log_path = err_path
                return proc, line.strip().rsplit(" ", 1)[-1]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"hearth serve did not start: {out_path.read_text()!r} {err_path.read_text()}")


def stop_server(proc):
    """Ends a server started by start_server (its VMs keep running)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# The server refuses a data directory longer than this: QEMU's UNIX sockets
# live under DATA/engine/vms/<vm>/ and a socket path must fit 107 bytes
# (layout.rs, check_socket_room).
MAX_DATA_DIR = 44


def short_base(tmp_path_factory):
    """A short twin of pytest's base directory, /tmp/hpy/<run number>: pytest's
    own (/tmp/pytest-of-<user>/pytest-<n>) grows a byte every time its run
    counter gains a digit, which would push data directories past the socket
    limit. Twins of runs pytest no longer keeps are removed."""
    basetemp = tmp_path_factory.getbasetemp()
    run = basetemp.name.rsplit("-", 1)[-1]
    root = pathlib.Path("/tmp/hpy")
    root.mkdir(mode=0o700, exist_ok=True)
    base = root / run
    if not base.exists():
        kept = {p.name.rsplit("-", 1)[-1] for p in basetemp.parent.iterdir()}
        for old in root.iterdir():
            if old.name not in kept:
                kill_qemu_under(f"{old}/")
                shutil.rmtree(old, ignore_errors=True)
        base.mkdir(mode=0o700, exist_ok=True)
    return base


def short_data_dir(tmp_path_factory, name):
    """A fresh data directory with a short path (see short_base)."""
    base = short_base(tmp_path_factory)
    for n in range(10_000):
        data_dir = base / f"{name}{n}"
        try:
            data_dir.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    assert len(str(data_dir)) <= MAX_DATA_DIR, data_dir
    return data_dir


@pytest.fixture(scope="session")
def server(model_path, guest_cleanup, tmp_path_factory):
    data_dir = short_data_dir(tmp_path_factory, "data")
    proc, url = start_server(data_dir, *FAST_RATES)
    yield {"url": url, "data_dir": data_dir, "proc": proc}
    stop_server(proc)


def create_account(server, name):
    out = subprocess.run(
        [str(HEARTH), "account", "create", "--name", name, "--json", "--data-dir", str(server["data_dir"])],
        capture_output=True,
        text=True,
    )
    # Its stderr in the failure: a bare exit status says nothing.
    assert out.returncode == 0, f"hearth account create failed: {out.stderr}"
    return json.loads(out.stdout)


def client_for(server, account, **overrides):
    session = boto3.session.Session()
    return session.client(
        "lambda-microvms",
        endpoint_url=server["url"],
        region_name=overrides.pop("region", REGION),
        aws_access_key_id=overrides.pop("key_id", account["accessKeyId"]),
        aws_secret_access_key=overrides.pop("secret", account["secretAccessKey"]),
        config=botocore.config.Config(
            retries={"max_attempts": 1},
            parameter_validation=overrides.pop("parameter_validation", True),
        ),
    )


@pytest.fixture(scope="session")
def account(server):
    return create_account(server, "tenant-a")


@pytest.fixture(scope="session")
def client(server, account):
    return client_for(server, account)


# ---------------------------------------------------------------- guests


def make_rootfs(dest):
    """Unpacks the debian-12 base image into the directory dest and adds the
    test app as /app/server.py."""
    if not BASE_ROOTFS.is_file():
        pytest.skip(f"no base image at {BASE_ROOTFS}: run scripts/setup-host")
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["debugfs", "-R", f"rdump / {dest}", str(BASE_ROOTFS)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and (dest / "usr/bin/python3").exists(), out.stderr
    (dest / "app").mkdir(exist_ok=True)
    (dest / "app/server.py").write_text(APP_SERVER)
    return dest


@pytest.fixture(scope="session")
def app_rootfs(tmp_path_factory):
    """A root filesystem directory holding python3 and the test app."""
    return make_rootfs(tmp_path_factory.mktemp("rootfs") / "tree")


# The build VM's cold boot used to hang under host CPU contention (under TCG the
# guest kernel's PIT calibration of the TSC failed and the kernel spun with its
# clock stuck at 0.000000); the engine now passes `tsc_early_khz=`. A hang shows
# at once on the quiet console as the RTC warning stamped 0.000000 (a good boot
# stamps it at ~1 s): the import is then stopped and the test fails fast instead
# of waiting 180 s for the agent. It is not retried: a hang is a bug.
HANG_SIGN = "[    0.000000] Unable to read current time from RTC"
IMPORT_ATTEMPTS = 1
# How the import reports a build VM whose guest never came up.
BOOT_HANG = ("agent did not answer within", "the build VM did not boot")


def imported_version(stderr):
    """The version an import announced on stderr ("image N version 2.0: build ...")."""
    match = re.search(r"image \S+ version (\d+\.0): build", stderr)
    return match.group(1) if match else None


class BootHang(AssertionError):
    """An import failed because its build VM hung at boot (engine bug)."""


def run_import(argv, data_dir, timeout):
    """Runs an import; kills its build VM's QEMU when the boot hangs (see
    HANG_SIGN), so the import fails within seconds. Returns (CompletedProcess,
    whether it hung)."""
    # Writeback of the previous import's snapshot makes the hang likelier.
    os.sync()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        hung = False
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"import did not finish in {timeout}s: {argv}")
            for console in pathlib.Path(data_dir, "engine/vms").glob("build-*/console.log"):
                try:
                    text = console.read_text(errors="replace")
                except OSError:
                    continue
                if HANG_SIGN in text:
                    hung = True
                    kill_qemu_under(f"{console.parent}/")
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
    hung = hung or (done.returncode != 0 and any(sign in done.stderr for sign in BOOT_HANG))
    return done, hung


def import_image(data_dir, account_id, name, rootfs, cmd, hooks_port=None, memory=256, ready_timeout=None,
                 check=True, client=None, retry_any_version=False, timeout=300):
    """Runs `hearth image import`; returns its JSON output, or with
    check=False the CompletedProcess.

    A build VM that hangs at boot (see HANG_SIGN) fails the import. With a
    client, such an import is undone through the API and tried again, with
    a warning (up to IMPORT_ATTEMPTS in all): always for a first version (the
    image is deleted, so the retry is 1.0 again), for later versions only with
    retry_any_version (the retry gets the next number). Otherwise, with check,
    a hang raises BootHang."""
    argv = [str(HEARTH), "image", "import", "--account", account_id, "--name", name, "--rootfs", str(rootfs),
            "--memory", str(memory), "--data-dir", str(data_dir), "--region", REGION, "--json"]
    if hooks_port is not None:
        argv += ["--hooks-port", str(hooks_port)]
    if ready_timeout is not None:
        argv += ["--ready-timeout", str(ready_timeout)]
    argv += ["--cmd", *cmd]
    for attempt in range(IMPORT_ATTEMPTS):
        out, hung = run_import(argv, data_dir, timeout)
        version = imported_version(out.stderr)
        last = attempt == IMPORT_ATTEMPTS - 1
        if not hung or client is None or last or (version != "1.0" and not retry_any_version):
            break
        warnings.warn(f"import of {name} {version}: the build VM hung at boot (engine bug); retrying")
        if version == "1.0":
            client.delete_microvm_image(imageIdentifier=name)
        else:
            client.delete_microvm_image_version(imageIdentifier=name, imageVersion=version)
    if not check:
        return out
    if hung:
        raise BootHang(f"import of {name} {version}: the build VM hung at boot: {out.stderr}")
    assert out.returncode == 0, f"import of {name} failed: {out.stderr}"
    return json.loads(out.stdout)


def exec_request(server, account, microvm_id, argv, region=REGION, timeout=90, **body):
    """Calls the exec extension (SigV4-signed like the API); returns the
    requests.Response. body may hold env, cwd, stdin (bytes) and timeoutInSeconds."""
    if isinstance(body.get("stdin"), bytes):
        body["stdin"] = base64.b64encode(body["stdin"]).decode()
    url = f"{server['url']}/hearth/2025-09-09/microvms/{microvm_id}/exec"
    data = json.dumps({"argv": argv, **body})
    request = botocore.awsrequest.AWSRequest(
        method="POST", url=url, data=data, headers={"Content-Type": "application/json"}
    )
    credentials = botocore.credentials.Credentials(account["accessKeyId"], account["secretAccessKey"])
    botocore.auth.SigV4Auth(credentials, "lambda", region).add_auth(request)
    return requests.post(url, data=data, headers=dict(request.headers.items()), timeout=timeout)


def run_in(server, account, microvm_id, script):
    """Runs `sh -c script` in a RUNNING microVM; returns its stdout as text
    and fails the test when the command does not exit 0."""
    response = exec_request(server, account, microvm_id, ["sh", "-c", script])
    assert response.status_code == 200, response.text
    result = response.json()
    stdout = base64.b64decode(result["stdout"]).decode()
    assert result["exitCode"] == 0, (result, stdout, base64.b64decode(result["stderr"]))
    return stdout


def wait_for_state(client, microvm_id, wanted, timeout=30, interval=0.1):
    """Polls GetMicrovm until its state is in wanted; returns (last output,
    the states seen in order, without repeats)."""
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        out = client.get_microvm(microvmIdentifier=microvm_id)
        if not seen or seen[-1] != out["state"]:
            seen.append(out["state"])
        if out["state"] in wanted:
            return out, seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{microvm_id} did not reach {wanted} in {timeout}s; states seen: {seen}")
        time.sleep(interval)


def vm_dir_name(microvm_id):
    """The engine's VM directory name for a microVM (hearth-server/src/layout.rs)."""
    return "mv-" + microvm_id.removeprefix("microvm-").replace("-", "")


def qemu_processes(marker):
    """{pid: argv} of live QEMU processes whose command line contains marker."""
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if state != "Z" and argv and "qemu-system" in argv[0] and marker in "\0".join(argv):
            found[int(entry.name)] = argv
    return found


def qemu_vm_dirs(data_dir):
    """{pid: VM name} of the QEMU processes running VMs of a data dir. A VM
    launched from the warm pool runs from its slot's directory (.pool-ID),
    which vms/NAME links to: reported as NAME."""
    vms = f"{data_dir}/engine/vms/"
    linked = {}
    vms_path = pathlib.Path(vms)
    if vms_path.is_dir():
        for entry in vms_path.iterdir():
            if entry.is_symlink():
                linked[os.readlink(entry)] = entry.name
    dirs = {}
    for pid, argv in qemu_processes(vms).items():
        for arg in argv:
            if vms in arg:
                name = arg.split(vms, 1)[1].split("/", 1)[0]
                dirs[pid] = linked.get(name, name)
                break
    return dirs


def kill_qemu_under(marker):
    """SIGKILLs every QEMU process whose command line mentions marker."""
    for pid in qemu_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def error_of(excinfo):
    """(code, HTTP status) of a botocore ClientError."""
    return excinfo.value.response["Error"]["Code"], excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]


@pytest.fixture
def microvms(client):
    """Collects microVM ids a test runs and terminates them afterwards."""
    launched = []
    yield launched
    for microvm_id in launched:
        try:
            client.terminate_microvm(microvmIdentifier=microvm_id)
        except Exception:  # noqa: BLE001 - best effort; the session finalizer kills QEMU anyway
            pass
    for microvm_id in launched:
        try:
            wait_for_state(client, microvm_id, "TERMINATED", timeout=30, interval=0.2)
        except Exception:  # noqa: BLE001
            pass
