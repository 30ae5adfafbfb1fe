"""unionfs.fuse_loop's reader/spare protocol on a pipe standing in for the FUSE device."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from unionfs.fuse_loop import _Loop


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            with contextlib.suppress(OSError):  # the dead-device case closes w itself
                os.close(fd)


def test_one_reader_and_a_spare_woken_when_the_handler_suspends(pipe: tuple[int, int]) -> None:
    r, w = pipe
    loop = _Loop(r)
    log: list[str] = []

    async def worker(name: str, handler_waits: trio.Event) -> None:
        # pyfuse3's _session_loop, reduced: wait, read one request, serve it.
        while await loop.wait_fuse_readable():
            req = os.read(r, 1)
            log.append(f"{name}:{req.decode()}")
            if req == b"s":  # a handler that waits on something (a worker thread)
                await handler_waits.wait()
            if req == b"q":
                return

    async def main() -> None:
        trio.lowlevel.add_instrument(loop)
        slow_done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, "A", slow_done)
            nursery.start_soon(worker, "B", slow_done)
            await trio.testing.wait_all_tasks_blocked()
            assert loop.reader is not None  # one task waits for the device...
            assert len(loop.spares) == 1  # ...the other is parked
            os.write(w, b"s")  # A (or B) takes it and waits inside its handler
            await trio.testing.wait_all_tasks_blocked()
            assert len(loop.spares) == 0 and loop.reader is not None  # the spare reads now
            os.write(w, b"f")
            await trio.testing.wait_all_tasks_blocked()
            assert len(log) == 2  # served while the first handler still waits
            slow_done.set()
            await trio.testing.wait_all_tasks_blocked()
            os.write(w, b"q")
            await trio.testing.wait_all_tasks_blocked()
            loop.stop()
        trio.lowlevel.remove_instrument(loop)

    trio.run(main)
    assert [e.split(":")[1] for e in log] == ["s", "f", "q"]
    assert log[0].split(":")[0] != log[1].split(":")[0]  # the second was read by the spare


def test_a_served_task_reads_again_without_waking_the_spare(pipe: tuple[int, int]) -> None:
    r, w = pipe
    loop = _Loop(r)
    readers: list[str] = []

    async def worker(name: str) -> None:
        while await loop.wait_fuse_readable():
            if os.read(r, 1) == b"q":
                return
            readers.append(name)

    async def main() -> None:
        trio.lowlevel.add_instrument(loop)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, "A")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(worker, "B")
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(40):  # more than _FAIR in a row, some already queued
                os.write(w, b"x")
            await trio.testing.wait_all_tasks_blocked()
            assert len(readers) == 40 and set(readers) == {"A"}
            loop.stop()
        trio.lowlevel.remove_instrument(loop)

    trio.run(main)


def test_stop_closed_and_dead_device_end_every_waiter(pipe: tuple[int, int]) -> None:
    r, w = pipe
    ends: list[bool] = []

    async def worker(loop: _Loop) -> None:
        ends.append(await loop.wait_fuse_readable())

    async def run(how: str) -> None:
        loop = _Loop(r)
        trio.lowlevel.add_instrument(loop)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(worker, loop)
            await trio.testing.wait_all_tasks_blocked()
            if how == "stop":
                loop.stop()
            elif how == "closing":
                trio.lowlevel.notify_closing(r)  # what pyfuse3.terminate does
            else:
                os.close(w)  # the pipe's POLLHUP stands in for a dead device's POLLERR
        trio.lowlevel.remove_instrument(loop)

    for how in ("stop", "closing"):
        ends.clear()
        trio.run(run, how)
        assert ends == [False, False, False], how
    # A hang-up wakes the parked reader as readable (pyfuse3 then reads 0 and ends); the
    # spares see the dead device and end.
    ends.clear()
    trio.run(run, "dead")
    assert sorted(ends) == [False, False, True]


def test_a_steady_stream_of_requests_still_lets_other_tasks_run(pipe: tuple[int, int]) -> None:
    r, w = pipe
    loop = _Loop(r)
    served: list[bytes] = []
    seen_by_other: list[int] = []

    async def worker() -> None:
        while await loop.wait_fuse_readable():
            served.append(os.read(r, 1))

    async def other() -> None:
        await trio.lowlevel.checkpoint()
        seen_by_other.append(len(served))

    async def main() -> None:
        trio.lowlevel.add_instrument(loop)
        os.write(w, b"x" * 100)  # already queued: the device stays readable
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            nursery.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()
            loop.stop()
        trio.lowlevel.remove_instrument(loop)

    trio.run(main)
    assert len(served) == 100
    assert seen_by_other and seen_by_other[0] < 100  # it ran while requests were queued
