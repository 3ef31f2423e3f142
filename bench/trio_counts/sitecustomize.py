"""Bench-only: count trio tasks spawned and task steps in a proxy process (profile_floor.py).

Active only when ``BENCH_TRIO_COUNTS`` names a file prefix and this directory is first on
``PYTHONPATH``: wraps ``trio.run`` to add an Instrument, and a daemon thread writes
``{prefix}.{pid}.json`` ({"tasks": n, "steps": n}) every 0.2 s, so the bench can take the
difference over a measurement window. Costs one Python call per task step, so it runs in a
separate window from any CPU measurement.
"""

import os

_OUT = os.environ.get("BENCH_TRIO_COUNTS")

if _OUT:
    import json
    import threading
    import time

    import trio

    class _Counts(trio.abc.Instrument):
        def __init__(self) -> None:
            self.tasks = 0
            self.steps = 0

        def task_spawned(self, task: object) -> None:
            self.tasks += 1

        def before_task_step(self, task: object) -> None:
            self.steps += 1

    _COUNTS = _Counts()
    _run = trio.run

    def _counted_run(*args, **kwargs):
        kwargs["instruments"] = [*kwargs.get("instruments", ()), _COUNTS]
        return _run(*args, **kwargs)

    trio.run = _counted_run

    def _dump() -> None:
        path = f"{_OUT}.{os.getpid()}.json"
        while True:
            time.sleep(0.2)
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"tasks": _COUNTS.tasks, "steps": _COUNTS.steps}, fh)
            os.replace(tmp, path)

    threading.Thread(target=_dump, daemon=True, name="bench-trio-counts").start()
