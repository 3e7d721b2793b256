"""ami_ratio, ami_added_p50_ms and asterisk_ratio: Originates through the AMI gate against the same
client straight to the upstream (a server that answers at once, or a real Asterisk)."""

from __future__ import annotations

import asyncio
import itertools
import time

from bench.common import CALLER_ID, percentile


class AmiClient:
    """A dialer's manager connection: one Originate at a time, as most dialers' workers do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.serial = itertools.count()

    @classmethod
    async def connect(cls, port: int, username: str, secret: str) -> AmiClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()  # banner
        client = cls(reader, writer)
        response = await client.action(
            f"Action: Login\r\nUsername: {username}\r\nSecret: {secret}\r\nEvents: off\r\n"
        )
        if b"Success" not in response:
            raise RuntimeError(f"login refused: {response!r}")
        return client

    async def action(self, text: str) -> bytes:
        action_id = f"b{next(self.serial)}"
        self.writer.write(f"{text}ActionID: {action_id}\r\n\r\n".encode())
        marker = f"ActionID: {action_id}".encode()
        while True:
            message = await self.reader.readuntil(b"\r\n\r\n")
            if marker in message and message.startswith(b"Response:"):
                return message

    async def originate(self, channel: str) -> bytes:
        return await self.action(
            f"Action: Originate\r\nChannel: {channel}\r\nApplication: Wait\r\nData: 1\r\n"
            f'CallerID: "bench" <{CALLER_ID}>\r\nAsync: true\r\nVariable: PBXGUARD_CAMPAIGN=bench\r\n'
        )

    def close(self) -> None:
        self.writer.close()


async def originate_rate(
    port: int,
    username: str,
    secret: str,
    channel_of: callable,
    numbers: itertools.count[int],  # type: ignore[valid-type]
    count: int,
    clients: int = 1,
) -> tuple[float, list[float], dict[str, int]]:
    """Originates/s and per-Originate latencies; each client waits for each response."""
    connections = [await AmiClient.connect(port, username, secret) for _ in range(clients)]
    latencies: list[float] = []
    outcomes: dict[str, int] = {}

    async def worker(client: AmiClient) -> None:
        for _ in range(count // clients):
            started = time.perf_counter()
            response = await client.originate(channel_of(next(numbers)))
            latencies.append(time.perf_counter() - started)
            kind = "success" if response.startswith(b"Response: Success") else "error"
            outcomes[kind] = outcomes.get(kind, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    for client in connections:
        client.close()
    return len(latencies) / elapsed, latencies, outcomes


def p50_ms(latencies: list[float]) -> float:
    return percentile(latencies, 50) * 1000
