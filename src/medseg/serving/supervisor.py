"""``medseg serve``'s supervision of the embedded server: the restart policy, apart from the process itself.

``EmbeddedServer`` starts, polls and stops one tritonserver; ``Supervisor`` keeps one serving until it is asked to
stop: a server that died, or lost a model process (Triton's python backend does not restart one), is restarted on
the same ports, and a crash loop ends it with the server's error.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable

from medseg.serving.server import EmbeddedServer
from medseg_client.errors import ServerError


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Supervisor:
    """Keeps ``server`` serving: ``grace_s`` for a stop asked by a signal, restarts when ``restart_on_crash``,
    ``start_attempts`` starts in a row before a crash loop is given up; ``log`` says what it does."""

    def __init__(self, server: EmbeddedServer, grace_s: float = 20.0, restart_on_crash: bool = True,
                 start_attempts: int = 3, log: Callable[[str], None] = _stderr) -> None:
        self.server = server
        self.grace_s, self.restart_on_crash, self.start_attempts, self.log = grace_s, restart_on_crash, start_attempts, log

    def serve_until_signalled(self, on_ready: Callable[[], None] = lambda: None) -> int:
        """Start, call ``on_ready``, and block until the server exits; SIGINT/SIGTERM (from the moment this
        is called) ask it to stop, and it is killed after ``grace_s``.

        A server that died, or lost a model process (Triton's python backend does not restart one), is
        restarted on the same ports: the requests it held failed fast and clients retry. A server that
        cannot start ``start_attempts`` times in a row (a crash loop) ends this with its error.
        Returns the server's exit code, or 0 when it stopped because it was asked to.
        """
        asked: dict[str, float] = {}

        def handler(signum: int, _frame: object) -> None:
            asked.setdefault("at", time.monotonic())
            self.server.terminate()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            if not self._start_with_retries(1, asked):
                return 0
            on_ready()
            while True:
                code = self._watch(asked)
                if "at" in asked or not self.restart_on_crash:
                    break
                self.log(f"tritonserver exited with code {code}: restarting it")
                if not self._start_with_retries(self.start_attempts, asked):
                    break
                self.log("server restarted and ready")
        finally:
            self.server.stop(timeout_s=1.0)
            for s, h in previous.items():
                signal.signal(s, h)
        return 0 if "at" in asked else int(code or 0)

    def _start_with_retries(self, attempts: int, asked: dict[str, float]) -> bool:
        """Start (again); False if asked to stop meanwhile; ServerError after ``attempts`` failed starts."""
        for attempt in range(1, attempts + 1):
            self.server.stop(timeout_s=1.0)
            try:
                self.server.start()
                return True
            except ServerError as e:
                if "at" in asked:
                    return False
                if attempt == attempts:
                    raise
                self.log(f"tritonserver failed to start (attempt {attempt} of {attempts}): {str(e).splitlines()[0]}")
                time.sleep(attempt)
        return False

    def _watch(self, asked: dict[str, float]) -> int:
        """Block while the server runs, restarting it when it loses a model process; its exit code."""
        expected = len(self.server.model_processes())
        while self.server.running():
            if "at" in asked:
                if time.monotonic() - asked["at"] > self.grace_s:
                    break
            elif self.restart_on_crash and (alive := len(self.server.model_processes())) < expected:
                self.log(f"a model process died ({alive} of {expected} left): restarting the server")
                self.server.stop(timeout_s=5.0)
                if "at" in asked or not self._start_with_retries(self.start_attempts, asked):
                    break
                expected = len(self.server.model_processes())
                self.log("server restarted and ready")
                continue
            time.sleep(0.2)
        return self.server.exit_code()
