"""Host capacity admission: with an operator reserve that leaves room for one
big microVM but not two, the second RunMicrovm is refused with the model's
InsufficientCapacityException (HTTP 500) and leaves nothing behind (no record,
no QEMU process); once the first microVM is terminated the same call succeeds.
A running microVM counts at its full size (guest memory plus QEMU's
allowance), not at what it uses now: it may still grow into it.

The reserve is set from the host's MemAvailable at the start of the test with
half a VM of slack either way, so the other work on a shared CI host may move
it by that much without changing the outcome. While the first microVM spins
every vCPU, GetMicrovm latency is measured and printed."""
import threading
import time

import botocore.exceptions
import pytest

from conftest import (FAST_RATES, IDLE_CMD, client_for, create_account, error_of, exec_request, import_image,
                      kill_qemu_under, qemu_vm_dirs, short_data_dir, start_server, stop_server, wait_for_state)

MEMORY_MIB = 4096
# Guest memory plus QEMU's allowance under TCG (crates/hearth-vm/src/cgroup.rs):
# 96 MiB of QEMU itself and its 256 MiB translation cache.
NEED_MIB = MEMORY_MIB + 96 + 256


def mem_available_mib():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


@pytest.fixture(scope="module")
def big_image(model_path, tmp_path_factory, app_rootfs):
    """A data directory with an account and an imported 4 GiB image "big"."""
    data = short_data_dir(tmp_path_factory, "capacity")
    proc, url = start_server(data, *FAST_RATES)
    try:
        server = {"url": url, "data_dir": data}
        account = create_account(server, "capacity")
        import_image(data, account["accountId"], "big", app_rootfs, IDLE_CMD, memory=MEMORY_MIB,
                     client=client_for(server, account))
    finally:
        stop_server(proc)
    yield {"data_dir": data, "account": account}
    kill_qemu_under(f"{data}/")


def may_lower_oom_score(pid):
    """True when the process has CAP_SYS_RESOURCE (bit 24 of CapEff), which
    lowering an OOM score takes (root in a container may lack it)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def api_latency_while_spinning(client, server, account, microvm_id):
    """Spins every vCPU of the microVM for 15 s (its cgroup holds it to its
    quota) and measures GetMicrovm meanwhile; prints the latencies."""
    spin = threading.Thread(target=exec_request, args=(
        server, account, microvm_id,
        ["sh", "-c", "for i in $(seq $(nproc)); do timeout 15 sh -c 'while :; do :; done' & done; wait"]))
    spin.start()
    time.sleep(2)
    latencies = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        start = time.monotonic()
        assert client.get_microvm(microvmIdentifier=microvm_id)["state"] == "RUNNING"
        latencies.append((time.monotonic() - start) * 1000)
        time.sleep(0.1)
    spin.join()
    latencies.sort()
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)]
    print(f"GetMicrovm while a guest spins every vCPU: p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
          f"max {latencies[-1]:.1f} ms over {len(latencies)} calls")
    assert p50 < 1000, latencies


def live_ids(client):
    return sorted(item["microvmId"] for item in client.list_microvms()["items"] if item["state"] != "TERMINATED")


def start_server_with_room_for_one(data):
    """A server whose memory reserve leaves room for one big microVM and a
    half (skips the test on a host without that much available)."""
    reserve = mem_available_mib() - NEED_MIB * 3 // 2
    if reserve < 0:
        pytest.skip(f"the host has less than {NEED_MIB * 3 // 2} MiB available")
    return start_server(data, *FAST_RATES, "--reserve-memory-mib", str(reserve))


def test_run_is_refused_past_host_capacity_and_admitted_when_it_returns(big_image):
    data, account = big_image["data_dir"], big_image["account"]
    proc, url = start_server_with_room_for_one(data)
    try:
        if may_lower_oom_score(proc.pid):
            with open(f"/proc/{proc.pid}/oom_score_adj") as f:
                assert f.read().strip() == "-500", "the server is the OOM killer's last choice"
        client = client_for({"url": url, "data_dir": data}, account)
        first = client.run_microvm(imageIdentifier="big")["microvmId"]
        wait_for_state(client, first, "RUNNING", timeout=180)
        api_latency_while_spinning(client, {"url": url}, account, first)
        processes = set(qemu_vm_dirs(data).values())

        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            client.run_microvm(imageIdentifier="big")
        assert error_of(excinfo) == ("InsufficientCapacityException", 500)
        message = excinfo.value.response["Error"]["Message"]
        assert "host memory" in message and "MiB needed" in message, message
        # Nothing left behind: no microVM record, no new QEMU process.
        assert live_ids(client) == [first]
        assert set(qemu_vm_dirs(data).values()) == processes

        # The first microVM ends: its capacity returns.
        client.terminate_microvm(microvmIdentifier=first)
        wait_for_state(client, first, "TERMINATED", timeout=60)
        second = client.run_microvm(imageIdentifier="big")["microvmId"]
        wait_for_state(client, second, "RUNNING", timeout=180)
        assert live_ids(client) == [second]
        client.terminate_microvm(microvmIdentifier=second)
        wait_for_state(client, second, "TERMINATED", timeout=60)
    finally:
        stop_server(proc)


def test_a_microvm_that_ends_before_anything_saw_it_run_gives_its_capacity_back(big_image):
    """A short job: RunMicrovm, then TerminateMicrovm with no other admission
    in between (none saw it running). Its admission must end with it, not
    hold the host's capacity for the admission's grace period (minutes)."""
    data, account = big_image["data_dir"], big_image["account"]
    proc, url = start_server_with_room_for_one(data)
    try:
        client = client_for({"url": url, "data_dir": data}, account)
        for _ in range(2):
            microvm = client.run_microvm(imageIdentifier="big")["microvmId"]
            wait_for_state(client, microvm, "RUNNING", timeout=180)
            client.terminate_microvm(microvmIdentifier=microvm)
            wait_for_state(client, microvm, "TERMINATED", timeout=60)
        assert live_ids(client) == []
    finally:
        stop_server(proc)
