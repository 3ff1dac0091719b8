"""The README's first command, `scripts/quickstart`, run as a user runs it
(with the built binary, so it does not build again), its output checked line
by line: the server came up, the image built with its log streamed, both
microVMs answered through their endpoints with their own ids, the suspended
one answered after a request woke it, and the run stopped cleanly (both
microVMs terminated, no QEMU process of the run left, its directory gone).
"""
import os
import pathlib
import re
import subprocess

from conftest import HEARTH, ROOT, qemu_processes

TIMEOUT = 1500


def test_quickstart_runs_the_main_job_and_stops_cleanly():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HEARTH_BIN"] = str(HEARTH)
    out = subprocess.run([str(ROOT / "scripts/quickstart")], capture_output=True, text=True, timeout=TIMEOUT,
                         env=env, stdin=subprocess.DEVNULL)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    steps = [line for line in out.stdout.splitlines() if line.startswith("quickstart: ")]

    def step(pattern):
        found = [m for m in (re.match(r"quickstart: " + pattern, line) for line in steps) if m]
        assert len(found) == 1, f"no single step line matching {pattern!r} in:\n" + "\n".join(steps)
        return found[0]

    work = step(r"working in (/tmp/hq\.\w+) ").group(1)
    step(r"server: API on http://127\.0\.0\.1:\d+, endpoints on http://<microvm-id>\.localhost:\d+ ")
    step(r"account \d{12} created")
    # The build's log is streamed under its step, indented.
    assert re.search(r"^  \| .*COPY app\.py", out.stdout, re.M), out.stdout
    step(r"image hello-web version 1\.0 built in \d+ s$")
    ids = [step(rf"microVM {n}: (microvm-\S+) RUNNING, endpoint http://\1\.localhost:\d+/$").group(1)
           for n in (1, 2)]
    assert ids[0] != ids[1]
    for n, microvm_id in enumerate(ids, 1):
        step(rf"microVM {n} answered through its endpoint \(hearth \w+ \+ curl\): "
             rf"microvmId={microvm_id} payload=visitor-{n} hits=1$")
    step(r"microVM 1 suspended ")
    step(rf"microVM 1 woke for a request in \d+ ms and answered: microvmId={ids[0]} payload=visitor-1 hits=2 ")
    step(r"summary: ")
    step(rf"stopped: 2 of 2 microVMs terminated, server stopped, 0 stray QEMU ended, {re.escape(work)} removed$")
    step(r"no QEMU process of this run is left$")
    assert steps[-1] == "quickstart: no QEMU process of this run is left"
    assert not pathlib.Path(work).exists()
    assert not qemu_processes(f"{work}/")
