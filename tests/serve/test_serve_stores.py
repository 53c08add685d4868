"""The Serve app's durable stores on SQLite and PostgreSQL: the job queue (idempotent submission, leases,
takeover, ownership) and the API keys."""

from __future__ import annotations

import time

import pytest

from ehrflow.serve.auth import KeyStore
from ehrflow.serve.jobs import IdempotencyConflict, JobStore, QueueFull


def test_job_lifecycle_leases_and_takeover(database_url):
    store = JobStore(database_url)
    job, created = store.submit("t1", "p1", ["mortality"], "key-1", max_queued=2)
    assert created and job.status == "queued"
    assert store.submit("t1", "p1", ["mortality"], "key-1", max_queued=2) == (job, False)
    with pytest.raises(IdempotencyConflict, match="idempotency_key"):
        store.submit("t1", "p2", ["mortality"], "key-1", max_queued=2)
    store.submit("t1", "p2", ["readmission"], None, max_queued=2)
    with pytest.raises(QueueFull):
        store.submit("t1", "p3", ["mortality"], None, max_queued=2)

    claimed = store.claim("w1", lease_s=0.5)
    assert claimed is not None and claimed.id == job.id and claimed.status == "running" and claimed.attempts == 1
    other = store.claim("w2", lease_s=0.5)
    assert other is not None and other.id != job.id  # the live lease keeps the first job with w1
    assert store.claim("w3", lease_s=0.5) is None
    time.sleep(0.7)  # both leases expire: the first job goes to whoever claims next
    taken = store.claim("w3", lease_s=30)
    assert taken is not None and taken.id == job.id and taken.attempts == 2
    assert not store.renew(job.id, "w1", 30) and store.renew(job.id, "w3", 30)
    assert not store.finish(job.id, "w1", {"mortality": 0.1})  # the old holder cannot record a result
    assert store.finish(job.id, "w3", {"mortality": 0.2})
    done = store.get(job.id)
    assert done.status == "succeeded" and done.result == {"mortality": 0.2} and done.finished_at is not None
    assert done.finished_at.tzinfo is not None

    assert store.requeue(other.id, "w2", "transient") and store.get(other.id).status == "queued"
    assert store.counts() == {"queued": 1, "running": 0, "succeeded": 1, "failed": 0}


def test_patient_ownership(database_url):
    store = JobStore(database_url)
    store.claim_patients("t1", ["p1", "p2"])
    store.claim_patients("t2", ["p2", "p3"])  # p2 stays with its first tenant
    assert [store.owner(p) for p in ("p1", "p2", "p3", "p4")] == ["t1", "t1", "t2", None]


def test_api_keys(database_url):
    keys = KeyStore(database_url)
    token = keys.create("t1")
    assert keys.tenant_of(token) == "t1"
    assert keys.tenant_of(token[:-1] + ("A" if token[-1] != "A" else "B")) is None  # a wrong secret
    assert keys.revoke(token) and keys.tenant_of(token) is None
    assert KeyStore(database_url).tenant_of(keys.create("t2")) == "t2"  # a second client on the same database
