"""Usage metering and the tenant's cost report through a real `hearth serve`:
`GET /hearth/2025-09-09/usage` (SigV4) after a microVM ran, suspended and
resumed shows its vCPU, memory and snapshot usage with costs; another account
sees none of it; a bad time is a ValidationException; the SDK's
`hearth.usage()` reads the same report. And a server killed with SIGKILL while
a CPU-bound microVM runs, then started again on its data directory, meters
that VM exactly: checked against the VM's own cgroup counters and the wall
clock, read by the test."""
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import threading
import time

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest
import requests

from conftest import (HEARTH, REGION, ROOT, client_for, create_account, import_image, short_data_dir, start_server,
                      stop_server, kill_qemu_under, qemu_vm_dirs, vm_dir_name, wait_for_state, FAST_RATES)

IDLE = ["sleep", "infinity"]


def signed_get(server, account, path):
    url = f"{server['url']}{path}"
    request = botocore.awsrequest.AWSRequest(method="GET", url=url)
    credentials = botocore.credentials.Credentials(account["accessKeyId"], account["secretAccessKey"])
    botocore.auth.SigV4Auth(credentials, "lambda", REGION).add_auth(request)
    return requests.get(url, headers=dict(request.headers.items()), timeout=60)


@pytest.fixture(scope="module")
def metered(model_path, guest_cleanup, tmp_path_factory, app_rootfs):
    """A server sampling every second, two accounts, one microVM of the first
    that ran, was suspended and resumed, then was terminated."""
    data = short_data_dir(tmp_path_factory, "usage")
    proc, url = start_server(data, "--usage-interval", "1", *FAST_RATES)
    server = {"url": url, "data_dir": data}
    try:
        owner = create_account(server, "usage-a")
        other = create_account(server, "usage-b")
        import_image(data, owner["accountId"], "idle", app_rootfs, IDLE, memory=512)
        client = client_for(server, owner)
        microvm_id = client.run_microvm(imageIdentifier="idle")["microvmId"]
        wait_for_state(client, microvm_id, "RUNNING", timeout=120)
        time.sleep(3)
        client.suspend_microvm(microvmIdentifier=microvm_id)
        wait_for_state(client, microvm_id, "SUSPENDED", timeout=120)
        client.resume_microvm(microvmIdentifier=microvm_id)
        wait_for_state(client, microvm_id, "RUNNING", timeout=120)
        time.sleep(3)
        client.terminate_microvm(microvmIdentifier=microvm_id)
        wait_for_state(client, microvm_id, "TERMINATED", timeout=120)
        time.sleep(2)  # a last sample closes its mark
        yield {"server": server, "owner": owner, "other": other, "microvm": microvm_id}
    finally:
        stop_server(proc)
        kill_qemu_under(f"{data}/")


def test_the_owner_sees_its_microvm_usage_priced(metered):
    response = signed_get(metered["server"], metered["owner"], "/hearth/2025-09-09/usage")
    assert response.status_code == 200, response.text
    report = response.json()
    mine = [i for i in report["items"] if i.get("microvmId") == metered["microvm"]]
    types = {i["usageType"]: i for i in mine}
    vcpu = next(i for t, i in types.items() if t.startswith("Lambda-MicroVM-vCPU-Second-"))
    memory = next(i for t, i in types.items() if t.startswith("Lambda-MicroVM-Memory-GB-Second-"))
    # At least the ~6 s it ran on the 512 MiB size's baseline (a quarter vCPU, 0.5 GB).
    assert vcpu["unit"] == "vCPU-Seconds" and vcpu["quantity"] >= 0.25 * 5, vcpu
    assert memory["unit"] == "GB-Seconds" and memory["quantity"] >= 0.5 * 5, memory
    assert types["Lambda-MicroVM-Snapshot-Write-GB"]["quantity"] > 0
    # A launch and a resume: reads of the snapshot and of the saved state.
    assert types["Lambda-MicroVM-Snapshot-Read-GB"]["quantity"] > types["Lambda-MicroVM-Snapshot-Write-GB"]["quantity"] * 0.5
    for item in mine:
        assert item["imageArn"].endswith(":microvm-image:idle"), item
        assert item["costUsd"] >= 0
    assert vcpu["costUsd"] == pytest.approx(vcpu["quantity"] * 0.0000276944)
    assert report["totalCostUsd"] == pytest.approx(sum(i["costUsd"] for i in report["items"]))


def test_another_account_sees_nothing_and_bad_times_are_refused(metered):
    response = signed_get(metered["server"], metered["other"], "/hearth/2025-09-09/usage")
    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "totalCostUsd": 0.0}
    bad = signed_get(metered["server"], metered["owner"], "/hearth/2025-09-09/usage?since=yesterday")
    assert bad.status_code == 400 and "epoch seconds" in bad.json()["message"], bad.text
    assert bad.headers.get("x-amzn-errortype", "").startswith("ValidationException"), bad.headers
    future = signed_get(metered["server"], metered["owner"], f"/hearth/2025-09-09/usage?since={int(time.time()) + 7200}")
    assert future.json()["items"] == []


def test_the_sdk_reads_the_same_report(metered):
    sys.path.insert(0, str(ROOT / "sdk/python/src"))
    import hearth
    connection = hearth.Connection(endpoint_url=metered["server"]["url"], region=REGION,
                                   session=__import__("boto3").session.Session(
                                       aws_access_key_id=metered["owner"]["accessKeyId"],
                                       aws_secret_access_key=metered["owner"]["secretAccessKey"],
                                       region_name=REGION))
    report = hearth.usage(connection=connection)
    assert any(i.microvm_id == metered["microvm"] for i in report.items)
    assert report.total_cost_usd > 0


# ---------------------------------------------------------------- kill -9 mid-run

BUSY = ["sh", "-c", "while :; do :; done"]
# The 512 MiB size: peak 2 GiB and 1 vCPU, so its baseline is a quarter vCPU
# and 0.5 GB.
BASELINE_VCPUS = 0.25
BASELINE_BYTES = 512 << 20
PEAK_VCPUS = 1
METER_INTERVAL = 2
GIB = 1 << 30


def cgroup_files(pid):
    """(CPU file, memory file) of a process's cgroup, v1 or v2, found through
    /proc/PID/cgroup and this host's cgroup mounts."""
    mounts = {}
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        point = fields[0].split()[4]
        fstype, _source, options = fields[1].split()[:3]
        if fstype == "cgroup2":
            mounts["v2"] = point
        elif fstype == "cgroup":
            for option in options.split(","):
                mounts.setdefault(option, point)
    cpu = memory = None
    for line in pathlib.Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        names = controllers.split(",")
        if "cpuacct" in names and "cpuacct" in mounts:
            cpu = (pathlib.Path(mounts["cpuacct"] + path) / "cpuacct.usage", 1)
        if "memory" in names and "memory" in mounts:
            memory = pathlib.Path(mounts["memory"] + path) / "memory.usage_in_bytes"
        if controllers == "" and cpu is None and "v2" in mounts:
            directory = pathlib.Path(mounts["v2"] + path)
            if (directory / "memory.current").exists():
                cpu, memory = (directory / "cpu.stat", 1000), directory / "memory.current"
    assert cpu and memory, f"no cgroup counters for pid {pid}"
    assert "/hearth/" in str(cpu[0]), f"QEMU {pid} is not in a per-VM cgroup: {cpu[0]}"
    return cpu, memory


def read_cpu_ns(cpu):
    path, unit = cpu
    text = path.read_text()
    if path.name == "cpu.stat":
        return int(dict(line.split() for line in text.splitlines())["usage_usec"]) * unit
    return int(text)


class Observer(threading.Thread):
    """Every 50 ms: the wall clock, the VM cgroup's CPU and memory counters,
    and the meter's mark for the VM in the database (each new value of
    `metered_to` is a sample boundary). Reads only."""

    def __init__(self, pid, db_path, microvm_id):
        super().__init__(daemon=True)
        self.cpu, self.memory = cgroup_files(pid)
        self.db_path, self.subject = db_path, f"vm:{microvm_id}"
        self.readings = []  # (unix ms, cpu ns, memory bytes)
        self.marks = []  # distinct metered_to values, in order
        self.done = threading.Event()

    def mark(self, read_only=True):
        # Read-only while a server may write; a stopped server's database may
        # have no -shm file left, which a read-only WAL reader cannot make.
        if read_only:
            db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        else:
            db = sqlite3.connect(self.db_path, timeout=10)
        try:
            row = db.execute("SELECT metered_to FROM usage_marks WHERE subject = ?", (self.subject,)).fetchone()
        finally:
            db.close()
        return row[0] if row else None

    def run(self):
        while not self.done.is_set():
            try:
                self.readings.append((time.time() * 1000, read_cpu_ns(self.cpu), int(self.memory.read_text())))
            except OSError:
                pass
            try:
                mark = self.mark()
            except sqlite3.Error:
                mark = None
            if mark is not None and (not self.marks or mark != self.marks[-1]):
                self.marks.append(mark)
            time.sleep(0.05)

    def at(self, ms):
        """(cpu ns, memory bytes) at unix ms: CPU interpolated between the
        readings around it; memory from the first reading at or after it."""
        before = [r for r in self.readings if r[0] <= ms]
        after = [r for r in self.readings if r[0] >= ms]
        assert before and after, f"no readings around {ms}"
        (t0, c0, _), (t1, c1, m1) = before[-1], after[0]
        assert t1 - t0 < 2000, f"a gap in the readings around {ms}: {t0}..{t1}"
        cpu = c0 if t1 == t0 else c0 + (c1 - c0) * (ms - t0) / (t1 - t0)
        return cpu, m1


def metered_totals(data, account_id, microvm_id):
    """vCPU-seconds and GB-seconds the operator's report gives the microVM."""
    out = subprocess.run([str(HEARTH), "usage", "--json", "--account", account_id, "--data-dir", str(data)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    items = [i for i in json.loads(out.stdout)["items"] if i.get("microvmId") == microvm_id]
    vcpu = sum(i["quantity"] for i in items if i["usageType"].startswith("Lambda-MicroVM-vCPU-Second-"))
    memory = sum(i["quantity"] for i in items if i["usageType"].startswith("Lambda-MicroVM-Memory-GB-Second-"))
    return vcpu, memory


def wait_marks(observer, count, timeout):
    deadline = time.monotonic() + timeout
    while len(observer.marks) < count:
        assert time.monotonic() < deadline, f"only {len(observer.marks)} samples in {timeout}s"
        time.sleep(0.1)


def test_kill9_of_the_server_loses_no_interval_and_counts_nothing_twice(model_path, guest_cleanup, tmp_path_factory,
                                                                        app_rootfs):
    """A CPU-bound 512 MiB microVM; the server samples every 2 s; after three
    samples it is killed with SIGKILL, stays down for more than three
    intervals (the VM runs on in the same QEMU), and is started again on the
    same data directory; three more samples, then it stops. The metered
    vCPU-seconds and GB-seconds match what the VM's cgroup counters and the
    wall clock give for the baseline-plus-burst bill (per interval the larger
    of the CPU used and the baseline; memory above the baseline on top), less
    the first interval's burst (a new VM's first sample only sets the
    counters' base): nothing counted twice, nothing of the downtime lost."""
    data = short_data_dir(tmp_path_factory, "meterkill")
    interval = ["--usage-interval", str(METER_INTERVAL)]
    proc, url = start_server(data, *interval, *FAST_RATES)
    pid = None
    observer = None
    try:
        server = {"url": url, "data_dir": data}
        owner = create_account(server, "meter-kill")
        import_image(data, owner["accountId"], "busy", app_rootfs, BUSY, memory=512)
        client = client_for(server, owner)
        microvm_id = client.run_microvm(imageIdentifier="busy")["microvmId"]
        deadline = time.monotonic() + 60
        while pid is None:
            found = [p for p, name in qemu_vm_dirs(data).items() if name == vm_dir_name(microvm_id)]
            pid = found[0] if found else None
            assert pid or time.monotonic() < deadline, "no QEMU for the microVM"
            time.sleep(0.01)
        observer = Observer(pid, data / "hearth.db", microvm_id)
        observer.start()
        wait_for_state(client, microvm_id, "RUNNING", timeout=120, interval=0.05)
        seen_running = time.time() * 1000
        wait_marks(observer, 3, timeout=60)

        proc.kill()
        proc.wait()
        killed_at = time.time() * 1000
        # The VM outlives the server, in the same process.
        assert qemu_vm_dirs(data).get(pid) == vm_dir_name(microvm_id)
        time.sleep(3 * METER_INTERVAL + 1)
        proc, url = start_server(data, *interval, *FAST_RATES)
        assert qemu_vm_dirs(data).get(pid) == vm_dir_name(microvm_id), "the restarted server kept the QEMU"
        before_restart = len(observer.marks)
        wait_marks(observer, before_restart + 3, timeout=60)
        stop_server(proc)
        time.sleep(0.3)
        observer.done.set()
        observer.join()
        final = observer.mark(read_only=False)
        if observer.marks[-1] != final:
            observer.marks.append(final)
        assert qemu_vm_dirs(data).get(pid) == vm_dir_name(microvm_id)

        db = sqlite3.connect(data / "hearth.db", timeout=10)
        (running_at,) = db.execute("SELECT running_at FROM microvms WHERE microvm_id = ?", (microvm_id,)).fetchone()
        db.close()
        metered_vcpu, metered_memory = metered_totals(data, owner["accountId"], microvm_id)

        # The independent measurement, per sample interval.
        marks = observer.marks
        assert abs(running_at - seen_running) < 2000, (running_at, seen_running)
        assert marks[0] > running_at
        # The kill fell between two samples more than three intervals apart.
        gaps = [b - a for a, b in zip(marks, marks[1:])]
        down = max(gaps)
        assert down >= 3 * METER_INTERVAL * 1000, gaps
        assert any(a < killed_at < b for a, b in zip(marks, marks[1:]))
        first_cpu, _ = observer.at(marks[0])
        start_cpu = observer.at(running_at)[0] if observer.readings[0][0] <= running_at else observer.readings[0][1]
        bill_vcpu = bill_memory = 0.0
        first_burst = max((first_cpu - start_cpu) / 1e9 - BASELINE_VCPUS * (marks[0] - running_at) / 1000, 0.0)
        bill_vcpu += BASELINE_VCPUS * (marks[0] - running_at) / 1000 + first_burst
        bill_memory += BASELINE_BYTES / GIB * (marks[0] - running_at) / 1000
        previous = first_cpu
        for start, end in zip(marks, marks[1:]):
            cpu, memory = observer.at(end)
            seconds = (end - start) / 1000
            bill_vcpu += max((cpu - previous) / 1e9, BASELINE_VCPUS * seconds)
            bill_memory += (BASELINE_BYTES + max(memory - BASELINE_BYTES, 0)) / GIB * seconds
            previous = cpu
        wall = (marks[-1] - running_at) / 1000
        used = (previous - start_cpu) / 1e9
        print(f"{len(marks)} samples over {wall:.1f} s, down {down / 1000:.1f} s; QEMU cgroup used {used:.2f} CPU s; "
              f"bill {bill_vcpu:.3f} vCPU-s {bill_memory:.3f} GB-s; metered {metered_vcpu:.3f} vCPU-s "
              f"{metered_memory:.3f} GB-s; first interval's burst {first_burst:.3f}")

        # Nothing counted twice: at most the bill (the readings' own timing
        # differs from the meter's by a few ms per sample).
        tolerance = 0.02 * bill_vcpu + 0.1
        assert metered_vcpu <= bill_vcpu + tolerance, (metered_vcpu, bill_vcpu)
        # No gap longer than one interval: at most the first interval's
        # burst missing (its counters are the base), whose worth is at most
        # one interval at the peak vCPUs.
        assert metered_vcpu >= bill_vcpu - first_burst - tolerance, (metered_vcpu, bill_vcpu, first_burst)
        assert first_burst <= (marks[0] - running_at) / 1000 * PEAK_VCPUS * 1.3
        # And exactly that: the bill less the first interval's burst.
        assert abs(metered_vcpu - (bill_vcpu - first_burst)) <= tolerance, (metered_vcpu, bill_vcpu, first_burst)
        # Memory: the baseline for the wall time, plus any use above it.
        assert metered_memory == pytest.approx(bill_memory, rel=0.02, abs=0.1)
        assert metered_memory >= BASELINE_BYTES / GIB * wall * 0.999
        # The baseline alone is less than was billed when the VM burst.
        assert metered_vcpu >= BASELINE_VCPUS * wall * 0.999
    finally:
        if observer is not None:
            observer.done.set()
        stop_server(proc)
        if pid is not None:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        kill_qemu_under(f"{data}/")
