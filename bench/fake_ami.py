"""An AMI server that answers at once: the upstream of ami_ratio.

It greets, accepts any Login, and answers every action with `Response: Success` and the action's
ActionID the moment the message is complete; an Originate gets Asterisk's "successfully queued".
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"Asterisk Call Manager/11.0.0\r\n")
    action_id = b""
    action = b""
    serial = 0
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            line = line.rstrip(b"\r\n")
            if line:
                key, _, value = line.partition(b":")
                key = key.strip().lower()
                if key == b"actionid":
                    action_id = value.strip()
                elif key == b"action":
                    action = value.strip().lower()
                continue
            if not action:
                continue
            reply = b"Response: Success\r\n"
            if action_id:
                reply += b"ActionID: " + action_id + b"\r\n"
            if action == b"originate":
                reply += b"Message: Originate successfully queued\r\n"
            elif action == b"login":
                reply += b"Message: Authentication accepted\r\n"
            elif action == b"ping":
                reply += b"Ping: Pong\r\nTimestamp: 0.000000\r\n"
            writer.write(reply + b"\r\n")
            if action == b"originate":
                # As Asterisk does once the call is placed (ASTERISK-NOTES.md): a gate that follows
                # its Originates must see them end, or it would hold every one as pending.
                serial += 1
                writer.write(
                    b"Event: OriginateResponse\r\nPrivilege: call,all\r\n"
                    + (b"ActionID: " + action_id + b"\r\n" if action_id else b"")
                    + b"Response: Success\r\nChannel: Local/bench@bench-00000001;1\r\n"
                    + b"Context: bench\r\nExten: s\r\nReason: 4\r\n"
                    + f"Uniqueid: 1764000000.{serial}\r\n".encode()
                    + b"CallerIDNum: <unknown>\r\nCallerIDName: <unknown>\r\n\r\n"
                )
            if action == b"logoff":
                break
            action_id = action = b""
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
