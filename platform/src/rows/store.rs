//! Row-store SQL: one function per use case.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use layer_protocol::filter::Filter;
use layer_protocol::namespace::{Attributes, Document, NamespaceEntry};
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::filter::push_filter;
use super::plan::WritePlan;
use crate::error::{PlatformError, Result};

/// What a write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteCounts {
    pub upserted: u64,
    pub patched: u64,
    pub deleted: u64,
}

/// Who writes: the key, and the Function it was minted for if it is a
/// worker key.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    pub key_id: &'a str,
    pub worker_of: Option<&'a str>,
}

/// Applies a write plan in one transaction.
///
/// Concurrency: the namespace row is locked (insert-or-update) first, so
/// writers of one namespace are serialised and each transaction gets its own
/// `write_seq`, strictly increasing in commit order. Every row it touches is
/// stamped with that sequence, which is what lets discovery read only rows
/// written since its last sweep.
///
/// Write-through: when `writer` holds live pull leases on rows it writes
/// (it claimed them with this key), or is a key minted for the workers of
/// the Function that leased them, those leases move to the new `write_seq`
/// in the same transaction, so the worker's completion still passes the
/// fence. A write by anyone else leaves them behind: the result is then
/// stale, dropped, and the row runs again on its new content.
pub async fn write(
    pool: &PgPool,
    namespace: &str,
    plan: WritePlan,
    distance_metric: Option<&str>,
    writer: &Writer<'_>,
) -> Result<WriteCounts> {
    let mut tx = pool.begin().await?;
    let creates = !plan.upserts.is_empty() || distance_metric.is_some();
    let seq: Option<i64> = if creates {
        sqlx::query_scalar(
            "INSERT INTO namespaces (name, write_seq, last_write_at, distance_metric) VALUES ($1, 1, now(), $2)
             ON CONFLICT (name) DO UPDATE SET write_seq = namespaces.write_seq + 1, updated_at = now(),
                 last_write_at = now(), distance_metric = coalesce($2, namespaces.distance_metric)
             RETURNING write_seq",
        )
        .bind(namespace)
        .bind(distance_metric)
        .fetch_optional(&mut *tx)
        .await?
    } else {
        sqlx::query_scalar(
            "UPDATE namespaces SET write_seq = write_seq + 1, updated_at = now(), last_write_at = now()
             WHERE name = $1 RETURNING write_seq",
        )
        .bind(namespace)
        .fetch_optional(&mut *tx)
        .await?
    };
    let Some(seq) = seq else {
        return Err(PlatformError::NotFound(format!("namespace {namespace} not found")));
    };

    let mut touched: Vec<&str> = plan.upserts.iter().map(|u| u.id.as_str()).collect();
    touched.extend(plan.patches.iter().map(|p| p.id.as_str()));
    if !touched.is_empty() {
        // Before the rows move: the leases still name their old write_seq.
        sqlx::query(
            "UPDATE work_items w SET leased_seq = $5
             FROM rows r
             WHERE r.namespace = $1 AND r.id = ANY($2)
               AND w.namespace = r.namespace AND w.row_id = r.id
               AND w.state = 'leased' AND w.lease_expires_at > now() AND w.leased_seq = r.write_seq
               AND (w.leased_key = $3 OR w.function_id = $4)",
        )
        .bind(namespace)
        .bind(&touched)
        .bind(writer.key_id)
        .bind(writer.worker_of)
        .bind(seq)
        .execute(&mut *tx)
        .await?;
    }
    drop(touched);

    let mut counts = WriteCounts::default();
    let mut inserted: i64 = 0;
    if let Some(f) = &plan.delete_filter {
        let mut qb = QueryBuilder::<Postgres>::new("DELETE FROM rows r WHERE r.namespace = ");
        qb.push_bind(namespace);
        qb.push(" AND ");
        push_filter(&mut qb, f);
        counts.deleted += qb.build().execute(&mut *tx).await?.rows_affected();
    }
    if !plan.deletes.is_empty() {
        counts.deleted += sqlx::query("DELETE FROM rows WHERE namespace = $1 AND id = ANY($2)")
            .bind(namespace)
            .bind(&plan.deletes)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    if !plan.upserts.is_empty() {
        let n = plan.upserts.len();
        let mut ids = Vec::with_capacity(n);
        let mut attrs = Vec::with_capacity(n);
        let mut vecs: Vec<Option<String>> = Vec::with_capacity(n);
        for u in plan.upserts {
            ids.push(u.id);
            attrs.push(Value::Object(u.attributes).to_string());
            vecs.push(u.vector);
        }
        let (ins, all): (i64, i64) = sqlx::query_as(
            "WITH up AS (
                 INSERT INTO rows (namespace, id, attributes, vector, write_seq)
                 SELECT $1, u.id, u.attrs::jsonb, u.vec::real[], $5
                 FROM unnest($2::text[], $3::text[], $4::text[]) AS u(id, attrs, vec)
                 ON CONFLICT (namespace, id) DO UPDATE
                     SET attributes = EXCLUDED.attributes, vector = EXCLUDED.vector, write_seq = EXCLUDED.write_seq
                 RETURNING (xmax = 0) AS inserted)
             SELECT count(*) FILTER (WHERE inserted), count(*) FROM up",
        )
        .bind(namespace)
        .bind(&ids)
        .bind(&attrs)
        .bind(&vecs)
        .bind(seq)
        .fetch_one(&mut *tx)
        .await?;
        inserted = ins;
        counts.upserted = all as u64;
    }
    if !plan.patches.is_empty() {
        let n = plan.patches.len();
        let mut ids = Vec::with_capacity(n);
        let mut sets = Vec::with_capacity(n);
        let mut unsets = Vec::with_capacity(n);
        let mut has_vec = Vec::with_capacity(n);
        let mut vecs: Vec<Option<String>> = Vec::with_capacity(n);
        for p in plan.patches {
            ids.push(p.id);
            sets.push(Value::Object(p.set).to_string());
            unsets.push(serde_json::to_string(&p.unset).unwrap_or_else(|_| "[]".into()));
            has_vec.push(p.vector.is_some());
            vecs.push(p.vector.flatten());
        }
        counts.patched = sqlx::query(
            "UPDATE rows r
             SET attributes = (r.attributes - p.unset) || p.set,
                 vector = CASE WHEN p.has_vec THEN p.vec::real[] ELSE r.vector END,
                 write_seq = $7
             FROM (SELECT u.id, u.set::jsonb AS set,
                          ARRAY(SELECT jsonb_array_elements_text(u.unset::jsonb)) AS unset,
                          u.has_vec, u.vec
                   FROM unnest($2::text[], $3::text[], $4::text[], $5::bool[], $6::text[])
                        AS u(id, set, unset, has_vec, vec)) p
             WHERE r.namespace = $1 AND r.id = p.id",
        )
        .bind(namespace)
        .bind(&ids)
        .bind(&sets)
        .bind(&unsets)
        .bind(&has_vec)
        .bind(&vecs)
        .bind(seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    let delta = inserted - counts.deleted as i64;
    if delta != 0 {
        sqlx::query("UPDATE namespaces SET row_count = row_count + $2 WHERE name = $1")
            .bind(namespace)
            .bind(delta)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(counts)
}

async fn require_namespace(pool: &PgPool, namespace: &str) -> Result<()> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM namespaces WHERE name = $1)")
        .bind(namespace)
        .fetch_one(pool)
        .await?;
    if exists { Ok(()) } else { Err(PlatformError::NotFound(format!("namespace {namespace} not found"))) }
}

/// Keeps only the named attributes (`vector` names the vector).
fn project(attributes: Attributes, include: Option<&[String]>) -> Attributes {
    match include {
        None => attributes,
        Some(names) => attributes.into_iter().filter(|(k, _)| names.iter().any(|n| n == k)).collect(),
    }
}

/// Fetches rows by id, in the order asked; ids not found are returned apart.
pub async fn fetch(
    pool: &PgPool,
    namespace: &str,
    ids: &[String],
    include: Option<&[String]>,
) -> Result<(Vec<Document>, Vec<String>)> {
    require_namespace(pool, namespace).await?;
    let rows: Vec<(String, sqlx::types::Json<Attributes>, Option<Vec<f32>>)> =
        sqlx::query_as("SELECT id, attributes, vector FROM rows WHERE namespace = $1 AND id = ANY($2)")
            .bind(namespace)
            .bind(ids)
            .fetch_all(pool)
            .await?;
    let want_vector = include.is_none_or(|names| names.iter().any(|n| n == "vector"));
    let mut found: BTreeMap<String, Document> = rows
        .into_iter()
        .map(|(id, attrs, vector)| {
            let doc = Document {
                id: id.clone(),
                attributes: project(attrs.0, include),
                vector: vector.filter(|_| want_vector),
            };
            (id, doc)
        })
        .collect();
    let mut docs = Vec::with_capacity(found.len());
    let mut missing = Vec::new();
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    for id in ids {
        if !seen.insert(id.as_str()) {
            continue; // asked twice: answered once
        }
        match found.remove(id) {
            Some(d) => docs.push(d),
            None => missing.push(id.clone()),
        }
    }
    Ok((docs, missing))
}

/// One ordering term of a query.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderBy {
    pub attr: String,
    pub descending: bool,
}

/// A checked query.
#[derive(Debug, Clone)]
pub struct Query {
    pub filter: Option<Filter>,
    pub order: Vec<OrderBy>,
    pub top_k: i64,
    /// `None`: every attribute; `Some(list)`: those; an empty list: id only.
    pub include: Option<Vec<String>>,
}

/// Runs a query; rows come back as `{"id": .., attrs..}`.
pub async fn query(pool: &PgPool, namespace: &str, q: &Query) -> Result<Vec<Attributes>> {
    require_namespace(pool, namespace).await?;
    let want_attrs = q.include.as_ref().is_none_or(|l| !l.is_empty());
    let want_vector = q.include.as_ref().is_none_or(|l| l.iter().any(|n| n == "vector"));
    let mut qb = QueryBuilder::<Postgres>::new("SELECT r.id, ");
    qb.push(if want_attrs { "r.attributes" } else { "'{}'::jsonb" });
    qb.push(if want_vector { ", r.vector" } else { ", NULL::real[]" });
    qb.push(" FROM rows r WHERE r.namespace = ");
    qb.push_bind(namespace);
    if let Some(f) = &q.filter {
        qb.push(" AND ");
        push_filter(&mut qb, f);
    }
    qb.push(" ORDER BY ");
    for o in &q.order {
        if o.attr == "id" {
            qb.push("r.id");
        } else {
            qb.push("r.attributes -> ");
            qb.push_bind(o.attr.clone());
            qb.push("::text");
        }
        qb.push(if o.descending { " DESC NULLS LAST, " } else { " ASC NULLS LAST, " });
    }
    qb.push("r.id LIMIT ");
    qb.push_bind(q.top_k);
    let rows: Vec<(String, sqlx::types::Json<Attributes>, Option<Vec<f32>>)> =
        qb.build_query_as().fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|(id, attrs, vector)| {
            let mut row = Attributes::new();
            row.insert("id".into(), Value::String(id));
            if want_attrs {
                row.extend(project(attrs.0, q.include.as_deref()));
            }
            if let Some(v) = vector {
                row.insert("vector".into(), serde_json::json!(v));
            }
            row
        })
        .collect())
}

#[derive(sqlx::FromRow)]
struct NamespaceRow {
    name: String,
    row_count: i64,
    last_write_at: Option<DateTime<Utc>>,
    labels: sqlx::types::Json<BTreeMap<String, String>>,
}

/// A page of namespaces, by name, after `cursor`.
pub async fn list_namespaces(
    pool: &PgPool,
    prefix: &str,
    cursor: Option<&str>,
    page_size: i64,
) -> Result<(Vec<NamespaceEntry>, Option<String>)> {
    let rows: Vec<NamespaceRow> = sqlx::query_as(
        "SELECT n.name, n.row_count, n.last_write_at, coalesce(i.labels, '{}'::jsonb) AS labels
         FROM namespaces n LEFT JOIN indexes i ON i.name = n.name
         WHERE starts_with(n.name, $1) AND n.name > $2
         ORDER BY n.name LIMIT $3",
    )
    .bind(prefix)
    .bind(cursor.unwrap_or(""))
    .bind(page_size + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > page_size;
    let entries: Vec<NamespaceEntry> = rows
        .into_iter()
        .take(page_size as usize)
        .map(|r| NamespaceEntry {
            name: r.name,
            row_count: r.row_count,
            last_write_ms: r.last_write_at.map(|t| t.timestamp_millis()),
            labels: r.labels.0,
        })
        .collect();
    let next = if more { entries.last().map(|e| namespace_cursor(&e.name)) } else { None };
    Ok((entries, next))
}

/// The opaque cursor of a page of namespaces that ends at `name`.
fn namespace_cursor(name: &str) -> String {
    format!("n{}", hex::encode(name))
}

/// The name a cursor from [`list_namespaces`] ends at; anything else is a
/// 400 naming `cursor`.
pub fn parse_namespace_cursor(cursor: &str) -> Result<String> {
    cursor
        .strip_prefix('n')
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|name| !name.is_empty() && !name.contains('\0'))
        .ok_or_else(|| {
            PlatformError::invalid("cursor", "not a cursor this API gave out (next_cursor of the page before)")
        })
}

/// Deletes a namespace and all its rows.
pub async fn delete_namespace(pool: &PgPool, namespace: &str) -> Result<u64> {
    let rows: Option<i64> = sqlx::query_scalar("DELETE FROM namespaces WHERE name = $1 RETURNING row_count")
        .bind(namespace)
        .fetch_optional(pool)
        .await?;
    rows.map(|n| n as u64).ok_or_else(|| PlatformError::NotFound(format!("namespace {namespace} not found")))
}
