"""podi_workers: keyed jobs on shared buffers, in worker processes or serially.

The pool knows no astronomy: these tests use plain functions on small arrays.
"""

import os
import time

import numpy as np
import pytest

from podi_workers import JobsTimedOut, SharedBuffers, WorkerPool

SHAPE = (8, 8)


def fill(key, image, context, value):
    """Write ``value + key`` into the buffer; return the process id and the context."""
    image[...] = value + key
    return os.getpid(), context


def add_one(key, image, context):
    image += 1
    return float(image.mean())


def fail_on_three(key, image, context):
    if key == 3:
        raise ValueError("bad key\nthree")
    return key


def crash_on_three(key, image, context):
    if key == 3:
        os._exit(7)
    return key


def sleep_forever(key, image, context):
    time.sleep(600)


@pytest.fixture
def buffers():
    shared = SharedBuffers(range(6), SHAPE)
    yield shared
    shared.remove()


@pytest.mark.parametrize("serial", [False, True])
def test_rounds_share_buffers_and_workers(buffers, serial):
    done = []
    with WorkerPool(buffers, ncpus=2, context="ctx", serial=serial) as pool:
        first, failures = pool.run(fill, {key: (10.0,) for key in range(6)},
                                   lambda key, result: done.append(key))
        # A second round sees the pixels of the first: the buffers are shared.
        second, _ = pool.run(add_one, {key: () for key in range(6)})
    assert not failures and sorted(done) == list(range(6))
    assert {context for _, context in first.values()} == {"ctx"}
    pids = {pid for pid, _ in first.values()}
    assert pids == {os.getpid()} if serial else (len(pids) <= 2 and os.getpid() not in pids)
    assert second == {key: 11.0 + key for key in range(6)}
    np.testing.assert_array_equal(buffers.array(4), np.full(SHAPE, 15.0, np.float32))


@pytest.mark.parametrize("serial", [False, True])
def test_a_raising_job_fails_alone(buffers, serial):
    failed = []
    with WorkerPool(buffers, ncpus=2, serial=serial) as pool:
        results, failures = pool.run(fail_on_three, {key: () for key in range(6)},
                                     lambda key, result: result is None and failed.append(key))
    assert sorted(results) == [0, 1, 2, 4, 5]
    assert failures == {3: "ValueError: bad key three"} and failed == [3]


def test_a_dead_worker_fails_its_job_and_is_replaced(buffers):
    with WorkerPool(buffers, ncpus=2) as pool:
        results, failures = pool.run(crash_on_three, {key: () for key in range(6)})
        assert failures == {3: "worker process died (exit code 7)"}
        assert sorted(results) == [0, 1, 2, 4, 5]
        # The pool still has its workers for the next round.
        again, _ = pool.run(crash_on_three, {0: (), 1: ()})
    assert sorted(again) == [0, 1]


def test_deadline_kills_the_workers(buffers):
    pool = WorkerPool(buffers, ncpus=2, deadline=time.monotonic() + 1.0)
    with pytest.raises(JobsTimedOut, match="2 OTAs unfinished"):
        pool.run(sleep_forever, {0: (), 1: ()})
    assert not pool.workers


def test_injected_fault_names_its_key(buffers, monkeypatch):
    monkeypatch.setenv("PODI_FAULT", "raise:02")
    with WorkerPool(buffers, ncpus=1, serial=True) as pool:
        _, failures = pool.run(add_one, {key: () for key in range(4)})
    assert failures == {2: "RuntimeError: injected fault"}


def test_released_buffer_is_gone(buffers):
    path = buffers.paths[5]
    buffers.release(5)
    assert not path.exists()
