"""The entrypoint of the ghcr.io/hev/tag-products:latest image.

Runs seed 000's classifier (worker.py, unchanged) as the pull worker of the
Function the runner names in HEVLAYER_UDF_ID. Two things in the seed's text
do not line up, and this is where they are reconciled, without touching
worker.py:

- its __main__ block claims for "product-tags", while the seed's YAML names
  the Function tag-products: the id here comes from HEVLAYER_UDF_ID;
- its function takes id, title and description, while the seed's YAML lists
  only id and title as inputs: every input the @udf decorator declares is
  passed, None when the claim did not carry it.
"""

import asyncio
import inspect
import os
import sys

from hevlayer.udf import run_udf_worker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import worker  # noqa: E402  (the seed's module, as written)


def with_declared_inputs(fn):
    meta = getattr(fn, "__hevlayer_udf__", {})
    names = list(meta.get("inputs", []))

    def call(**given):
        args = {name: given.get(name) for name in names}
        if "tpuf" in given:
            args["tpuf"] = given["tpuf"]
        return fn(**args)

    call.__hevlayer_udf__ = meta
    # run_udf_worker passes `tpuf` to functions whose signature asks for it.
    call.__signature__ = inspect.signature(fn)
    return call


def main() -> None:
    udf_id = os.environ.get("HEVLAYER_UDF_ID")
    if not udf_id:
        sys.exit("HEVLAYER_UDF_ID is not set: the runner sets it to the Function's name")
    fn = getattr(worker, os.environ.get("LAYER_UDF_FUNCTION", "tag_product"))
    print(f"pull worker for {udf_id} starting against {os.environ.get('HEVLAYER_BASE_URL')}", flush=True)
    asyncio.run(run_udf_worker(with_declared_inputs(fn), udf_id=udf_id, poll_interval=1.0))


if __name__ == "__main__":
    main()
