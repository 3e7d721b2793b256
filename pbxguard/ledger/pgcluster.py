"""A private PostgreSQL cluster started from the installed server binaries.

Serves both the zero-setup default (no `PBXGUARD_DATABASE_URL`: a cluster under `$PBXGUARD_HOME`)
and the test suite (a throwaway cluster in a temporary folder).  It listens on a Unix socket only
unless a TCP port is asked for.  PostgreSQL refuses to run as root, so when pbxguard runs as root the
server runs as an unprivileged account (`postgres` when it exists, else `nobody`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class ClusterError(Exception):
    pass


def find_bindir() -> Path:
    """The folder holding initdb, pg_ctl and postgres; the newest version wins."""
    explicit = os.environ.get("PBXGUARD_PG_BINDIR")
    candidates: list[Path] = [Path(explicit)] if explicit else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.CalledProcessError):
            pass

    def version_key(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    ]
    candidates += [Path("/usr/local/pgsql/bin")]
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise ClusterError(
        "no PostgreSQL server binaries found (initdb, pg_ctl): install them "
        "(Debian: apt-get install postgresql), set PBXGUARD_PG_BINDIR, "
        "or point PBXGUARD_DATABASE_URL at an existing server"
    )


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("PBXGUARD_PG_USER"), "postgres", "nobody"):
        if not name:
            continue
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ClusterError("running as root and no unprivileged account (postgres, nobody) to run PostgreSQL")


@dataclass
class LocalCluster:
    """A cluster in `root` (data in root/data, socket in root/run)."""

    root: Path
    port: int = 5432
    tcp: bool = False
    durable: bool = True
    database: str = "pbxguard"
    user: str = "pbxguard"
    bindir: Path = field(default_factory=find_bindir)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def logfile(self) -> Path:
        return self.root / "postgresql.log"

    def dsn(self, database: str | None = None) -> str:
        db = database or self.database
        if self.tcp:
            return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"
        return f"postgresql://{self.user}@/{db}?host={self.socket_dir}&port={self.port}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        account = _server_account()
        kwargs: dict[str, object] = {}
        if account is not None:
            kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
        result = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"{Path(args[0]).name} failed: {(result.stderr or result.stdout).strip()[-800:]}"
            )
        return result  # type: ignore[no-any-return]

    def _prepare_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        account = _server_account()
        if account is None:
            os.chmod(self.socket_dir, 0o700)
            return
        # The server's account must reach its folders; only these are handed to it, never parents.
        for parent in [self.root, *self.root.parents]:
            mode = parent.stat().st_mode
            if parent != self.root and not mode & 0o001:
                raise ClusterError(
                    f"{parent} is not traversable by the '{account.pw_name}' account that runs PostgreSQL "
                    "as root; choose a PBXGUARD_HOME outside it (e.g. /var/lib/pbxguard)"
                )
        for path in (self.root, self.socket_dir):
            os.chown(path, account.pw_uid, account.pw_gid)
        os.chmod(self.root, 0o700)
        os.chmod(self.socket_dir, 0o700)

    @property
    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    def init(self) -> None:
        self._prepare_dirs()
        if self.initialized:
            return
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-U", self.user,
            "--auth=trust",
            "-E", "UTF8",
            "--locale=C.UTF-8",
            "--no-instructions",
        )  # fmt: skip
        settings = {
            "listen_addresses": "'127.0.0.1'" if self.tcp else "''",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "fsync": "on" if self.durable else "off",
            "synchronous_commit": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
        }
        conf = "\n# pbxguard\n" + "".join(f"{key} = {value}\n" for key, value in settings.items())
        account = _server_account()
        conf_path = self.datadir / "postgresql.conf"
        with conf_path.open("a", encoding="utf-8") as handle:
            handle.write(conf)
        if account is not None:
            os.chown(conf_path, account.pw_uid, account.pw_gid)

    @property
    def running(self) -> bool:
        result = self._run(str(self.bindir / "pg_ctl"), "status", "-D", str(self.datadir), check=False)
        return result.returncode == 0

    def start(self, timeout: float = 30.0) -> None:
        self.init()
        if self.running:
            return
        # A previous server killed with SIGKILL leaves its pid file; pg_ctl copes with it.
        log = self.logfile
        if not log.exists():
            log.touch()
        account = _server_account()
        if account is not None:
            os.chown(log, account.pw_uid, account.pw_gid)
        self._run(
            str(self.bindir / "pg_ctl"), "start", "-w", "-t", str(int(timeout)),
            "-D", str(self.datadir), "-l", str(log),
        )  # fmt: skip
        self._ensure_database()

    def _ensure_database(self) -> None:
        psql = self.bindir / "psql"
        host_args = ["-h", "127.0.0.1"] if self.tcp else ["-h", str(self.socket_dir)]
        deadline = time.monotonic() + 10
        while True:
            result = self._run(
                str(psql), *host_args, "-p", str(self.port), "-U", self.user, "-d", "postgres",
                "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'",
                check=False,
            )  # fmt: skip
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"PostgreSQL did not accept connections: {result.stderr.strip()}")
            time.sleep(0.1)
        if result.stdout.strip() != "1":
            self._run(
                str(psql), *host_args, "-p", str(self.port), "-U", self.user, "-d", "postgres",
                "-c", f'CREATE DATABASE "{self.database}"',
            )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        if self.initialized and self.running:
            self._run(str(self.bindir / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.datadir))

    def postmaster_pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        try:
            return int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster and its children at once, as a crash would."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = child_pids(pid)
        for victim in [pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_exists(victim) for victim in [pid, *children]) and time.monotonic() < deadline:
            time.sleep(0.02)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def proc_stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from its state on (field 3 of proc(5) is index 0); None once the process is gone.

    The command name before it may hold spaces and parentheses: the fields start after the last ')'.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a postmaster's backends, writers and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = proc_stat_fields(int(entry.name))
        if fields is not None and len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def _exists(pid: int) -> bool:
    """Until a killed process is reaped, PostgreSQL's lock file check still sees it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
