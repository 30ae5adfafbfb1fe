"""pyfuse3's request loop with a cheaper wait for the FUSE device: one reader, spares parked."""

from __future__ import annotations

import inspect
import logging
import os
import select
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

log = logging.getLogger("layerfs")

# Why: pyfuse3 3.5's `_session_loop` runs every request through `_wait_fuse_readable`, which
# takes a trio.Lock shared by (at least) two worker tasks and then parks in
# `trio.lowlevel.wait_readable`. For a serial stream of requests (one `stat` after another)
# that is a lock handoff and an extra task step per request, ~40-60 us of Python, more than
# our own lookup costs; with a single task (max_tasks=1) cold stat is ~1.7x faster, but then a
# handler awaiting a worker thread (cold read, copy-up, fsync) stops every other request.
#
# How: `_session_loop` looks `_wait_fuse_readable` up in pyfuse3's module globals on every
# call (as it does `fuse_opendir_async`, see fuse_dircache.py), so we put ours there. Exactly
# one task holds the *reader* role: it waits for the device and returns to read a request;
# the task that has just served a request takes the role again at once (no handoff), and
# skips the park when the device is already readable (a zero-timeout poll) except every
# `_FAIR`-th time, so other tasks still run under a steady stream of requests. Every other
# worker parks as a *spare*. A spare is woken only when it is needed: when the task serving a
# request suspends inside its handler (a trio instrument sees that task's step end before
# it came back for the next request), so someone is always reading while a handler waits on
# a thread. pyfuse3 never sees a waiting reader (its `active_readers` stays 0), so it starts a
# new worker after each request until it has `max_tasks` and never retires them: a pool of
# parked tasks, woken one at a time. Shutdown: `terminate()` (wrapped) and a closed or dead
# device end every waiting task. `install` checks the pyfuse3 version and finds the device fd
# itself; when anything differs it changes nothing and pyfuse3's own loop runs.
_PYFUSE3_VERSION = "3.5.0"
_FAIR = 16
_DEAD = select.POLLERR | select.POLLHUP | select.POLLNVAL
MAX_TASKS = 99
ENV_LOOP = "LAYERFS_FUSE_LOOP"  # "pyfuse3" selects pyfuse3's own loop (for comparisons)


def fuse_fds() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.append(int(name))
        except OSError:
            continue
    return fds


class _Loop(trio.abc.Instrument):
    """The reader role, the parked spares and the wake-up of a spare when a handler waits."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        self.reader: trio.lowlevel.Task | None = None
        # The task serving the request it read last, until it suspends or comes back.
        self.serving: trio.lowlevel.Task | None = None
        self.spares = trio.lowlevel.ParkingLot()
        self.exiting = False
        self.streak = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.serving:
            # Its handler suspended (or the task ended): let a spare read meanwhile.
            self.serving = None
            self.spares.unpark()

    def stop(self) -> None:
        """End the loop: every spare and the waiting reader return False."""
        self.exiting = True
        self.spares.unpark_all()
        trio.lowlevel.notify_closing(self.fd)

    async def wait_fuse_readable(self) -> bool:
        """pyfuse3's contract: True when the device is readable, False to end the loop."""
        task = trio.lowlevel.current_task()
        if self.serving is task:
            self.serving = None
        while self.reader is not None and not self.exiting:
            await self.spares.park()
        if self.exiting:
            return False
        self.reader = task
        try:
            ready = self.poller.poll(0)
            if ready and ready[0][1] & _DEAD:
                # Unmounted or aborted: end this task and every spare.
                self.stop()
                return False
            if ready and self.streak < _FAIR:
                self.streak += 1
            else:
                self.streak = 0
                await trio.lowlevel.wait_readable(self.fd)
        except trio.ClosedResourceError:
            self.stop()
            return False
        finally:
            self.reader = None
        self.serving = task
        return True


def _loop_for_this_pyfuse3() -> _Loop | None:
    if os.environ.get(ENV_LOOP) == "pyfuse3":
        return None
    ok = (
        pyfuse3.__version__ == _PYFUSE3_VERSION
        and inspect.iscoroutinefunction(getattr(pyfuse3, "_wait_fuse_readable", None))
        and callable(getattr(pyfuse3, "terminate", None))
    )
    if not ok:
        log.warning("pyfuse3 %s: using its own request loop", pyfuse3.__version__)
        return None
    fds = fuse_fds()
    if len(fds) != 1:
        log.warning("%d FUSE devices open: using pyfuse3's own request loop", len(fds))
        return None
    return _Loop(fds[0])


async def main(max_tasks: int = MAX_TASKS) -> None:
    """Run pyfuse3's main loop (after `pyfuse3.init`) with our wait when this pyfuse3 is the
    one we know, else pyfuse3's own. `max_tasks` bounds the requests served at once."""
    loop = _loop_for_this_pyfuse3()
    if loop is None:
        await pyfuse3.main(max_tasks=max_tasks)
        return
    mod: Any = pyfuse3
    orig_wait = mod._wait_fuse_readable
    orig_terminate: Callable[[], None] = mod.terminate

    def terminate() -> None:
        loop.stop()
        orig_terminate()

    mod._wait_fuse_readable = loop.wait_fuse_readable
    mod.terminate = terminate
    trio.lowlevel.add_instrument(loop)
    try:
        await pyfuse3.main(max_tasks=max_tasks)
    finally:
        trio.lowlevel.remove_instrument(loop)
        mod._wait_fuse_readable = orig_wait
        mod.terminate = orig_terminate
