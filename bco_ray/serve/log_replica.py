"""`FeedbackLog`: the Serve deployment (one replica) that writes the served and feedback logs
for every model replica, so feedback sent to any replica finds its answer. Requests wait for
the group commit that puts their row on storage (bco_ray/serve/feedback_log.py)."""

import asyncio
import time

from ray import serve

GATHER_S = 0.02  # after the first row reaches an idle log, how long the others of its burst may join it


# graceful_shutdown_timeout_s: the shutdown hook's final write to S3 gets a minute, not Serve's 20 s.
@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.1},
                  graceful_shutdown_timeout_s=60)
class FeedbackLog:
    """The served and feedback logs' one writer. `record` and `feedback` return once their
    rows are on storage (group commit: one write per `commit_seconds` for everyone waiting)."""

    def __init__(self, uri: str, storage: dict, commit_seconds: float, commit_timeout_s: float, max_served: int):
        from bco_ray.config import StorageConfig
        from bco_ray.serve.feedback_log import FeedbackWriter

        self.writer = FeedbackWriter(uri, StorageConfig(**storage), max_served)
        self.commit_seconds, self.commit_timeout_s = commit_seconds, commit_timeout_s
        self.waiting: list[tuple[int, asyncio.Future]] = []
        self.committer: asyncio.Task | None = None
        self.failing_since: float | None = None

    async def _commit_loop(self) -> None:
        """Group commit: an idle log writes a request's row at once; while a write is under
        way the next rows gather, and go out together at most every `commit_seconds`."""
        while True:
            await self.wake.wait()
            # a decoding batch's answers reach the log within a few ms of each other: one write
            await asyncio.sleep(GATHER_S)
            self.wake.clear()
            t0 = time.monotonic()
            if self.writer.pending():
                try:
                    # off the event loop: a slow store must not stop requests from queueing rows
                    upto = await asyncio.to_thread(self.writer.commit)
                except Exception as e:  # noqa: BLE001 - the rows stay queued, in order; retried
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                        print(f"[serve] log commit failed, retrying: {type(e).__name__}: {e}", flush=True)
                    await asyncio.sleep(max(self.commit_seconds, 0.05))
                    self.wake.set()
                    continue
                if self.failing_since is not None:
                    print(f"[serve] log commits resumed after {time.monotonic() - self.failing_since:.0f} s",
                          flush=True)
                    self.failing_since = None
                done = [f for s, f in self.waiting if s <= upto]
                self.waiting = [(s, f) for s, f in self.waiting if s > upto]
                for f in done:
                    if not f.done():
                        f.set_result(True)
            await asyncio.sleep(max(0.0, self.commit_seconds - (time.monotonic() - t0)))

    async def _durable(self, seq: int) -> bool:
        """Wait until row `seq` is on storage: False after commit_timeout_s (the row stays
        queued and is written later, but the request is answered 503)."""
        if self.committer is None or self.committer.done():
            self.wake = asyncio.Event()
            self.committer = asyncio.get_running_loop().create_task(self._commit_loop())
        if seq <= self.writer.committed:
            return True
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((seq, fut))
        self.wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.commit_timeout_s)
            return True
        except TimeoutError:
            return False

    async def record(self, completion_id: str, prompt, completions: list[str], model: str, version: str) -> bool:
        return await self._durable(self.writer.record(completion_id, prompt, completions, model, version))

    async def feedback(self, completion_id: str, thumbs_up: bool, comment: str | None, index: int,
                       caller: str = "anonymous") -> dict:
        from bco_ray.serve.feedback_log import UnknownCompletion

        try:
            row, seq = self.writer.feedback(completion_id, thumbs_up, comment, index, caller)
        except UnknownCompletion:
            return {"error": "unknown"}
        except IndexError as e:
            return {"error": "index", "message": str(e)}
        if not await self._durable(seq):
            return {"error": "storage"}
        return {"ok": True, "label": row["label"], "joined": row["completion"] is not None}

    async def flush(self) -> int:
        """Commit what is queued now; returns how many rows that was."""
        n = self.writer.pending()
        await asyncio.to_thread(self.writer.commit)
        return n

    def stats(self) -> dict:
        w = self.writer
        return {"written": w.written, "buffered": w.pending(), "served": len(w.served),
                "dead_lettered": w.dead_lettered}

    def __del__(self):
        # Serve calls this on graceful shutdown: what is still queued is written.
        if self.committer is not None:
            self.committer.cancel()
        self.writer.close()
