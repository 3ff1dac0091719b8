"""MicroVM networks through the API, on the session server whose VMs' packets
all go to the stand-in internet of conftest (`test_internet`):

- a default microVM (no egress connector named) reaches the internet by
  address and by name; `NO_EGRESS` reaches nothing; neither reaches the host
  (10.0.2.2, the host's addresses) nor a forbidden address, whose listeners
  record nothing;
- egress survives suspend/resume;
- `NO_INGRESS` refuses every endpoint request with 403, before the VM is asked;
- a bad `--egress-allow-domain` or CIDR stops the server at start with a clear message.
"""
import subprocess
import types

import pytest

from conftest import (APP_CMD, HOOKS_PORT, INTERNET_FORBIDDEN, INTERNET_NAME, INTERNET_WEB, REGION, import_image,
                      run_in, wait_for_state)
from endpoint_support import app_token, endpoint_port, ep_request

CONNECTOR = f"arn:aws:lambda:{REGION}:aws:network-connector:aws-network-connector:"


@pytest.fixture(scope="module")
def net_image(server, account, app_rootfs, client, test_internet):
    if test_internet is None:
        pytest.skip("VM networks need root")
    import_image(server["data_dir"], account["accountId"], "net-app", app_rootfs, APP_CMD, hooks_port=HOOKS_PORT,
                 client=client)
    return "net-app"


def run_running(client, microvms, **params):
    out = client.run_microvm(**params)
    microvms.append(out["microvmId"])
    return wait_for_state(client, out["microvmId"], "RUNNING", timeout=60)[0]


def fetch(server, account, microvm_id, host, path="/"):
    """The body of http://HOST/PATH fetched in the guest, or None."""
    script = (f"python3 -c \"import urllib.request as u; print(u.urlopen('http://{host}{path}', timeout=4)"
              f".read().decode())\" 2>/dev/null || echo unreachable")
    out = run_in(server, account, microvm_id, script).strip()
    return None if out == "unreachable" else out


def connects(server, account, microvm_id, host, port):
    script = (f"python3 -c \"import socket; socket.create_connection(('{host}', {port}), timeout=3)\" "
              "2>/dev/null && echo open || echo closed")
    return run_in(server, account, microvm_id, script).strip() == "open"


def host_addresses():
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in line]


def api_port(server):
    return int(server["url"].rsplit(":", 1)[1].rstrip("/"))


def test_default_egress_reaches_the_internet_and_nothing_else(client, microvms, net_image, server, account,
                                                              test_internet):
    vm = run_running(client, microvms, imageIdentifier=net_image)["microvmId"]
    closed = run_running(client, microvms, imageIdentifier=net_image,
                         egressNetworkConnectors=[CONNECTOR + "NO_EGRESS"])["microvmId"]
    assert fetch(server, account, vm, INTERNET_WEB, "/by-ip") == "internet:/by-ip"
    assert fetch(server, account, vm, INTERNET_NAME, "/by-name") == "internet:/by-name"
    assert fetch(server, account, closed, INTERNET_WEB) is None
    assert fetch(server, account, closed, INTERNET_NAME) is None
    # hearth's API and endpoint proxy listen on the host's loopback: no guest
    # reaches them at 10.0.2.2 or any host address (the API port is open on
    # 127.0.0.1 only, so this also covers a server listening on 0.0.0.0).
    ports = [api_port(server), endpoint_port(server["proc"])]
    for host in ["10.0.2.2", test_internet["host_address"], *host_addresses()]:
        for port in ports:
            for microvm_id in (vm, closed):
                assert not connects(server, account, microvm_id, host, port), (host, port)
    for host in INTERNET_FORBIDDEN:
        assert fetch(server, account, vm, host) is None
    recorded = test_internet["connections"].read_text().split()
    assert not set(recorded) & set(INTERNET_FORBIDDEN), recorded

    # Egress survives suspend and resume.
    client.suspend_microvm(microvmIdentifier=vm)
    wait_for_state(client, vm, "SUSPENDED", timeout=60)
    client.resume_microvm(microvmIdentifier=vm)
    wait_for_state(client, vm, "RUNNING", timeout=60)
    assert fetch(server, account, vm, INTERNET_WEB, "/resumed") == "internet:/resumed"
    # And NO_EGRESS stays closed across them.
    client.suspend_microvm(microvmIdentifier=closed)
    wait_for_state(client, closed, "SUSPENDED", timeout=60)
    client.resume_microvm(microvmIdentifier=closed)
    wait_for_state(client, closed, "RUNNING", timeout=60)
    assert fetch(server, account, closed, INTERNET_WEB) is None


def test_no_ingress_refuses_every_endpoint_request(client, microvms, net_image, server):
    hearth = types.SimpleNamespace(client=client, ep_port=endpoint_port(server["proc"]))
    open_vm = run_running(client, microvms, imageIdentifier=net_image)
    shut_vm = run_running(client, microvms, imageIdentifier=net_image,
                          ingressNetworkConnectors=[CONNECTOR + "NO_INGRESS"])
    # The same token kind reaches the hooks port of a default (HTTP_INGRESS) VM...
    token = app_token(hearth, open_vm["microvmId"], HOOKS_PORT)
    answered = ep_request(hearth, open_vm["endpoint"], path="/ready", token=token, port=HOOKS_PORT)
    assert answered.status_code != 403, answered.text
    # ...and is refused for a NO_INGRESS one, whatever the port.
    for port in (HOOKS_PORT, "all"):
        token = app_token(hearth, shut_vm["microvmId"], port)
        refused = ep_request(hearth, shut_vm["endpoint"], path="/ready", token=token,
                             port=HOOKS_PORT if port == "all" else port)
        assert refused.status_code == 403, refused.text


@pytest.mark.parametrize("flag,value,says", [
    ("--egress-allow-domain", "*.example.com", "wildcards are not supported"),
    ("--egress-allow-domain", "203.0.113.5", "use --egress-allow"),
    ("--egress-allow-domain", "localhost", "at least two labels"),
    ("--egress-deny", "10.0.0.0/33", "not a CIDR range"),
])
def test_a_bad_network_flag_stops_the_server_with_a_clear_message(tmp_path, flag, value, says):
    """Checked at start, before anything is opened or listened on."""
    from conftest import HEARTH

    out = subprocess.run([str(HEARTH), "serve", "--data-dir", str(tmp_path), flag, value], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert says in out.stderr and value in out.stderr, out.stderr
    assert "panicked" not in out.stderr
