//! The `api_keys` table.

use chrono::{DateTime, Utc};
use layer_protocol::keys::{ApiKey, Entitlement, Entitlements, KeyPhase, MintKeyRequest, Scope, parse_expires_after};
use sqlx::PgPool;

use super::principal::Principal;
use super::token::{hash_token, hashes_match, mint_key_id, mint_token};
use crate::error::{PlatformError, Result};
use crate::time::rfc3339;

#[derive(sqlx::FromRow)]
struct KeyRow {
    key_id: String,
    name: String,
    owner: Option<String>,
    description: Option<String>,
    entitlements: sqlx::types::Json<Entitlements>,
    expires_after: Option<String>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    last_seen_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str =
    "key_id, name, owner, description, entitlements, expires_after, created_at, expires_at, revoked_at, last_seen_at";

impl KeyRow {
    fn into_api(self, now: DateTime<Utc>) -> ApiKey {
        let phase = if self.revoked_at.is_some() {
            KeyPhase::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            KeyPhase::Expired
        } else {
            KeyPhase::Active
        };
        ApiKey {
            key_id: self.key_id,
            name: self.name,
            owner: self.owner,
            description: self.description,
            entitlements: self.entitlements.0,
            expires_after: self.expires_after,
            phase,
            created_at: rfc3339(self.created_at),
            expires_at: self.expires_at.map(rfc3339),
            revoked_at: self.revoked_at.map(rfc3339),
            last_seen_at: self.last_seen_at.map(rfc3339),
        }
    }
}

/// The entitlements of the bootstrap admin key.
pub fn admin_entitlements() -> Entitlements {
    [(
        "admin".to_string(),
        Entitlement { scopes: Some(vec![Scope::Admin]), functions: None, namespaces: None, claims: None },
    )]
    .into()
}

/// Validates a mint request; a key without entitlements gets read-only access.
fn check_mint(req: &MintKeyRequest) -> Result<(Entitlements, Option<i64>)> {
    if req.name.trim().is_empty() || req.name.len() > 128 {
        return Err(PlatformError::invalid("name", "must be 1-128 characters"));
    }
    let entitlements = match &req.entitlements {
        Some(e) if !e.is_empty() => e.clone(),
        _ => [(
            "default".to_string(),
            Entitlement { scopes: Some(vec![Scope::Read]), functions: None, namespaces: None, claims: None },
        )]
        .into(),
    };
    for (name, e) in &entitlements {
        if e.scopes.as_ref().is_none_or(Vec::is_empty) && e.claims.as_ref().is_none_or(Vec::is_empty) {
            return Err(PlatformError::invalid(
                format!("entitlements.{name}"),
                "grants nothing: give scopes (read, write, admin, invoke) or claims",
            ));
        }
        if let Some(list) = &e.functions {
            if e.scopes.iter().flatten().any(|s| *s != Scope::Invoke) || e.namespaces.is_some() {
                return Err(PlatformError::invalid(
                    format!("entitlements.{name}.functions"),
                    "names the Functions an invoke grant may call: give it scopes [invoke] and no namespaces",
                ));
            }
            for (i, f) in list.iter().enumerate() {
                let bare = f.strip_suffix('*').unwrap_or(f);
                if !bare.is_empty()
                    && layer_protocol::validate::check_resource_name(bare.trim_end_matches('-')).is_err()
                {
                    return Err(PlatformError::invalid(
                        format!("entitlements.{name}.functions[{i}]"),
                        format!("\"{f}\" is not a Function name or prefix pattern (name*)"),
                    ));
                }
            }
        }
        if let Some(list) = &e.namespaces {
            for (i, ns) in list.iter().enumerate() {
                let bare = ns.strip_suffix('*').unwrap_or(ns);
                if !bare.is_empty() && layer_protocol::validate::check_namespace_name(bare).is_err() {
                    return Err(PlatformError::invalid(
                        format!("entitlements.{name}.namespaces[{i}]"),
                        format!("\"{ns}\" is not a namespace name or prefix pattern (name*)"),
                    ));
                }
            }
        }
    }
    let ttl = parse_expires_after(req.expires_after.as_deref().unwrap_or("365d"))
        .map_err(|m| PlatformError::invalid("expiresAfter", m))?;
    Ok((entitlements, ttl))
}

/// Mints a key and returns it with its token (shown this once).
pub async fn mint(pool: &PgPool, req: &MintKeyRequest) -> Result<(ApiKey, String)> {
    let (entitlements, ttl) = check_mint(req)?;
    let token = mint_token();
    let key = insert(pool, req, &entitlements, ttl, &token).await?;
    Ok((key, token))
}

async fn insert(
    pool: &PgPool,
    req: &MintKeyRequest,
    entitlements: &Entitlements,
    ttl_seconds: Option<i64>,
    token: &str,
) -> Result<ApiKey> {
    let row: KeyRow = sqlx::query_as(&format!(
        "INSERT INTO api_keys (key_id, name, owner, description, entitlements, token_hash, expires_after, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
         RETURNING {COLUMNS}"
    ))
    .bind(mint_key_id())
    .bind(&req.name)
    .bind(&req.owner)
    .bind(&req.description)
    .bind(sqlx::types::Json(entitlements))
    .bind(hash_token(token))
    .bind(req.expires_after.clone().or(Some("365d".into())))
    .bind(ttl_seconds.map(|s| s as f64))
    .fetch_one(pool)
    .await?;
    Ok(row.into_api(Utc::now()))
}

/// The key `layer dev` gives its local runner: the `runner` claim only,
/// a day long, replacing the one an earlier start made.
pub async fn mint_local_runner_key(pool: &PgPool) -> Result<String> {
    const NAME: &str = "layer dev runner";
    sqlx::query("DELETE FROM api_keys WHERE name = $1").bind(NAME).execute(pool).await?;
    let entitlement = layer_protocol::keys::Entitlement {
        scopes: Some(vec![layer_protocol::keys::Scope::Read]),
        functions: None,
        namespaces: None,
        claims: Some(vec!["runner".into()]),
    };
    let req = MintKeyRequest {
        name: NAME.into(),
        owner: None,
        description: Some("minted by layer dev for its local runner".into()),
        entitlements: Some([("runner".to_string(), entitlement)].into()),
        expires_after: Some("1d".into()),
    };
    Ok(mint(pool, &req).await?.1)
}

/// On a database with no keys, installs the bootstrap admin key: `token`
/// when given (`LAYER_API_KEY`), else a fresh one, which is returned so the
/// caller can show it once. Runs under an advisory lock so replicas that
/// start together install one key.
pub async fn bootstrap_admin(pool: &PgPool, token: Option<&str>) -> Result<Option<String>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(crate::db::BOOTSTRAP_LOCK).execute(&mut *tx).await?;
    let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)").fetch_one(&mut *tx).await?;
    if any {
        return Ok(None);
    }
    let (token, minted) = match token {
        Some(t) if t.len() >= 16 => (t.to_string(), false),
        Some(_) => {
            return Err(PlatformError::Setup(
                "LAYER_API_KEY is shorter than 16 characters; use a long random secret".into(),
            ));
        }
        None => (mint_token(), true),
    };
    sqlx::query(
        "INSERT INTO api_keys (key_id, name, description, entitlements, token_hash, expires_after)
         VALUES ($1, 'bootstrap-admin', 'created at first start', $2, $3, 'never')",
    )
    .bind(mint_key_id())
    .bind(sqlx::types::Json(admin_entitlements()))
    .bind(hash_token(&token))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(minted, "installed the bootstrap admin key");
    Ok(minted.then_some(token))
}

#[derive(sqlx::FromRow)]
struct AuthRow {
    key_id: String,
    entitlements: sqlx::types::Json<Entitlements>,
    token_hash: Vec<u8>,
    revoked_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    last_seen_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
}

/// Resolves a bearer token to a principal: 401 when unknown, 403 when
/// revoked or expired.
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Principal> {
    authenticate_for(pool, token).await.map(|(p, _)| p)
}

/// [`authenticate`], with the key's expiry for [`KeyCache`].
async fn authenticate_for(pool: &PgPool, token: &str) -> Result<(Principal, Option<DateTime<Utc>>)> {
    let hash = hash_token(token);
    let row: Option<AuthRow> = sqlx::query_as(
        "SELECT key_id, entitlements, token_hash, revoked_at, expires_at, last_seen_at, now() AS now
         FROM api_keys WHERE token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(pool)
    .await?;
    let Some(AuthRow { key_id, entitlements, token_hash: stored, revoked_at, expires_at, last_seen_at, now }) = row
    else {
        return Err(PlatformError::Unauthorized("invalid API key".into()));
    };
    if !hashes_match(&stored, &hash) {
        return Err(PlatformError::Unauthorized("invalid API key".into()));
    }
    if revoked_at.is_some() {
        return Err(PlatformError::Forbidden(format!("key {key_id} has been revoked")));
    }
    if let Some(exp) = expires_at
        && exp <= now
    {
        return Err(PlatformError::Forbidden(format!("key {key_id} expired at {}", rfc3339(exp))));
    }
    if last_seen_at.is_none_or(|t| (now - t).num_seconds() >= 60) {
        sqlx::query("UPDATE api_keys SET last_seen_at = now() WHERE key_id = $1").bind(&key_id).execute(pool).await?;
    }
    Ok((Principal { key_id, entitlements: entitlements.0 }, expires_at))
}

/// Keys this replica checked within the last second, by the hash of their
/// token, so a caller making many requests costs one lookup a second, not
/// one a request. Revoking or deleting a key here forgets them all; on
/// another replica the key is refused at most [`KeyCache::FOR`] later. An
/// expiry is checked on every use.
#[derive(Default)]
pub struct KeyCache {
    keys: std::sync::Mutex<std::collections::HashMap<Vec<u8>, CachedKey>>,
}

/// A checked key, its expiry, and when it was checked.
type CachedKey = (Principal, Option<DateTime<Utc>>, std::time::Instant);

impl KeyCache {
    pub const FOR: std::time::Duration = std::time::Duration::from_secs(1);

    pub async fn authenticate(&self, pool: &PgPool, token: &str) -> Result<Principal> {
        let hash = hash_token(token);
        let hit = self.keys.lock().unwrap_or_else(|e| e.into_inner()).get(&hash).cloned();
        if let Some((p, expires_at, at)) = hit
            && at.elapsed() < Self::FOR
        {
            if let Some(exp) = expires_at
                && exp <= Utc::now()
            {
                return Err(PlatformError::Forbidden(format!("key {} expired at {}", p.key_id, rfc3339(exp))));
            }
            return Ok(p);
        }
        let (p, expires_at) = authenticate_for(pool, token).await?;
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: past a few thousand keys in a second, start over.
        if keys.len() > 10_000 {
            keys.clear();
        }
        keys.insert(hash, (p.clone(), expires_at, std::time::Instant::now()));
        Ok(p)
    }

    /// Forgets every key (one was revoked or deleted).
    pub fn forget(&self) {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

pub async fn list(pool: &PgPool, include_revoked: bool) -> Result<Vec<ApiKey>> {
    let rows: Vec<KeyRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys WHERE $1 OR revoked_at IS NULL ORDER BY created_at, key_id"
    ))
    .bind(include_revoked)
    .fetch_all(pool)
    .await?;
    let now = Utc::now();
    Ok(rows.into_iter().map(|r| r.into_api(now)).collect())
}

pub async fn get(pool: &PgPool, key_id: &str) -> Result<ApiKey> {
    let row: Option<KeyRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_keys WHERE key_id = $1"))
        .bind(key_id)
        .fetch_optional(pool)
        .await?;
    row.map(|r| r.into_api(Utc::now())).ok_or_else(|| PlatformError::NotFound(format!("key {key_id} not found")))
}

/// Revokes a key; revoking twice keeps the first time.
/// An active key with the admin scope, in SQL over `api_keys k`.
const ACTIVE_ADMIN: &str = "k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
     AND EXISTS (SELECT 1 FROM jsonb_each(k.entitlements) e WHERE e.value -> 'scopes' ? 'admin')";

/// Refuses to take away the last active admin key (`what` it would do):
/// no key could then mint, revoke or manage anything, and only the
/// database could let anyone back in. Holds the admin keys' lock until
/// `tx` ends, so two admins revoking each other cannot both succeed.
async fn keep_an_admin(tx: &mut sqlx::PgConnection, key_id: &str, what: &str) -> Result<()> {
    let last: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM api_keys k WHERE k.key_id = $1 AND {ACTIVE_ADMIN})
            AND NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.key_id <> $1 AND {ACTIVE_ADMIN})
         FROM (SELECT pg_advisory_xact_lock(hashtextextended('layer.admin_keys', 0))) l"
    ))
    .bind(key_id)
    .fetch_one(&mut *tx)
    .await?;
    if last {
        return Err(PlatformError::Conflict(format!(
            "key {key_id} is the last active admin key: {what} it would lock every admin out; mint another \
             admin key first (`layer keys create NAME --scope admin`)"
        )));
    }
    Ok(())
}

pub async fn revoke(pool: &PgPool, key_id: &str) -> Result<ApiKey> {
    let mut tx = pool.begin().await?;
    keep_an_admin(&mut tx, key_id, "revoking").await?;
    let row: Option<KeyRow> = sqlx::query_as(&format!(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 RETURNING {COLUMNS}"
    ))
    .bind(key_id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    row.map(|r| r.into_api(Utc::now())).ok_or_else(|| PlatformError::NotFound(format!("key {key_id} not found")))
}

pub async fn delete(pool: &PgPool, key_id: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    keep_an_admin(&mut tx, key_id, "deleting").await?;
    let n = sqlx::query("DELETE FROM api_keys WHERE key_id = $1").bind(key_id).execute(&mut *tx).await?.rows_affected();
    tx.commit().await?;
    if n == 0 {
        return Err(PlatformError::NotFound(format!("key {key_id} not found")));
    }
    Ok(())
}

/// A key minted for one Function's workers on one runner.
pub struct WorkerKey {
    pub key_id: String,
    pub token: String,
    pub namespaces: Vec<String>,
}

/// Mints the key a runner hands one Function's workers as
/// `LAYER_GATEWAY_API_KEY`, replacing the one it had for them: the pull
/// protocol for that Function alone (the claim `udf:<id>`), and read and
/// write on its namespaces (its `targetNamespaces` and the Indexes its
/// `indexSelector` matches now). It never expires on its own: it is
/// deleted with the Function and with the runner, and replaced when the
/// runner asks again (a new revision, a restart).
pub async fn mint_worker_key(
    pool: &PgPool,
    runner_id: &str,
    runner_name: &str,
    udf: &layer_protocol::function::Udf,
) -> Result<WorkerKey> {
    let mut namespaces = udf.spec.target_namespaces.clone();
    for ns in crate::functions::store::active_namespaces(pool, &udf.spec).await? {
        if !namespaces.contains(&ns) {
            namespaces.push(ns);
        }
    }
    namespaces.sort();
    let entitlement = Entitlement {
        scopes: Some(vec![Scope::Write]),
        functions: None,
        namespaces: Some(namespaces.clone()),
        claims: Some(vec![format!("{}{}", super::principal::WORKER_CLAIM, udf.id)]),
    };
    let token = mint_token();
    let key_id = mint_key_id();
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM api_keys WHERE worker_runner_id = $1 AND worker_function_id = $2")
        .bind(runner_id)
        .bind(&udf.id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO api_keys (key_id, name, description, entitlements, token_hash, expires_after,
                               worker_function_id, worker_runner_id)
         VALUES ($1, $2, $3, $4, $5, 'never', $6, $7)",
    )
    .bind(&key_id)
    .bind(format!("worker {} on {runner_name}", udf.id))
    .bind(format!("minted for the workers of Function {} at revision {} on runner {runner_id}", udf.id, udf.revision))
    .bind(sqlx::types::Json(Entitlements::from([("worker".to_string(), entitlement)])))
    .bind(hash_token(&token))
    .bind(&udf.id)
    .bind(runner_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(WorkerKey { key_id, token, namespaces })
}

/// Deletes the worker keys of a runner (it deregistered).
pub async fn delete_worker_keys(pool: &PgPool, runner_id: &str) -> Result<u64> {
    Ok(sqlx::query("DELETE FROM api_keys WHERE worker_runner_id = $1")
        .bind(runner_id)
        .execute(pool)
        .await?
        .rows_affected())
}
