"""The pieces under preemption (issue 29): `StopRequests` (a first, a second and a during-a-save
signal) and `StopSync`, the agreement that every process stops after one same iteration
(threads over an in-memory key-value store stand for processes). End to end:
`test_preemption.py`."""
from __future__ import annotations

import signal
import threading
import time

import pytest


def test_stop_requests_first_second_and_during_a_save():
    from jaxgpt.engine.preemption import StopRequests, Stopped

    with StopRequests() as stops:
        assert not stops.should_stop(1)
        signal.raise_signal(signal.SIGTERM)
        assert stops.should_stop(2) and stops.requested == signal.SIGTERM
        with pytest.raises(Stopped) as e:
            with stops.saving():
                signal.raise_signal(signal.SIGINT)  # deferred until the save is whole
                saved = True
        assert saved and e.value.exit_code == 130 and "once the checkpoint" in e.value.message
        with pytest.raises(Stopped) as e:
            signal.raise_signal(signal.SIGTERM)
        assert e.value.exit_code == 143 and not e.value.agreed
        assert stops.stopped().agreed and stops.stopped().exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


class Store:
    """The key-value calls of jax's DistributedRuntimeClient that StopSync uses."""

    def __init__(self):
        self.data, self.cond = {}, threading.Condition()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.cond:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.data[key] = value
            self.cond.notify_all()

    def key_value_try_get(self, key):
        with self.cond:
            if key not in self.data:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.data[key]

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.data, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.data[key]


@pytest.mark.parametrize("notify_at", [0, 5])
def test_every_process_stops_after_the_same_iteration(notify_at):
    """Three processes in lockstep (a barrier per iteration stands for the collectives);
    process 2 is told to stop after iteration `notify_at` (0: before its loop began): all
    three stop after one same iteration, no later than two past the notice."""
    from jaxgpt.parallel.distributed import StopSync

    store, n, start = Store(), 3, 10
    syncs = [StopSync(store, p, n, poll=0.01, wait_s=10) for p in range(n)]
    barrier = threading.Barrier(n, timeout=20)
    stopped_at: dict[int, int] = {}

    def process(p):
        if p == 2 and notify_at == 0:
            syncs[p].notify(signal.SIGTERM)
        time.sleep(0.02 * p)  # starts a little apart
        syncs[p].begin(start)
        for done in range(start + 1, start + 200):
            barrier.wait()  # iteration `done` needs every process
            time.sleep(0.002 * ((p + done) % 3))
            if p == 2 and done == start + notify_at:
                syncs[p].notify(signal.SIGTERM)
            if syncs[p].reached(done):
                stopped_at[p] = done
                return

    threads = [threading.Thread(target=process, args=(p,)) for p in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(set(stopped_at.values())) == 1 and len(stopped_at) == n, stopped_at
    assert start + max(notify_at, 1) <= stopped_at[0] <= start + max(notify_at, 1) + 2
    assert all(s.notice == (signal.SIGTERM, 2) for s in syncs)
