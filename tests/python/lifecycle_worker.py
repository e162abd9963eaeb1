"""A worker built on the hevlayer client's run_udf_worker, for the lifecycle
test. Per row (by its `mode` input):

- "flaky":   raises TransientError on its first two calls, then succeeds;
- "poison":  raises PermanentError;
- "vanish":  with VANISH=1 the process claims one batch and exits without
             reporting anything;
- anything else succeeds.

Every call is appended to CALLS_FILE as `id attempt`.
"""

import asyncio
import os
import sys
from collections import Counter

from hevlayer import AsyncHevlayer
from hevlayer.udf import PermanentError, TransientError, run_udf_worker, udf

calls: Counter = Counter()
log = open(os.environ["CALLS_FILE"], "a", buffering=1)


@udf(inputs=["id", "mode"], output="result", kind="label")
def work(*, id: str, mode: str | None) -> str:
    calls[id] += 1
    log.write(f"{id} {calls[id]}\n")
    if mode == "flaky" and calls[id] <= 2:
        raise TransientError(f"{id}: not yet ({calls[id]})")
    if mode == "poison":
        raise PermanentError(f"{id}: cannot be done")
    return f"done after {calls[id]}"


async def vanish() -> None:
    async with AsyncHevlayer(api_key=os.environ["LAYER_GATEWAY_API_KEY"], base_url=os.environ["HEVLAYER_BASE_URL"]) as c:
        claimed = await c.claim_udf_items("lifecycle", {"worker_id": "vanisher", "limit": 10, "lease_seconds": 1})
        print(f"claimed {len(claimed.items)} and vanished", flush=True)


if __name__ == "__main__":
    if os.environ.get("VANISH") == "1":
        asyncio.run(vanish())
        sys.exit(0)
    asyncio.run(run_udf_worker(work, udf_id="lifecycle", poll_interval=0.1))
