"""The peer watchdog (jaxgpt.parallel.distributed.PeerWatchdog) against an in-memory key-value store;
the real 2-process kill is tests/test_multihost.py (slow)."""
import threading
import time

import pytest

from jaxgpt.parallel.distributed import PeerWatchdog, resolve_peer_timeout
from jaxgpt.errors import UserError


class Store:
    """The three calls of jax's DistributedRuntimeClient the watchdog uses."""

    def __init__(self):
        self.data, self.lock, self.broken = {}, threading.Lock(), False

    def key_value_increment(self, key, n):
        if self.broken:
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses\nmore text")
        with self.lock:
            self.data[key] = str(int(self.data.get(key, "0")) + n)
            return int(self.data[key])

    def key_value_dir_get(self, prefix):
        if self.broken:
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
        with self.lock:
            return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            self.data[key] = value


def _watch(store, me, n=3, timeout=0.6):
    deaths = []
    dog = PeerWatchdog(store, me, n, timeout, on_dead=deaths.append, interval=0.05)
    dog.start()
    return dog, deaths


def _wait(deaths, seconds):
    end = time.monotonic() + seconds
    while not deaths and time.monotonic() < end:
        time.sleep(0.02)


def test_a_silent_peer_is_reported_within_the_timeout():
    store = Store()
    dogs = [_watch(store, i) for i in range(3)]
    time.sleep(0.3)
    assert all(not deaths for _, deaths in dogs)  # everyone beating: nobody is dead
    dogs[2][0].stop(exited=False)  # process 2 dies: its counter stops, it never says goodbye
    t0 = time.monotonic()
    _wait(dogs[0][1], 3)
    waited = time.monotonic() - t0
    assert dogs[0][1] == ["process 2 of 3 sent no heartbeat for 0.6 s (it died or hangs); stopping process 0 "
                          "too; restart every process with --resume RUN"]
    assert 0.6 - 0.1 <= waited < 0.6 + 1.5, waited  # the last beat came up to one interval before
    for dog, _ in dogs:
        dog.stop()


def test_a_peer_that_exits_normally_is_not_an_error():
    store = Store()
    (a, deaths), (b, _) = _watch(store, 0, n=2), _watch(store, 1, n=2)
    time.sleep(0.2)
    b.stop()  # atexit of a run that finished: marks itself exited
    time.sleep(1.2)
    assert deaths == []
    a.stop()


def test_losing_the_coordinator_is_one_line():
    store = Store()
    dog, deaths = _watch(store, 1, n=2)
    store.broken = True
    _wait(deaths, 3)
    assert len(deaths) == 1 and deaths[0].startswith("process 1 lost the coordinator (process 0) [UNAVAILABLE")
    assert "\n" not in deaths[0]
    dog.stop()


def test_peer_timeout_setting(monkeypatch):
    monkeypatch.delenv("JAXGPT_PEER_TIMEOUT", raising=False)
    assert resolve_peer_timeout(None) == 60.0 and resolve_peer_timeout(5) == 5.0
    monkeypatch.setenv("JAXGPT_PEER_TIMEOUT", "12.5")
    assert resolve_peer_timeout(None) == 12.5
    for bad in ("0", "-3", "nan", "inf", "soon"):
        monkeypatch.setenv("JAXGPT_PEER_TIMEOUT", bad)
        with pytest.raises(UserError, match="peer timeout"):
            resolve_peer_timeout(None)


def test_while_exiting_a_dead_peer_is_not_waited_for_and_a_lost_coordinator_is_no_error():
    """After its work, a process says goodbye but keeps watching: a peer that dies then is
    reported as a warning (JAX's shutdown barrier would wait for it), and the coordinator
    going away (process 0 finished first) is normal."""
    store = Store()
    gone, dead = [], []
    a = PeerWatchdog(store, 0, 2, 0.6, on_dead=dead.append, on_gone=gone.append, interval=0.05)
    b = PeerWatchdog(store, 1, 2, 0.6, on_dead=dead.append, on_gone=gone.append, interval=0.05)
    a.start(), b.start()
    time.sleep(0.3)
    a.leaving()  # process 0 is done
    b.stop(exited=False)  # process 1 dies without a goodbye
    _wait(gone, 3)
    assert dead == [] and len(gone) == 1 and gone[0].startswith("process 1 of 2 sent no heartbeat for 0.6 s while "
                                                                "process 0 was exiting")
    store2, lost = Store(), []
    c = PeerWatchdog(store2, 1, 2, 0.6, on_dead=lost.append, on_gone=lost.append, interval=0.05)
    c.leaving()
    store2.broken = True
    c.start()
    c.join(2)
    assert lost == [] and not c.is_alive()
