"""Every TpufClient method (fetch, query, list_ids, patch_columns) and the
client's scan calls (create_scan, get_scan, get_scan_results with limit and
offset, list_scans, delete_scan, scan, wait_for_scan), through the public
hevlayer client unchanged; then the same TpufClient as run_udf_worker hands
it to a pull Function's UDF. Exits non-zero on the first disagreement.

Env: LAYER_URL, LAYER_API_KEY (an admin key).
"""

import asyncio
import os
from collections import Counter

from hevlayer import AsyncHevlayer, HevlayerError
from hevlayer.models import (
    Document,
    QueryResponse,
    ScanCountResponse,
    ScanIdsResponse,
    ScanJob,
    ScanJobList,
    ScanValuesResponse,
    StatusResponse,
    TurbopufferWriteResponse,
)
from hevlayer.udf import TpufClient, run_udf_worker, udf

N = 2500
COLORS = ["red", "green", "blue", "black"]


def make_rows():
    return {
        f"r{i:05d}": {"color": COLORS[i % 4], "size": i % 10, "tags": ["a", "b"] if i % 3 == 0 else ["a"]}
        for i in range(N)
    }


def matching(rows, colors, below):
    return sorted(i for i, a in rows.items() if a["color"] in colors and a["size"] < below)


async def expect_error(coro, status, needle=None):
    try:
        await coro
    except HevlayerError as e:
        assert e.status_code == status, f"expected {status}, got {e.status_code}: {e.message}"
        if needle:
            assert needle in e.message, f"{needle!r} not in {e.message!r}"
        return e
    raise AssertionError(f"expected HTTP {status}, the call succeeded")


def next_offset(page):
    """`next_offset` is an extra field to the client's models: absent on the last page."""
    return getattr(page, "next_offset", None)


async def all_pages(c, ns, scan_id, limit):
    got, offset = [], 0
    while True:
        page = await c.get_scan_results(ns, scan_id, limit=limit, offset=offset)
        assert isinstance(page, ScanIdsResponse), type(page)
        if not page.ids:
            assert next_offset(page) is None, page
            return got, page.total
        got += page.ids
        offset += len(page.ids)
        assert next_offset(page) == (offset if offset < page.total else None), (next_offset(page), offset)


async def main():
    url, key = os.environ["LAYER_URL"], os.environ["LAYER_API_KEY"]
    rows = make_rows()
    async with AsyncHevlayer(api_key=key, base_url=url) as c:
        await c.write_namespace("items", {"upsert_rows": [{"id": i, **a} for i, a in rows.items()]})
        tpuf = TpufClient(c)

        # fetch
        d = await tpuf.fetch("items", "r00007")
        assert isinstance(d, Document) and d.attributes == rows["r00007"], d
        d = await tpuf.fetch("items", "r00007", include_attributes=["color"])
        assert d.attributes == {"color": "black"}, d.attributes

        # query
        q = await tpuf.query(
            "items", {"filters": ["color", "Eq", "red"], "rank_by": ["size", "desc"], "top_k": 3, "include_attributes": ["size"]}
        )
        assert isinstance(q, QueryResponse)
        reds = sorted((i for i, a in rows.items() if a["color"] == "red"), key=lambda i: (-rows[i]["size"], i))
        assert [r["id"] for r in q.rows] == reds[:3], q.rows

        # list_ids, with a filter, without one, and cut by page_size
        flt = ["And", [["color", "In", ["red", "blue"]], ["size", "Lt", 5]]]
        want = matching(rows, ("red", "blue"), 5)
        assert len(want) > 100, len(want)
        assert await tpuf.list_ids("items", flt) == want
        assert await tpuf.list_ids("items", None) == sorted(rows)
        assert await tpuf.list_ids("items", flt, page_size=7) == want[:7]
        assert await tpuf.list_ids("items", ["color", "Eq", "purple"]) == []

        # patch_columns, seen by the next list_ids
        r = await tpuf.patch_columns("items", want[:3], {"color": ["white"] * 3})
        assert isinstance(r, TurbopufferWriteResponse) and r.rows_patched == 3, r
        for i in want[:3]:
            rows[i]["color"] = "white"
        assert await tpuf.list_ids("items", ["color", "Eq", "white"]) == want[:3]
        want = matching(rows, ("red", "blue"), 5)

        # create_scan answers with the job, already completed; its results
        # page by limit and offset, and default to the scan's page_size.
        job = await c.create_scan("items", {"filters": flt, "page_size": 100})
        assert isinstance(job, ScanJob), type(job)
        assert job.status == "completed" and job.mode == "ids" and job.progress == 1.0, job
        assert job.documents_scanned == len(want) and job.truncated is False, job
        assert job.source == "auto" and job.effective_source == "origin", job
        got, total = await all_pages(c, "items", job.id, 37)
        assert got == want and total == len(want), (len(got), total)
        first = await c.get_scan_results("items", job.id)
        assert first.ids == want[:100] and next_offset(first) == 100, first
        tail = await c.get_scan_results("items", job.id, offset=len(want) - 2)
        assert tail.ids == want[-2:] and next_offset(tail) is None, tail
        g = await c.get_scan("items", job.id)
        assert isinstance(g, ScanJob) and g.id == job.id and g.status == "completed", g
        assert g.filters == flt and g.page_size == 100, g

        # scan = create_scan + wait_for_scan
        s = await c.scan("items", {"filters": ["tags", "Contains", "b"]}, timeout=10)
        assert isinstance(s, ScanJob) and s.status == "completed", s
        with_b = sorted(i for i, a in rows.items() if "b" in a["tags"])
        assert s.documents_scanned == len(with_b)
        page = await c.get_scan_results("items", s.id, limit=10_000)
        assert page.ids == with_b and page.total == len(with_b)
        w = await c.wait_for_scan("items", s.id, timeout=5)
        assert isinstance(w, ScanJob) and w.id == s.id

        # A count scan answers with the client's ScanCountResponse (and
        # still has an id, so scan() works on it too).
        cnt = await c.create_scan("items", {"filters": ["size", "Gte", 8], "mode": "count"})
        assert isinstance(cnt, ScanCountResponse), type(cnt)
        big = sum(1 for a in rows.values() if a["size"] >= 8)
        assert cnt.count == big and cnt.served_by == "origin" and cnt.elapsed_ms >= 0, cnt
        cs = await c.scan("items", {"filters": ["size", "Gte", 8], "mode": "count"})
        assert isinstance(cs, ScanJob) and cs.mode == "count" and cs.documents_scanned == big, cs
        await expect_error(c.get_scan_results("items", cs.id), 400, "count scan")

        # A values scan: distinct values, most frequent first; an array
        # counts each element.
        v = await c.scan("items", {"mode": "values", "field": "color"})
        assert v.unique_values == 5, v
        vals = await c.get_scan_results("items", v.id)
        assert isinstance(vals, ScanValuesResponse), type(vals)
        counts = Counter(a["color"] for a in rows.values())
        assert [(x.v, x.n) for x in vals.values] == sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])), vals
        assert vals.total == 5 and vals.truncated is False
        two = await c.get_scan_results("items", v.id, limit=2, offset=1)
        assert [x.v for x in two.values] == [x.v for x in vals.values[1:3]]
        t = await c.scan("items", {"mode": "values", "field": "tags", "filters": ["size", "Eq", 0]})
        tv = await c.get_scan_results("items", t.id)
        zero = [a for a in rows.values() if a["size"] == 0]
        assert {x.v: x.n for x in tv.values} == dict(Counter(tag for a in zero for tag in a["tags"])), tv
        assert t.documents_scanned == len(zero)

        # list_scans: newest first
        lst = await c.list_scans("items")
        assert isinstance(lst, ScanJobList)
        listed = [x.id for x in lst.scans]
        for older, newer in [(job.id, s.id), (s.id, cnt.id), (cnt.id, v.id), (v.id, t.id)]:
            assert listed.index(newer) < listed.index(older), listed

        # delete_scan
        st = await c.delete_scan("items", job.id)
        assert isinstance(st, StatusResponse) and st.status == "OK", st
        await expect_error(c.get_scan("items", job.id), 404, "not found")
        await expect_error(c.get_scan_results("items", job.id), 404)
        await expect_error(c.delete_scan("items", job.id), 404)
        assert job.id not in [x.id for x in (await c.list_scans("items")).scans]

        # An operator the store cannot evaluate is a 400 naming it, through
        # list_ids as through create_scan.
        e = await expect_error(c.create_scan("items", {"filters": ["color", "Like", "r%"]}), 400, "Like")
        assert e.error == "invalid_request", e.error
        await expect_error(tpuf.list_ids("items", ["color", "Nope", "x"]), 400, "unknown filter operator \"Nope\"")
        await expect_error(tpuf.list_ids("nowhere", None), 404, "namespace nowhere not found")

        # The TpufClient run_udf_worker hands a UDF: each group row lists
        # its members, reads one, queries one and marks it.
        await c.write_namespace("groups", {"upsert_rows": [{"id": color, "color": color} for color in ("red", "blue", "white")]})
        spec = {"target_namespaces": ["groups"], "inputs": ["id", "color"], "version": "v1",
                "worker": {"dispatch": "pull", "batch_size": 10, "timeout_seconds": 30}, "triggers": ["discovery"]}
        await c.create_udf({"id": "group-members", "spec": spec})
        await c.discover_udf("group-members", {})

        @udf(id="group-members", output="members")
        async def members(*, id, color, tpuf):
            ids = await tpuf.list_ids("items", ["color", "Eq", color])
            doc = await tpuf.fetch("items", ids[0])
            assert doc.attributes["color"] == color, doc
            q = await tpuf.query("items", {"filters": ["color", "Eq", color], "top_k": 1})
            assert q.rows[0]["id"] == ids[0], q.rows
            await tpuf.patch_columns("items", ids[:1], {"first_of": [id]})
            return len(ids)

        await run_udf_worker(members, api_key=key, base_url=url, once=True)
        for color in ("red", "blue", "white"):
            g = await c.fetch_document("groups", color)
            n = sum(1 for a in rows.values() if a["color"] == color)
            assert g.attributes.get("members") == n, (color, g.attributes, n)
            first = min(i for i, a in rows.items() if a["color"] == color)
            marked = await c.fetch_document("items", first)
            assert marked.attributes.get("first_of") == color, marked.attributes
    print("scans: all checks passed")


asyncio.run(main())
