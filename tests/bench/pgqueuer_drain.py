"""The reference a user would otherwise pick: PgQueuer (PyPI) draining no-op
jobs on the same PostgreSQL. Run by `layer-bench drain`.

    python pgqueuer_drain.py enqueue DSN ROWS
    python pgqueuer_drain.py drain DSN BATCH      # prints seconds and CPU seconds
"""

import asyncio
import resource
import sys
import time
from datetime import timedelta

import asyncpg
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode


async def enqueue(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    q = Queries(AsyncpgDriver(conn))
    try:
        await q.install()
    except Exception:
        await q.uninstall()
        await q.install()
    for start in range(0, rows, 10_000):
        n = min(10_000, rows - start)
        await q.enqueue(["noop"] * n, [None] * n, [0] * n)
    await conn.close()


async def drain(dsn: str, batch: int) -> None:
    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    started = time.perf_counter()
    await qm.run(batch_size=batch, mode=QueueExecutionMode.drain, dequeue_timeout=timedelta(seconds=1))
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{elapsed:.3f} {usage.ru_utime + usage.ru_stime:.3f}")
    await conn.close()


if __name__ == "__main__":
    mode, dsn, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(enqueue(dsn, n) if mode == "enqueue" else drain(dsn, n))
