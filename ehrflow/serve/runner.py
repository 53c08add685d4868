"""Background execution of accepted jobs, with restart recovery.

Each worker thread claims a job from the :class:`JobStore`, renews its lease while it runs and
records the outcome. A job left ``running`` by a dead process is claimed again once its lease
expires and resumes from its checkpoint; ``finish`` only succeeds for the worker holding the
job, so no job is recorded twice. Failures that a retry may cure (a replica died, a timeout) put
the job back in the queue, up to ``max_attempts``; :class:`JobInputError` fails it at once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from ehrflow.serve.jobs import Job, JobStore
from ehrflow.serve.workflow import JobInputError, ProgressFn

log = logging.getLogger(__name__)

JobFn = Callable[[Job, ProgressFn], dict[str, Any]]


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        job_fn: JobFn,
        *,
        workers: int = 2,
        lease_s: float = 30.0,
        max_attempts: int = 3,
        poll_s: float = 0.5,
        on_finish: Callable[[Job, str], None] | None = None,
    ):
        self.store = store
        self.job_fn = job_fn
        self.workers = workers
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.on_finish = on_finish
        self.name = f"runner-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, args=(f"{self.name}-{i}",), name=f"{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        """A job was submitted: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _loop(self, worker: str) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim(worker, self.lease_s)
            except Exception:  # the database is briefly unavailable: try again at the next poll
                log.exception("claiming a job failed")
                job = None
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self.run_claimed(job, worker)

    def run_claimed(self, job: Job, worker: str) -> str:
        """Run one claimed job to an outcome: ``succeeded``, ``failed``, ``requeued`` or ``lost``."""
        done = threading.Event()
        heartbeat = threading.Thread(target=self._renew, args=(job.id, worker, done), daemon=True)
        heartbeat.start()
        log.info("job %s: attempt %d on %s", job.id, job.attempts, worker)
        try:
            result = self.job_fn(job, lambda n, total: self.store.set_progress(job.id, n, total))
        except JobInputError as exc:
            outcome = "failed" if self.store.fail(job.id, worker, str(exc)) else "lost"
        except Exception as exc:  # noqa: BLE001 - any other failure may be transient (a dead replica)
            message = f"{type(exc).__name__}: {exc}"[:2000]
            log.warning("job %s: attempt %d failed: %s", job.id, job.attempts, type(exc).__name__)
            if job.attempts < self.max_attempts:
                outcome = "requeued" if self.store.requeue(job.id, worker, message) else "lost"
            else:
                outcome = "failed" if self.store.fail(job.id, worker, message) else "lost"
        else:
            outcome = "succeeded" if self.store.finish(job.id, worker, result) else "lost"
        finally:
            done.set()
        if self.on_finish is not None:
            self.on_finish(job, outcome)
        log.info("job %s: %s", job.id, outcome)
        return outcome

    def _renew(self, job_id: str, worker: str, done: threading.Event) -> None:
        while not done.wait(self.lease_s / 3):
            try:
                self.store.renew(job_id, worker, self.lease_s)
            except Exception:  # noqa: BLE001 - a missed renewal only shortens the lease
                log.warning("job %s: lease renewal failed", job_id)
