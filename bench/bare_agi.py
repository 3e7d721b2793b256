"""A bare FastAGI server that answers at once: the same command exchange as pbxguard's `check` when
the dialplan hands it the channel facts (the four variables set in one command), with a constant
verdict and no decision.  The baseline of agi_ratio."""

from __future__ import annotations

import asyncio
import contextlib
import sys

COMMANDS = (
    b'EXEC "MSet" "PBXGUARD_REASONS=,PBXGUARD_NEXT=,'
    b'PBXGUARD_DECISION=00000000-0000-0000-0000-000000000000,PBXGUARD_VERDICT=ALLOW"\n',
)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (await reader.readline()).strip():
            pass
        for command in COMMANDS:
            writer.write(command)
            if not await reader.readline():
                break
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(int(sys.argv[1])))
