//! The `functions` and `function_revisions` tables.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use layer_protocol::function::{FunctionSpec, Revision, Udf, changed_paths};
use layer_protocol::resource::ApplyAction;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};

use crate::error::{PlatformError, Result};
use crate::time::rfc3339;

/// A `functions` row; also read whole as `to_jsonb(f)` (a report reads its
/// batch and the batch's Function in one statement).
#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub(crate) struct FunctionRow {
    id: String,
    labels: Json<BTreeMap<String, String>>,
    spec: Json<FunctionSpec>,
    paused: bool,
    revision: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, labels, spec, paused, revision, created_at, updated_at";

impl From<FunctionRow> for Udf {
    fn from(r: FunctionRow) -> Self {
        Udf {
            id: r.id,
            spec: r.spec.0,
            paused: r.paused,
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
            revision: r.revision,
            labels: r.labels.0,
        }
    }
}

/// A Function to create or update.
#[derive(Debug, Clone)]
pub struct FunctionInput {
    pub id: String,
    pub k8s_namespace: String,
    /// `None` keeps the labels a Function already has.
    pub labels: Option<BTreeMap<String, String>>,
    pub spec: FunctionSpec,
    /// `None` keeps the current state (a new Function starts unpaused).
    pub paused: Option<bool>,
}

/// Who writes a Function, as far as the store needs to know: the key
/// recorded on the revision, and whether it may make runners start
/// programs on their hosts.
#[derive(Debug, Clone, Copy)]
pub struct Author<'a> {
    /// Recorded on the revision; `None` for the platform's own writes.
    pub key_id: Option<&'a str>,
    /// The admin scope: only it may set or change `worker.command`, or the
    /// `worker.env` of a worker that is not an image.
    pub may_run_commands: bool,
}

impl Author<'_> {
    /// The platform itself (tools and tests that write the store directly).
    pub const INTERNAL: Author<'static> = Author { key_id: None, may_run_commands: true };
}

/// The trust rule for code on runner hosts: a command (`worker.command`)
/// runs as a process on a runner's host, outside any container, so setting
/// or changing one needs the admin scope; so does changing the environment
/// of a worker that is not an image (it is that process's environment). An
/// image runs in a hardened container and stays open to `write` keys.
/// Opening the Function to calls without a key (`calls.anonymous`) needs
/// the admin scope too. Returns the field that needs admin, if any.
pub fn field_needing_admin(old: Option<&FunctionSpec>, new: &FunctionSpec) -> Option<&'static str> {
    if new.calls.anonymous && !old.is_some_and(|o| o.calls.anonymous) {
        return Some("spec.calls.anonymous");
    }
    let (was, now) = (old.map(|s| &s.worker), &new.worker);
    if now.command.is_some() && was.is_none_or(|w| w.command != now.command) {
        return Some("spec.worker.command");
    }
    let on_host = now.command.is_some() || now.image.is_none();
    let env_changed = match was {
        Some(w) => w.env != now.env,
        None => !now.env.is_empty(),
    };
    (on_host && env_changed).then_some("spec.worker.env")
}

fn not_found(id: &str) -> PlatformError {
    PlatformError::NotFound(format!("function {id} not found"))
}

/// Creates or updates a Function. A changed spec stores a new revision with
/// the paths that changed and the author's key, in the same transaction;
/// an identical one changes nothing. With `create_only`, an existing
/// Function is a 409. A change [`field_needing_admin`] names is a 403
/// unless the author may run commands.
///
/// Concurrency: the Function row is locked (`FOR UPDATE`) for the caller's
/// transaction, so two applies of one Function produce consecutive revisions
/// and the trust check sees the spec the change replaces.
pub async fn upsert(
    conn: &mut PgConnection,
    input: &FunctionInput,
    author: Author<'_>,
    create_only: bool,
) -> Result<(Udf, ApplyAction)> {
    let key_id = author.key_id;
    let new_spec = serde_json::to_value(&input.spec).map_err(|e| PlatformError::invalid("spec", e.to_string()))?;
    let current: Option<FunctionRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM functions WHERE id = $1 FOR UPDATE"))
            .bind(&input.id)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(field) = field_needing_admin(current.as_ref().map(|r| &r.spec.0), &input.spec) {
        if !author.may_run_commands {
            let what = if field.ends_with("command") {
                "a command runs as a process on the runners' hosts"
            } else if field.ends_with("anonymous") {
                "it lets anyone who can reach the platform call the Function"
            } else {
                "it is the environment of a process on the runners' hosts (the worker has no image)"
            };
            let tail = if field.ends_with("anonymous") { "" } else { " (a worker.image does not)" };
            return Err(PlatformError::Forbidden(format!(
                "{field}: key {} lacks the admin scope: {what}, so setting or changing it needs an admin key{tail}",
                key_id.unwrap_or("?")
            )));
        }
        // The revision written below records the key; this says it in the log.
        tracing::info!(udf = %input.id, key_id = key_id.unwrap_or(""), field, "code for runner hosts set");
    }
    let (action, revision) = match &current {
        None => {
            // A re-created Function continues its revision history.
            let last: Option<(i32, Json<serde_json::Value>)> = sqlx::query_as(
                "SELECT revision, spec FROM function_revisions WHERE function_id = $1 ORDER BY revision DESC LIMIT 1",
            )
            .bind(&input.id)
            .fetch_optional(&mut *conn)
            .await?;
            let (revision, changed) = match last {
                Some((n, old)) => (n + 1, changed_paths(&old.0, &new_spec)),
                None => (1, vec!["spec".to_string()]),
            };
            insert_revision(conn, &input.id, revision, &new_spec, &changed, key_id).await?;
            sqlx::query(
                "INSERT INTO functions (id, k8s_namespace, labels, spec, paused, revision) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&input.id)
            .bind(&input.k8s_namespace)
            .bind(Json(input.labels.clone().unwrap_or_default()))
            .bind(Json(&new_spec))
            .bind(input.paused.unwrap_or(false))
            .bind(revision)
            .execute(&mut *conn)
            .await?;
            (ApplyAction::Created, revision)
        }
        Some(_) if create_only => {
            return Err(PlatformError::Conflict(format!(
                "function {} already exists; PUT /v2/udfs/{} updates it",
                input.id, input.id
            )));
        }
        Some(row) => {
            let old_spec = serde_json::to_value(&row.spec.0).unwrap_or_default();
            let changed = changed_paths(&old_spec, &new_spec);
            let labels = input.labels.clone().unwrap_or_else(|| row.labels.0.clone());
            let paused = input.paused.unwrap_or(row.paused);
            if changed.is_empty() && labels == row.labels.0 && paused == row.paused {
                (ApplyAction::Unchanged, row.revision)
            } else {
                let revision = if changed.is_empty() { row.revision } else { row.revision + 1 };
                if !changed.is_empty() {
                    insert_revision(conn, &input.id, revision, &new_spec, &changed, key_id).await?;
                }
                sqlx::query(
                    "UPDATE functions SET spec = $2, labels = $3, paused = $4, revision = $5, k8s_namespace = $6,
                         updated_at = now()
                     WHERE id = $1",
                )
                .bind(&input.id)
                .bind(Json(&new_spec))
                .bind(Json(&labels))
                .bind(paused)
                .bind(revision)
                .bind(&input.k8s_namespace)
                .execute(&mut *conn)
                .await?;
                (ApplyAction::Updated, revision)
            }
        }
    };
    let row: FunctionRow = sqlx::query_as(&format!("SELECT {COLUMNS} FROM functions WHERE id = $1"))
        .bind(&input.id)
        .fetch_one(&mut *conn)
        .await?;
    debug_assert_eq!(row.revision, revision);
    Ok((row.into(), action))
}

async fn insert_revision(
    conn: &mut PgConnection,
    id: &str,
    revision: i32,
    spec: &serde_json::Value,
    changed: &[String],
    key_id: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO function_revisions (function_id, revision, spec, changed, key_id) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(revision)
    .bind(Json(spec))
    .bind(changed)
    .bind(key_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Udf> {
    let row: Option<FunctionRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM functions WHERE id = $1")).bind(id).fetch_optional(pool).await?;
    row.map(Udf::from).ok_or_else(|| not_found(id))
}

pub async fn list(pool: &PgPool) -> Result<Vec<Udf>> {
    let rows: Vec<FunctionRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM functions ORDER BY id")).fetch_all(pool).await?;
    Ok(rows.into_iter().map(Udf::from).collect())
}

/// Deletes a Function. Attributes already written stay; revisions are kept.
pub async fn delete(pool: &PgPool, id: &str) -> Result<()> {
    let n = sqlx::query("DELETE FROM functions WHERE id = $1").bind(id).execute(pool).await?.rows_affected();
    if n == 0 { Err(not_found(id)) } else { Ok(()) }
}

pub async fn set_paused(pool: &PgPool, id: &str, paused: bool) -> Result<Udf> {
    let row: Option<FunctionRow> = sqlx::query_as(&format!(
        "UPDATE functions SET paused = $2, updated_at = CASE WHEN paused = $2 THEN updated_at ELSE now() END
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(paused)
    .fetch_optional(pool)
    .await?;
    row.map(Udf::from).ok_or_else(|| not_found(id))
}

#[derive(sqlx::FromRow)]
struct RevisionRow {
    revision: i32,
    created_at: DateTime<Utc>,
    key_id: Option<String>,
    changed: Vec<String>,
    spec: Json<FunctionSpec>,
}

pub async fn revisions(pool: &PgPool, id: &str) -> Result<Vec<Revision>> {
    let rows: Vec<RevisionRow> = sqlx::query_as(
        "SELECT revision, created_at, key_id, changed, spec FROM function_revisions
         WHERE function_id = $1 ORDER BY revision",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Err(not_found(id));
    }
    Ok(rows
        .into_iter()
        .map(|r| Revision {
            revision: r.revision,
            created_at: rfc3339(r.created_at),
            key_id: r.key_id,
            changed: r.changed,
            spec: r.spec.0,
        })
        .collect())
}

/// The namespaces a Function currently targets that exist: its
/// `target_namespaces`, plus the Index resources its selector matches.
pub async fn active_namespaces(pool: &PgPool, spec: &FunctionSpec) -> Result<Vec<String>> {
    let mut names: Vec<String> = sqlx::query_scalar("SELECT name FROM namespaces WHERE name = ANY($1) ORDER BY name")
        .bind(&spec.target_namespaces)
        .fetch_all(pool)
        .await?;
    if let Some(selector) = &spec.index_selector {
        let indexes: Vec<(String, Json<BTreeMap<String, String>>)> = sqlx::query_as(
            "SELECT i.name, i.labels FROM indexes i JOIN namespaces n ON n.name = i.name ORDER BY i.name",
        )
        .fetch_all(pool)
        .await?;
        for (name, labels) in indexes {
            if selector.matches(&labels.0) && !names.contains(&name) {
                names.push(name);
            }
        }
        names.sort();
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use layer_protocol::function::validate_spec;
    use layer_protocol::validate::{Case, Problems};

    fn spec(worker: serde_json::Value) -> FunctionSpec {
        let mut p = Problems::new();
        let v = validate_spec(
            &mut p,
            "spec",
            &serde_json::json!({"targetNamespaces": ["a"], "worker": worker}),
            Case::Camel,
        );
        assert!(p.is_empty(), "{p:?}");
        v.expect("valid").spec
    }

    #[test]
    fn commands_and_the_environment_of_processes_need_admin_images_do_not() {
        let cmd = spec(serde_json::json!({"dispatch": "push", "command": ["w"]}));
        let other_cmd = spec(serde_json::json!({"dispatch": "push", "command": ["w", "--fast"]}));
        let cmd_env = spec(serde_json::json!({"dispatch": "push", "command": ["w"], "env": {"A": "1"}}));
        let mut cmd_v2 = cmd.clone();
        cmd_v2.version = "v2".into();
        let image = spec(serde_json::json!({"dispatch": "push", "image": "x:1", "env": {"A": "1"}}));
        let pull_env = spec(serde_json::json!({"dispatch": "pull", "env": {"A": "1"}}));
        assert_eq!(field_needing_admin(None, &cmd), Some("spec.worker.command"), "creating a command");
        assert_eq!(field_needing_admin(Some(&image), &cmd), Some("spec.worker.command"), "adding one");
        assert_eq!(field_needing_admin(Some(&cmd), &other_cmd), Some("spec.worker.command"), "changing one");
        assert_eq!(field_needing_admin(Some(&cmd), &cmd_env), Some("spec.worker.env"), "its environment");
        assert_eq!(field_needing_admin(None, &pull_env), Some("spec.worker.env"), "no image: a process's env");
        assert_eq!(field_needing_admin(Some(&cmd), &cmd_v2), None, "other fields of an admin's command");
        assert_eq!(field_needing_admin(None, &image), None, "an image, env and all");
        assert_eq!(field_needing_admin(Some(&cmd), &image), None, "replacing a command by an image");
    }
}
