"""What a person reads while a command runs: one live line per stage, the training lines,
and a summary at the end; Ray's own logs go to files under the run directory.

The CLI turns this on (`activate`); library calls and tests leave it off and see Ray's
output as usual. `--verbose` keeps Ray's logs on the console too.

    <run_dir>/logs/bco-ray.log    every line shown, plus Ray's driver-side logs and full tracebacks
    <run_dir>/logs/ray/           Ray's session logs (workers, actors, Serve, Ray Data), copied at the end
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from pathlib import Path

_ACTIVE: Console | None = None


class Console:
    def __init__(self, run_dir: str, verbose: bool, stream=None):
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.log_dir = Path(run_dir) / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / "bco-ray.log"
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the command
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._status = ""
        self._t0 = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._live = False  # a TTY status line is on screen and must be cleared before printing
        self._last_line = time.time()
        self._file_handler: logging.Handler | None = None  # Ray's loggers write here (route_ray_logs)

    # -- lines
    def line(self, text: str) -> None:
        """A line for the console and the log."""
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_line = time.time()
            self._write_log(text)
            self._draw()

    def log_only(self, text: str) -> None:
        with self._lock:
            self._write_log(text)

    def _write_log(self, text: str) -> None:
        self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self._log.flush()

    # -- the live line of a stage
    def stage(self, name: str) -> None:
        self._stage, self._status, self._t0 = name, "", time.time()
        self.line(f"[bco-ray] stage {name} ...")
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True, name="bco-ray-console")
            self._ticker.start()

    def status(self, text: str) -> None:
        self._status = text
        self.log_only(f"[{self._stage}] {text}")

    def end_stage(self, text: str) -> None:
        self._stage = None
        self.line(text)

    def _tick(self) -> None:
        # A TTY gets its status line redrawn twice a second; a log file (CI) gets the status
        # as a line after 15 s without any other line.
        while not self._stop.wait(0.5):
            if self._stage is None:
                continue
            with self._lock:
                if self.tty:
                    self._draw()
                elif time.time() - self._last_line >= 15.0:
                    self.stream.write(self._status_text() + "\n")
                    self.stream.flush()
                    self._last_line = time.time()

    def _status_text(self) -> str:
        m, s = divmod(int(time.time() - self._t0), 60)
        return f"[bco-ray] {self._stage} {m}:{s:02d}" + (f" | {self._status}" if self._status else "")

    def _draw(self) -> None:
        if self.tty and self._stage is not None:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\x1b[2K" + self._status_text()[:width])
            self.stream.flush()
            self._live = True

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\r\x1b[2K")
            self._live = False

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._clear()
        self._log.close()


def activate(run_dir: str, verbose: bool) -> Console:
    """The CLI's console: our lines on stdout, Ray's driver-side logs into the log file."""
    global _ACTIVE
    _ACTIVE = Console(run_dir, verbose)
    route_ray_logs()
    return _ACTIVE


_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune")


def route_ray_logs() -> None:
    """Ray's driver-side loggers write to our log file instead of the console. Idempotent;
    called again after `ray.init` and Ray Data's first use, which install their handlers."""
    if not quiet():
        return
    import ray  # noqa: F401 - installs Ray's own handlers first, so that they can be moved

    handler = _ACTIVE._file_handler
    if handler is None:
        handler = logging.FileHandler(_ACTIVE.log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _ACTIVE._file_handler = handler
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        if handler not in logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False


def active() -> Console | None:
    return _ACTIVE


def quiet() -> bool:
    """Ray's own output off the console (the CLI without --verbose)."""
    return _ACTIVE is not None and not _ACTIVE.verbose


def say(text: str) -> None:
    """A progress line from the driver: through the console when active, else print."""
    if _ACTIVE is not None:
        _ACTIVE.line(text)
    else:
        print(text, flush=True)


def status(text: str) -> None:
    if _ACTIVE is not None:
        _ACTIVE.status(text)


def stage(name: str) -> None:
    """A stage starts: its live line under the console, else a plain line."""
    if _ACTIVE is not None:
        _ACTIVE.stage(name)
    else:
        print(f"[bco-ray] stage {name} ...", flush=True)


def end_stage(text: str) -> None:
    if _ACTIVE is not None:
        _ACTIVE.end_stage(text)
    else:
        print(text, flush=True)


def quiet_ray_data() -> None:
    """After ray.init: Ray's driver-side logs into our log file, and Ray Data's per-operator
    progress bars and logging-progress blocks off (our stage line replaces them; Ray Data
    still writes its own log file)."""
    if quiet():
        import ray
        import ray.data  # noqa: F401 - configures Ray Data's loggers, which route_ray_logs moves

        route_ray_logs()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        if hasattr(ctx, "enable_operator_progress_bars"):
            ctx.enable_operator_progress_bars = False


def copy_ray_logs(run_dir: str) -> Path | None:
    """Ray's session logs into <run_dir>/logs/ray (at the end of a command), when this
    process started the cluster; a joined cluster keeps its logs (they can be large)."""
    from bco_ray.raycluster import local_session_dir

    if local_session_dir() is None:
        return None
    src, dst = Path(local_session_dir()) / "logs", Path(run_dir) / "logs" / "ray"
    if not src.is_dir():
        return None
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "*.err.lock"))
    return dst


class TrainSink:
    """Training lines from the rank-0 worker to the driver's console, through a Ray queue
    (workers may be on other nodes; their stdout is not shown when Ray's logs are off)."""

    def __init__(self):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="bco-ray-train-lines")
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                text = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor went away with the cluster
                return
            if _ACTIVE is not None:
                if text.startswith("[train] step"):
                    _ACTIVE.status(text[len("[train] "):])
                _ACTIVE.line(text)

    def close(self) -> None:
        time.sleep(0.6)  # the last lines in flight
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001
            pass


def train_sink() -> TrainSink | None:
    return TrainSink() if quiet() else None

