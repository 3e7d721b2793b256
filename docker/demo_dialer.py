#!/usr/bin/env python3
"""A tiny "dialer" for the docker demo: places a mix of legal and illegal calls through pbxguard's AMI
gate and prints what pbxguard and Asterisk answered. Standard library only.

Each call is an AMI Originate of ``Local/NUMBER@pbxguard-outbound`` (how VICIdial-style dialers place
calls), so both gates see it: the AMI gate decides before Asterisk is asked and stamps the call
with a token; the dialplan hook of ``[pbxguard-outbound]`` then honours that token instead of
counting the attempt again. A blocked call never reaches Asterisk; an allowed one goes on to
``[demo-trunk]``, where the stand-in consumer answers.

    python3 demo_dialer.py --host 127.0.0.1 --port 5039 --username dialer --secret demo-dialer-secret

The verdicts depend on the time of day: outside 10:00-13:00 and 14:00-20:00 (Paris time), on
weekends and public holidays, even the legal calls are blocked, with the next legal instant.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time

# (label, number, presented caller ID)
CALLS = [
    ("consent, verified caller ID (NPV)", "0612345678", "0162123456"),
    ("consent, second consumer", "+33612345679", "0162123456"),
    ("no consent on record", "0698765432", "0162123456"),
    ("mobile number presented as caller ID", "0612345678", "0611111111"),
    ("premium-rate 089 caller ID", "0612345678", "0899123456"),
    ("withheld caller ID", "0612345678", ""),
    ("consumer opposed", "0612345670", "0162123456"),
    ("refused less than 60 days ago", "0612345671", "0162123456"),
    ("not a phone number", "0012", "0162123456"),
]


class Ami:
    """Blocking AMI over one socket: send an action, read messages (``Key: Value`` blocks)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""
        self.pending: dict[str, str] = {}  # headers of a message not complete yet
        self.banner = self._line(time.monotonic() + timeout) or ""

    def send(self, action: str, **headers: str) -> None:
        lines = [f"Action: {action}"] + [f"{k}: {v}" for k, v in headers.items()]
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError(f"CR/LF in AMI header: {line!r}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def _line(self, deadline: float) -> str | None:
        """One line, or None at the deadline; EOFError when the server closed."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise EOFError("connection closed")
            self.buffer += data
        raw, self.buffer = self.buffer.split(b"\n", 1)
        return raw.decode("utf-8", "replace").rstrip("\r")

    def read(self, deadline: float) -> dict[str, str] | None:
        """The next message, or None at the deadline (a message cut by the deadline is kept for
        the next call)."""
        while True:
            line = self._line(deadline)
            if line is None:
                return None
            if not line:
                if self.pending:
                    message, self.pending = self.pending, {}
                    return message
                continue
            key, _, value = line.partition(":")
            self.pending.setdefault(key.strip(), value.strip())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("Logoff")
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5039, help="pbxguard's AMI gate (gates.ami.listen)")
    parser.add_argument("--username", default="dialer")
    parser.add_argument("--secret", default="demo-dialer-secret")
    parser.add_argument("--context", default="pbxguard-outbound", help="where the Local channel dials")
    parser.add_argument("--agent-context", default="demo-agent", help="where the other leg goes")
    parser.add_argument("--listen", type=float, default=8.0, help="seconds to watch the calls' events")
    parser.add_argument("--retries", type=int, default=30, help="connection attempts, one per second")
    args = parser.parse_args(argv)

    ami: Ami | None = None
    for attempt in range(args.retries):
        try:
            ami = Ami(args.host, args.port, timeout=10)
            break
        except OSError as exc:
            print(f"waiting for pbxguard's AMI gate at {args.host}:{args.port}: {exc}", file=sys.stderr)
            if attempt + 1 < args.retries:
                time.sleep(1)
    if ami is None:
        return 1
    print(f"connected: {ami.banner}")
    ami.send("Login", ActionID="login", Username=args.username, Secret=args.secret, Events="call")
    login_by = time.monotonic() + 10
    reply = ami.read(login_by)
    while reply is not None and reply.get("ActionID") != "login":
        reply = ami.read(login_by)
    if reply is None or reply.get("Response") != "Success":
        print(f"login refused: {reply}", file=sys.stderr)
        return 1

    labels: dict[str, str] = {}
    for index, (label, number, caller_id) in enumerate(CALLS, 1):
        action_id = f"demo-{index}"
        labels[action_id] = f"{label} ({number}, caller ID {caller_id or 'withheld'})"
        headers = {
            "ActionID": action_id,
            "Channel": f"Local/{number}@{args.context}",
            "Context": args.agent_context,
            "Exten": "s",
            "Priority": "1",
            "Async": "true",
            "Timeout": "15000",
        }
        if caller_id:
            headers["CallerID"] = f'"ACME" <{caller_id}>'
        ami.send("Originate", **headers)

    # Answers to the Originates (pbxguard's verdict), then Asterisk's events about the calls placed.
    deadline = time.monotonic() + args.listen
    answered: set[str] = set()
    while True:
        try:
            message = ami.read(deadline)
        except EOFError:
            break
        if message is None:
            break
        action_id = message.get("ActionID", "")
        if "Response" in message and action_id in labels and action_id not in answered:
            answered.add(action_id)
            details = {k: v for k, v in message.items() if k not in ("Response", "ActionID")}
            print(f"{message['Response']:>8}  {labels[action_id]}  {details}")
        elif message.get("Event") == "OriginateResponse" and action_id in labels:
            print(f"{'placed':>8}  {labels[action_id]}: {message.get('Response')}")
        elif message.get("Event") == "Hangup" and message.get("Channel", "").endswith(";2"):
            print(
                f"{'hangup':>8}  {message.get('Channel')}: cause {message.get('Cause')} {message.get('Cause-txt')}"
            )
    missing = set(labels) - answered
    for action_id in sorted(missing):
        print(f"{'no reply':>8}  {labels[action_id]}")
    ami.close()
    return 0 if not missing else 2


if __name__ == "__main__":
    sys.exit(main())
