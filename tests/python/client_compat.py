"""Drives the public hevlayer client (PyPI) against a Layer platform and
checks that every call succeeds, parses into the client's models and returns
the right rows. Exits non-zero on the first disagreement.

Env: LAYER_URL, LAYER_API_KEY (an admin key).
"""

import asyncio
import fnmatch
import os

from hevlayer import AsyncHevlayer, HevlayerError
from hevlayer.models import (
    ApiKey,
    ApiKeyList,
    Document,
    FetchDocumentsResponse,
    GetUdfResponse,
    MintKeyResponse,
    NamespaceList,
    QueryResponse,
    StatusResponse,
    TurbopufferWriteResponse,
    Udf,
    UdfList,
    UdfStatus,
)

N = 10_000
CATEGORIES = ["outdoor", "indoor", "kitchen"]
COLORS = ["red", "green", "blue", "black"]


def make_rows():
    return {
        f"p{i:05d}": {
            "title": f"product {i}",
            "category": CATEGORIES[i % 3],
            "price": i % 500,
            "color": COLORS[i % 4],
            "tags": ["wireless"] if i % 5 == 0 else [],
        }
        for i in range(N)
    }


def matches(attrs, f):
    """A reference evaluator for the operators the query below uses."""
    head = f[0]
    if head == "And":
        return all(matches(attrs, g) for g in f[1])
    if head == "Or":
        return any(matches(attrs, g) for g in f[1])
    if head == "Not":
        return not matches(attrs, f[1])
    attr, op, value = f
    v = attrs.get(attr)
    if op == "Eq":
        return v == value
    if op == "In":
        return v in value
    if op == "Glob":
        return isinstance(v, str) and fnmatch.fnmatchcase(v, value)
    if op == "Contains":
        return isinstance(v, list) and value in v
    raise AssertionError(f"reference evaluator lacks {op}")


async def expect_error(coro, status, needle=None):
    try:
        await coro
    except HevlayerError as e:
        assert e.status_code == status, f"expected {status}, got {e.status_code}: {e.message}"
        if needle:
            assert needle in e.message, f"{needle!r} not in {e.message!r}"
        return e
    raise AssertionError(f"expected HTTP {status}, the call succeeded")


async def main():
    url, key = os.environ["LAYER_URL"], os.environ["LAYER_API_KEY"]
    rows = make_rows()
    ids = sorted(rows)
    async with AsyncHevlayer(api_key=key, base_url=url) as c:
        # 10,000 documents, in four writes.
        upserted = 0
        for start in range(0, N, 2500):
            chunk = [{"id": i, **rows[i]} for i in ids[start : start + 2500]]
            r = await c.write_namespace("products", {"upsert_rows": chunk})
            assert isinstance(r, TurbopufferWriteResponse), type(r)
            assert r.status == "OK" and r.rows_affected == len(chunk)
            upserted += r.rows_upserted
        assert upserted == N, upserted

        # patch_columns: set, and null removes.
        r = await c.patch_columns("products", ["p00000", "p00001", "p09999"], {"price": [1000, 1001, 1002], "color": [None, "white", "white"]})
        assert isinstance(r, TurbopufferWriteResponse) and r.rows_patched == 3, r
        rows["p00000"]["price"] = 1000
        del rows["p00000"]["color"]
        rows["p00001"].update(price=1001, color="white")
        rows["p09999"].update(price=1002, color="white")

        d = await c.fetch_document("products", "p00001")
        assert isinstance(d, Document) and d.id == "p00001"
        assert d.attributes == rows["p00001"], d.attributes
        d = await c.fetch_document("products", "p00000", include_attributes=["price", "title"])
        assert d.attributes == {"price": 1000, "title": "product 0"}, d.attributes
        await expect_error(c.fetch_document("products", "nope"), 404)

        fd = await c.fetch_documents("products", {"ids": ["p00002", "p00003", "nope"], "include_attributes": ["category"]})
        assert isinstance(fd, FetchDocumentsResponse)
        assert [x.id for x in fd.documents] == ["p00002", "p00003"] and fd.missing == ["nope"], fd
        assert fd.documents[0].attributes == {"category": "kitchen"}

        flt = [
            "And",
            [
                ["category", "In", ["outdoor", "kitchen"]],
                ["Or", [["title", "Glob", "product 1*"], ["tags", "Contains", "wireless"]]],
                ["Not", ["color", "Eq", "red"]],
            ],
        ]
        q = await c.query_namespace(
            "products",
            {"filters": flt, "rank_by": ["price", "desc"], "top_k": 50, "include_attributes": ["price", "title", "category"]},
        )
        assert isinstance(q, QueryResponse)
        expected = sorted((i for i in ids if matches(rows[i], flt)), key=lambda i: (-rows[i]["price"], i))[:50]
        got = [row["id"] for row in q.rows]
        assert got == expected, f"query rows differ:\n got {got[:10]}\nwant {expected[:10]}"
        assert set(q.rows[0]) == {"id", "price", "title", "category"}, q.rows[0]

        e = await expect_error(c.query_namespace("products", {"filters": ["price", "Like", 3]}), 400, "Like")
        assert e.error == "invalid_request", e.error

        # list_namespaces, with a prefix and paging.
        await c.write_namespace("other", {"upsert_rows": [{"id": 1, "x": 1}]})
        nl = await c.list_namespaces()
        assert isinstance(nl, NamespaceList)
        assert {n.name: n.row_count for n in nl.namespaces} == {"other": 1, "products": N}, nl
        nl = await c.list_namespaces(prefix="prod")
        assert [n.name for n in nl.namespaces] == ["products"]
        page = await c.list_namespaces(page_size=1)
        assert [n.name for n in page.namespaces] == ["other"] and page.next_cursor, page
        page = await c.list_namespaces(page_size=1, cursor=page.next_cursor)
        assert [n.name for n in page.namespaces] == ["products"] and page.next_cursor is None, page

        # Keys: mint a read-only key limited to one namespace, use it, revoke it.
        minted = await c.mint_key({"name": "reader", "entitlements": {"ro": {"scopes": ["read"], "namespaces": ["products"]}}, "expiresAfter": "30d"})
        assert isinstance(minted, MintKeyResponse) and minted.phase == "Active" and minted.token
        listed = await c.list_keys()
        assert isinstance(listed, ApiKeyList)
        assert minted.keyId in [k.keyId for k in listed.keys]
        assert all(not hasattr(k, "token") or k.token is None for k in listed.keys)
        got_key = await c.get_key(minted.keyId)
        assert isinstance(got_key, ApiKey) and got_key.entitlements["ro"].namespaces == ["products"]

        async with AsyncHevlayer(api_key=minted.token, base_url=url) as ro:
            d = await ro.fetch_document("products", "p00002")
            assert d.attributes["category"] == "kitchen"
            await expect_error(ro.write_namespace("products", {"upsert_rows": [{"id": "x"}]}), 403)
            await expect_error(ro.fetch_document("other", "1"), 404)
            visible = await ro.list_namespaces()
            assert [n.name for n in visible.namespaces] == ["products"], visible
            await expect_error(ro.list_keys(), 403)

            revoked = await c.revoke_key(minted.keyId)
            assert isinstance(revoked, ApiKey) and revoked.phase == "Revoked" and revoked.revokedAt
            await expect_error(ro.fetch_document("products", "p00002"), 403, "revoked")

        async with AsyncHevlayer(api_key="lyr_wrong", base_url=url) as bad:
            await expect_error(bad.list_namespaces(), 401)
        async with AsyncHevlayer(base_url=url) as anon:
            await expect_error(anon.list_namespaces(), 401)

        deleted = await c.delete_key(minted.keyId)
        assert isinstance(deleted, StatusResponse)

        # Functions through the client's snake_case models.
        spec = {
            "target_namespaces": ["products"],
            "inputs": ["id", "title", "description"],
            "version": "v1",
            "worker": {"dispatch": "pull", "batch_size": 32, "timeout_seconds": 30},
            "triggers": ["discovery"],
        }
        u = await c.create_udf({"id": "product-tags", "spec": spec})
        assert isinstance(u, Udf) and u.spec.worker.batch_size == 32
        await expect_error(c.create_udf({"id": "product-tags", "spec": spec}), 409)
        g = await c.get_udf("product-tags")
        assert isinstance(g, GetUdfResponse) and g.status.active_namespaces == ["products"], g
        st = await c.get_udf_status("product-tags")
        assert isinstance(st, UdfStatus) and st.udf_id == "product-tags"
        u = await c.upsert_udf("product-tags", {"spec": {**spec, "version": "v2"}})
        assert isinstance(u, Udf) and u.spec.version == "v2"
        lst = await c.list_udfs()
        assert isinstance(lst, UdfList) and [x.id for x in lst.udfs] == ["product-tags"]
        p = await c.pause_udf("product-tags")
        assert isinstance(p, Udf) and p.paused
        p = await c.resume_udf("product-tags")
        assert not p.paused
        # A cron schedule travels in schedule.cron (an extra field to the
        # client's models), and the Function still parses everywhere.
        cron_spec = {**spec, "triggers": ["write"], "schedule": {"cron": "0 3 * * *", "lease_seconds": 60}}
        u = await c.upsert_udf("nightly", {"spec": cron_spec})
        assert isinstance(u, Udf) and u.spec.triggers == ["write"] and u.spec.schedule.cron == "0 3 * * *", u
        g = await c.get_udf("nightly")
        assert g.status.discovery.next_scheduled_at.endswith("T03:00:00.000Z"), g.status
        lst = await c.list_udfs()
        assert sorted(x.id for x in lst.udfs) == ["nightly", "product-tags"]
        await c.delete_udf("nightly")
        bad_spec = {**spec, "worker": {"batchSize": 3}}
        await expect_error(c.upsert_udf("product-tags", {"spec": bad_spec}), 400, "spec.worker.batchSize: unknown field, did you mean batch_size")
        s = await c.delete_udf("product-tags")
        assert isinstance(s, StatusResponse)
        await expect_error(c.get_udf("product-tags"), 404)

        s = await c.delete_namespace("other")
        assert isinstance(s, StatusResponse)
    print("client_compat: all checks passed")


asyncio.run(main())
