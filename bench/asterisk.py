"""asterisk_ratio: Local Originates per second through the AMI gate ÷ the same client straight to
a real Asterisk (PBXGUARD_ASTERISK_BIN, or `asterisk` on PATH), started privately from the shipped
configuration by the test harness."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

from bench import ami
from bench.common import Figure, ceiling_note, consumer
from bench.daemon import DaemonProcess

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


async def run(
    url: str, count: int, numbers: itertools.count[int], durable_commit_s: float | None = None
) -> Figure:
    import asterisk_harness  # the tests' harness: one way to start a private Asterisk

    binary = asterisk_harness.find_asterisk()
    if binary is None:
        raise RuntimeError("no Asterisk binary: set PBXGUARD_ASTERISK_BIN or put asterisk on PATH")
    instance = asterisk_harness.AsteriskInstance(binary)
    await asyncio.to_thread(instance.start)
    gate_port = asterisk_harness.free_port()
    daemon = DaemonProcess(
        url,
        f'[gates.ami]\nlisten = "127.0.0.1:{gate_port}"\n'
        '[[gates.ami.users]]\nusername = "dialer"\nsecret = "dialer-secret"\ncampaign = "bench"\n'
        f'[asterisk.ami]\nhost = "127.0.0.1"\nport = {instance.ami_port}\n'
        f'username = "{instance.ami_username}"\nsecret = "{instance.ami_secret}"\n',
    )
    try:
        await asyncio.to_thread(daemon.start)

        # The callee side answers, waits a second and hangs up: a real call's set-up and tear-down.
        def channel(n: int) -> str:
            return f"Local/0{consumer(n)[3:]}@{asterisk_harness.DIAL_CONTEXT}"

        user, secret = instance.harness_username, instance.harness_secret
        await ami.originate_rate(instance.ami_port, user, secret, channel, numbers, max(20, count // 10))
        await ami.originate_rate(gate_port, "dialer", "dialer-secret", channel, numbers, max(20, count // 10))
        await asyncio.sleep(1.5)  # let the warm-up calls end
        direct, direct_lat, _ = await ami.originate_rate(
            instance.ami_port, user, secret, channel, numbers, count
        )
        await asyncio.sleep(1.5)
        gated, gated_lat, outcomes = await ami.originate_rate(
            gate_port, "dialer", "dialer-secret", channel, numbers, count
        )
        print(
            f"    Asterisk direct {direct:,.0f}/s (p50 {ami.p50_ms(direct_lat):.2f} ms), through the gate "
            f"{gated:,.0f}/s (p50 {ami.p50_ms(gated_lat):.2f} ms), answers {outcomes}"
        )
        ratio = gated / direct
        note = f"(gate {gated:,.0f}/s, one client{ceiling_note(direct, durable_commit_s)})"
        return Figure("asterisk_ratio", ratio, "", baseline=f"direct to Asterisk {direct:,.0f} Originates/s",
                      target=">= 0.9", met=ratio >= 0.9, note=note)  # fmt: skip
    finally:
        daemon.cleanup()
        await asyncio.to_thread(instance.stop)
        instance.cleanup()
