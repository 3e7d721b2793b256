"""bench.common's CPU meter: the bench prints what each process spent per check, and a group's
figure must count a child while it runs and keep counting it after it has ended."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time

import pytest

from bench.common import CpuMeter, family_cpu_seconds, process_cpu_seconds

BUSY = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")


def test_a_process_that_has_gone_counts_nothing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_cpu_seconds(child.pid) == 0.0


def test_a_running_child_counts_in_its_family_not_in_its_parent() -> None:
    me = os.getpid()
    meter = CpuMeter(
        family=functools.partial(family_cpu_seconds, me), alone=functools.partial(process_cpu_seconds, me)
    )
    with subprocess.Popen([sys.executable, "-c", BUSY]) as child:
        # The child spins 0.3 s of CPU; read once it has used 0.25 s, before it is waited for. The
        # two readings are not taken at the same instant: the margin covers a clock tick or two.
        deadline = time.monotonic() + 10
        while process_cpu_seconds(child.pid) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.02)
        spent = meter.per_operation_us(1)
        child.wait()
    assert spent["family"] - spent["alone"] >= 0.2e6


def test_a_child_that_ended_stays_counted_in_its_family() -> None:
    me = os.getpid()
    before = family_cpu_seconds(me)
    subprocess.run([sys.executable, "-c", BUSY], check=True)
    # Waited for: its CPU is now in this process's children's total, not in a live child.
    assert family_cpu_seconds(me) - before >= 0.25


def test_per_operation_divides_by_the_operations() -> None:
    ticks = iter([1.0, 3.0])
    meter = CpuMeter(work=lambda: next(ticks))
    assert meter.per_operation_us(4) == {"work": 0.5e6}
