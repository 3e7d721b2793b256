"""The daemon: wires the ledger, the guard, the HTTP endpoints and the gates; shuts down cleanly.

The ledger link is supervised: if PostgreSQL is not there at start-up or goes away, the daemon stays
up, every decision blocks with STORE_UNAVAILABLE, `/readyz` says so, and it reconnects with capped
exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pbxguard import logs
from pbxguard.api import ApiContext, DecisionLog, Metrics, build_app
from pbxguard.api.server import ConnectionLimit, LimitedSite
from pbxguard.config import Config, parse_listen
from pbxguard.guard import Guard
from pbxguard.ledger import journal
from pbxguard.ledger.store import Ledger
from pbxguard.policy import numbers
from pbxguard.tls import server_context

log = logging.getLogger("pbxguard.daemon")


def _not_started() -> bool:
    return False


@dataclass
class Daemon:
    config: Config
    guard: Guard = field(init=False)
    ledger: Ledger | None = None
    ledger_ready: bool = False
    # name -> callable telling whether that component is ready (gates register here)
    readiness: dict[str, Callable[[], bool]] = field(default_factory=dict)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _cleanups: list[Callable[[], Any]] = field(default_factory=list)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.guard = Guard(
            None, self.config.policy, self.config.mode, timeout=self.config.database.timeout_ms / 1000
        )
        # Metrics and the decision log line observe every decision, whichever gate made it.
        self.metrics = Metrics()
        self.guard.observers.append(self.metrics.observe_decision)
        self.guard.observers.append(DecisionLog(full_numbers=self.config.log.numbers == "full"))
        self.guard.ledger_observers.append(self.metrics.observe_ledger)

    async def _connect_once(self) -> bool:
        try:
            self.ledger = await Ledger.connect(
                self.config.database.url,
                home=self.config.database.home or None,
                min_size=self.config.database.pool_min,
                max_size=self.config.database.pool_max,
            )
        except Exception as exc:
            log.warning("ledger not reachable, calls are blocked: %s", exc)
            return False
        self.ledger.decide_timeout = self.config.database.timeout_ms / 1000
        self.ledger.decide_concurrency = self.config.database.decide_concurrency
        self.ledger.decide_batch_max = self.config.database.decide_batch_max
        self.guard.ledger = self.ledger
        self.ledger_ready = True
        log.info("ledger connected")
        return True

    async def _connect_ledger(self) -> None:
        delay = 0.2
        while True:  # the first attempt was made at start-up
            await asyncio.sleep(delay)
            if await self._connect_once():
                return
            delay = min(delay * 2, 5.0)

    async def _watch_ledger(self) -> None:
        while True:
            ready = self.ledger is not None and await self.ledger.ping()
            if ready != self.ledger_ready:
                log.info("ledger %s", "ready" if ready else "unreachable")
            self.ledger_ready = ready
            await asyncio.sleep(1.0)

    async def _seal_journal(self) -> None:
        """Links committed decisions into the hash chain, off the decision path."""
        interval = self.config.journal.seal_interval_ms / 1000
        key = self.config.journal.key.encode() or None
        while True:
            await asyncio.sleep(interval)
            if self.ledger is None:
                continue
            try:
                async with self.ledger.pool.acquire() as conn:
                    while await journal.seal(conn, key) >= journal.SEAL_BATCH:
                        pass
            except Exception as exc:
                log.warning("journal sealing failed, will retry: %s", exc)

    def ready_state(self) -> dict[str, bool]:
        state = {"ledger": self.ledger_ready}
        state.update({name: check() for name, check in self.readiness.items()})
        return state

    def http_app(self) -> web.Application:
        """/healthz, /readyz, /metrics, the /v1 API and the dashboard (pbxguard.api.routes)."""
        context = ApiContext(
            config=self.config,
            guard=self.guard,
            ledger=lambda: self.ledger,
            metrics=self.metrics,
            ready_state=self.ready_state,
            body_timeout=self.config.http.body_timeout_ms / 1000,
        )
        return build_app(context)

    async def start(self) -> None:
        numbers.warm_up()
        # What start-up built (phonenumbers' metadata, the rules' tables) lives as long as the
        # process: out of the collector's sight, every collection no longer walks it again.
        gc.collect()
        gc.freeze()
        await self._connect_ledger_first()
        self._tasks.append(asyncio.create_task(self._watch_ledger(), name="ledger-watch"))
        self._tasks.append(asyncio.create_task(self.guard.run_flusher(), name="journal-completer"))
        self._tasks.append(asyncio.create_task(self._seal_journal(), name="journal-sealer"))
        http = self.config.http
        host, port = parse_listen("http.listen", http.listen)
        idle = http.idle_timeout_ms / 1000
        limit = ConnectionLimit(http.max_connections, idle)
        app = self.http_app()
        app.middlewares.insert(0, limit.middleware)
        # keepalive_timeout also bounds the wait for the first request head (see api.server).
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=idle, lingering_time=min(idle, 2.0)
        )
        await self._runner.setup()
        tls = server_context(http.tls_cert, http.tls_key) if http.tls_cert else None
        # /readyz answers from here on: not ready until every configured gate has started (each one
        # replaces its entry in _start_gates; tests/faults/test_fault_daemon_kill.py).
        for name, configured in (
            ("ami", self.config.gates.ami.listen),
            ("agi", self.config.gates.agi.listen),
            ("ari", self.config.asterisk.ari.url),
        ):
            if configured:
                self.readiness[name] = _not_started
        site = LimitedSite(self._runner, host, port, limit, ssl_context=tls)
        await site.start()
        log.info("http listening", extra={"fields": {"listen": http.listen, "tls": tls is not None}})
        await self._start_gates()

    async def _start_gates(self) -> None:
        """Each gate translates its protocol into Guard.decide(); none of them decides."""
        gates: list[tuple[str, Any]] = []
        if self.config.gates.ami.listen:
            from pbxguard.gates.ami_proxy import AmiGate

            gates.append(("ami", AmiGate(self.config, self.guard)))
        if self.config.gates.agi.listen:
            from pbxguard.gates.fastagi import FastAgiGate

            gates.append(("agi", FastAgiGate(self.config, self.guard)))
        if self.config.asterisk.ari.url:
            from pbxguard.gates.ari import AriGate

            gates.append(("ari", AriGate(self.config, self.guard)))
        for name, gate in gates:
            await gate.start()
            self._cleanups.append(gate.stop)
            self.readiness[name] = gate.ready
            log.info("gate started", extra={"fields": {"gate": name}})

    async def _connect_ledger_first(self) -> None:
        if not await self._connect_once():
            self._tasks.append(asyncio.create_task(self._connect_ledger(), name="ledger-connect"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for cleanup in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                result = cleanup()
                if asyncio.iscoroutine(result):
                    await result
        if self._runner is not None:
            await self._runner.cleanup()
        await self.guard.flush()
        if self.ledger is not None:
            await self.ledger.close()


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    daemon = Daemon(config)
    stop_event = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop_event.set)
            handled.append(sig)
    try:
        # Inside the try: a start that fails half-way (port taken, a gate) still closes the ledger
        # and cancels the background tasks it had begun.
        await daemon.start()
        log.info("pbxguard running", extra={"fields": {"mode": config.mode.value}})
        await stop_event.wait()
    finally:
        log.info("shutting down")
        await daemon.stop()
        for sig in handled:  # the loop may outlive serve() (embedding, tests): give the signals back
            loop.remove_signal_handler(sig)
        log.info("stopped")


def raise_open_files_limit(config: Config) -> None:
    """Every connection is a file descriptor: the soft limit goes up to the hard one, as servers do, and
    a limit below what the connection caps can use is logged (systemd: LimitNOFILE)."""
    gates = config.gates
    need = (
        config.http.max_connections
        + (gates.ami.max_clients if gates.ami.listen else 0)
        + (gates.agi.max_connections if gates.agi.listen else 0)
        + config.database.pool_max
        + 64
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = max(need, 65536) if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open files limit %d is below what the connection limits can use (%d): raise it "
            "(LimitNOFILE=) or lower http.max_connections, gates.ami.max_clients, gates.agi.max_connections",
            soft,
            need,
        )


def run_daemon(config: Config, log_format: str | None = None) -> int:
    logs.configure(log_format or config.log.format, config.log.level)
    raise_open_files_limit(config)
    try:
        import uvloop  # optional speed-up

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(config))
    return 0
