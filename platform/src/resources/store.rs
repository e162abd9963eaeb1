//! The `indexes` and `infra_rules` tables.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use layer_protocol::resource::{ApplyAction, IndexInfo, IndexSpec, InfraRulesInfo, InfraRulesSpec, Metadata};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};

use crate::error::Result;
use crate::time::rfc3339;

type Labels = Json<BTreeMap<String, String>>;

#[derive(sqlx::FromRow)]
struct IndexRow {
    name: String,
    labels: Labels,
    spec: Json<IndexSpec>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// Creates or updates an Index, and makes sure its namespace exists so
/// Functions can select it before the first row is written.
pub async fn apply_index(conn: &mut PgConnection, meta: &Metadata, spec: &IndexSpec) -> Result<ApplyAction> {
    let before: Option<(Labels, Labels, Json<IndexSpec>)> =
        sqlx::query_as("SELECT labels, annotations, spec FROM indexes WHERE name = $1 FOR UPDATE")
            .bind(&meta.name)
            .fetch_optional(&mut *conn)
            .await?;
    let action = match &before {
        None => ApplyAction::Created,
        Some((l, a, s)) if l.0 == meta.labels && a.0 == meta.annotations && &s.0 == spec => ApplyAction::Unchanged,
        Some(_) => ApplyAction::Updated,
    };
    if action != ApplyAction::Unchanged {
        sqlx::query(
            "INSERT INTO indexes (name, k8s_namespace, labels, annotations, spec) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE SET k8s_namespace = $2, labels = $3, annotations = $4, spec = $5,
                 updated_at = now()",
        )
        .bind(&meta.name)
        .bind(&meta.namespace)
        .bind(Json(&meta.labels))
        .bind(Json(&meta.annotations))
        .bind(Json(spec))
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "INSERT INTO namespaces (name, distance_metric) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET distance_metric = coalesce($2, namespaces.distance_metric)",
    )
    .bind(&meta.name)
    .bind(&spec.distance_metric)
    .execute(&mut *conn)
    .await?;
    Ok(action)
}

pub async fn apply_infra_rules(conn: &mut PgConnection, meta: &Metadata, spec: &InfraRulesSpec) -> Result<ApplyAction> {
    let before: Option<(Labels, Json<InfraRulesSpec>)> =
        sqlx::query_as("SELECT labels, spec FROM infra_rules WHERE name = $1 FOR UPDATE")
            .bind(&meta.name)
            .fetch_optional(&mut *conn)
            .await?;
    let action = match &before {
        None => ApplyAction::Created,
        Some((l, s)) if l.0 == meta.labels && &s.0 == spec => ApplyAction::Unchanged,
        Some(_) => ApplyAction::Updated,
    };
    if action != ApplyAction::Unchanged {
        sqlx::query(
            "INSERT INTO infra_rules (name, k8s_namespace, labels, spec) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET k8s_namespace = $2, labels = $3, spec = $4, updated_at = now()",
        )
        .bind(&meta.name)
        .bind(&meta.namespace)
        .bind(Json(&meta.labels))
        .bind(Json(spec))
        .execute(&mut *conn)
        .await?;
    }
    Ok(action)
}

pub async fn list_indexes(pool: &PgPool) -> Result<Vec<IndexInfo>> {
    let rows: Vec<IndexRow> =
        sqlx::query_as("SELECT name, labels, spec, created_at, updated_at FROM indexes ORDER BY name")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|r| IndexInfo {
            name: r.name,
            labels: r.labels.0,
            spec: r.spec.0,
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        })
        .collect())
}

pub async fn list_infra_rules(pool: &PgPool) -> Result<Vec<InfraRulesInfo>> {
    let rows: Vec<(String, Json<InfraRulesSpec>, DateTime<Utc>)> =
        sqlx::query_as("SELECT name, spec, updated_at FROM infra_rules ORDER BY name").fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(name, spec, u)| InfraRulesInfo { name, spec: spec.0, updated_at: rfc3339(u) }).collect())
}
