"""The diagnosis hooks of issue 15: tracemalloc on request, task counts, process and build series."""

from __future__ import annotations

import asyncio
import logging
import threading
import tracemalloc

import pytest
from prometheus_client import generate_latest

from controlplane.diagnostics import TRACEMALLOC_ENV, AllocationTracer
from controlplane.errors import ConfigError
from controlplane.metrics import Metrics


def sample(text: str, name: str, labels: str = "") -> float | None:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


# -- tracemalloc --------------------------------------------------------------------------


def test_tracer_is_off_unless_the_environment_asks() -> None:
    assert AllocationTracer.from_env({}) is None
    assert AllocationTracer.from_env({TRACEMALLOC_ENV: "0"}) is None
    tracer = AllocationTracer.from_env({TRACEMALLOC_ENV: " 10 "})
    assert tracer is not None and tracer.frames == 10


@pytest.mark.parametrize("raw", ["yes", "-1", "65", "1.5"])
def test_a_malformed_setting_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as e:
        AllocationTracer.from_env({TRACEMALLOC_ENV: raw})
    (problem,) = e.value.problems
    assert TRACEMALLOC_ENV in problem and repr(raw) in problem


def hoard(kept: list[bytes]) -> None:
    for _ in range(200):
        kept.append(bytes(10_000))  # the line a dump must point at


def test_dump_points_at_the_line_that_grew_and_stop_ends_tracing() -> None:
    assert not tracemalloc.is_tracing()
    tracer = AllocationTracer(frames=1, top=10)
    tracer.start()
    kept: list[bytes] = []
    try:
        assert tracemalloc.is_tracing()
        hoard(kept)
        lines = tracer.dump()
        ours = [line for line in lines if "test_diagnostics.py" in line]
        assert ours, lines
        kib = float(ours[0].split(": ")[1].split(" KiB")[0])
        assert kib >= 1900, ours[0]  # 200 x 10 kB
        # A second dump compares with the first: that line did not grow since.
        again = tracer.dump()
        assert not any("test_diagnostics.py" in line and "+19" in line for line in again), again
    finally:
        tracer.stop()
    assert not tracemalloc.is_tracing()
    assert len(kept) == 200


class CountingTracer(AllocationTracer):
    def __init__(self) -> None:
        super().__init__(frames=1, top=3)
        self.threads: list[int] = []
        self.dumped = threading.Event()

    def dump(self) -> list[str]:
        lines = super().dump()
        self.threads.append(threading.get_ident())
        self.dumped.set()
        return lines


async def test_a_request_dumps_once_on_a_worker_thread(caplog: pytest.LogCaptureFixture) -> None:
    tracer = CountingTracer()
    tracer.start()
    task = asyncio.create_task(tracer.run())
    try:
        with caplog.at_level(logging.WARNING, logger="controlplane.diagnostics"):
            tracer.request()
            tracer.request()  # merged with the first
            assert await asyncio.to_thread(tracer.dumped.wait, 10)
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        tracer.stop()
    assert len(tracer.threads) == 1 and tracer.threads[0] != threading.get_ident()
    assert sum("tracemalloc:" in r.getMessage() for r in caplog.records) == 1


# -- /metrics -------------------------------------------------------------------------------


async def test_task_gauge_counts_unfinished_tasks_at_scrape_time() -> None:
    metrics = Metrics("agent-east-1")
    metrics.tasks.add_loop("main", asyncio.get_running_loop())
    before = sample(generate_latest(metrics.registry).decode(), "controlplane_asyncio_tasks", 'loop="main"')
    assert before is not None and before >= 1  # this test's own task
    sleepers = [asyncio.create_task(asyncio.sleep(60)) for _ in range(5)]
    try:
        during = sample(
            generate_latest(metrics.registry).decode(), "controlplane_asyncio_tasks", 'loop="main"'
        )
    finally:
        for t in sleepers:
            t.cancel()
        await asyncio.gather(*sleepers, return_exceptions=True)
    after = sample(generate_latest(metrics.registry).decode(), "controlplane_asyncio_tasks", 'loop="main"')
    assert during == before + 5
    assert after == before
    metrics.tasks.remove_loop("main")
    assert 'loop="main"' not in generate_latest(metrics.registry).decode()


def test_process_and_build_series_are_exposed() -> None:
    text = generate_latest(Metrics("agent-east-1").registry).decode()
    rss = sample(text, "process_resident_memory_bytes")
    assert rss is not None and rss > 1_000_000
    assert (sample(text, "process_open_fds") or 0) > 0
    build = [line for line in text.splitlines() if line.startswith("controlplane_build_info{")]
    assert len(build) == 1 and build[0].endswith(" 1.0"), build
    assert 'agent="agent-east-1"' in build[0] and 'version="' in build[0] and 'python="3.' in build[0]
