"""Seed 000's second worker pattern: declare the `tpuf` parameter, write
through the client, and return None; completion then stamps only the
marker. The rows' namespace comes from TAGS_NAMESPACE (default products):
a claimed item's input does not carry it.
"""

import os

from hevlayer.udf import PermanentError, udf

NAMESPACE = os.environ.get("TAGS_NAMESPACE", "products")


@udf(inputs=["id", "title", "description"], kind="tags")
async def tag_product(*, id: str, title: str | None, description: str | None, tpuf) -> None:
    if not title:
        raise PermanentError(f"{id}: missing title")
    text = f"{title} {description or ''}".lower()
    tags = [t for t in ("wireless", "waterproof") if t in text] or ["uncategorized"]
    await tpuf.patch_columns(NAMESPACE, [id], {"tags": [tags]})
    return None
