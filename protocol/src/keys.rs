//! API keys: `/v2/keys`, in the client's camelCase models.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a key may do. `admin` implies `write`, which implies `read` and
/// `invoke`; `invoke` (calling Functions over HTTP) implies nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
    Invoke,
}

impl Scope {
    /// Whether holding `self` is enough for an operation that needs `needed`.
    pub fn covers(self, needed: Scope) -> bool {
        match (self, needed) {
            (Scope::Admin, _) => true,
            (Scope::Write, Scope::Read | Scope::Write | Scope::Invoke) => true,
            (s, n) => s == n,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
            Scope::Invoke => "invoke",
        }
    }
}

/// The claim a runner's key carries (the push-dispatch issues use it).
pub const RUNNER_CLAIM: &str = "runner";

/// One named grant of a key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Entitlement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<Scope>>,
    /// When present, the grant applies only to these namespaces (an entry
    /// ending in `*` matches a prefix); other namespaces answer 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    /// When present, the grant applies only to calls of these Functions
    /// (an entry ending in `*` matches a prefix), and to nothing else;
    /// other Functions answer 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<Vec<String>>,
}

pub type Entitlements = BTreeMap<String, Entitlement>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum KeyPhase {
    Pending,
    Active,
    Revoked,
    Expired,
}

/// A key as listed; never carries the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    pub key_id: String,
    pub name: String,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::HashMap<String, Entitlement>))]
    pub entitlements: Entitlements,
    #[serde(default)]
    pub expires_after: Option<String>,
    pub phase: KeyPhase,
    pub created_at: String,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub revoked_at: Option<String>,
    #[serde(default)]
    pub last_seen_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiKeyList {
    pub keys: Vec<ApiKey>,
}

/// `POST /v2/keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MintKeyRequest {
    pub name: String,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<std::collections::HashMap<String, Entitlement>>))]
    pub entitlements: Option<Entitlements>,
    /// `30d`, `12h`, `90m`, `3600s`, or `never`. Defaults to `365d`.
    #[serde(default)]
    pub expires_after: Option<String>,
}

/// The answer to a mint: the key and, this once, its secret token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct MintKeyResponse {
    #[serde(flatten)]
    pub key: ApiKey,
    pub token: String,
}

/// Parses a key lifetime (`365d`, `12h`, `30m`, `45s`, `never`) into seconds;
/// `None` means it never expires.
pub fn parse_expires_after(s: &str) -> Result<Option<i64>, String> {
    let s = s.trim();
    if s == "never" {
        return Ok(None);
    }
    let bad = || format!("\"{s}\" is not a lifetime: use a number followed by d, h, m or s (\"365d\"), or \"never\"");
    // The unit is the last character, whatever its width in bytes.
    let at = s.char_indices().last().map(|(i, _)| i).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(at);
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let mult = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(bad()),
    };
    if n <= 0 || n > 36_500 * 86_400 / mult {
        return Err(bad());
    }
    Ok(Some(n * mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest() {
        assert!(Scope::Admin.covers(Scope::Write));
        assert!(Scope::Write.covers(Scope::Read));
        assert!(!Scope::Read.covers(Scope::Write));
    }

    #[test]
    fn lifetimes() {
        assert_eq!(parse_expires_after("365d").unwrap(), Some(365 * 86_400));
        assert_eq!(parse_expires_after("2h").unwrap(), Some(7_200));
        assert_eq!(parse_expires_after("never").unwrap(), None);
        assert!(parse_expires_after("5y").is_err());
        assert!(parse_expires_after("").is_err());
        assert!(parse_expires_after("-3d").is_err());
        // Found by fuzzing: a last character wider than one byte once
        // split the string inside it and panicked.
        for s in ["\u{80}", "5é", "3日", "😀"] {
            assert!(parse_expires_after(s).unwrap_err().contains("is not a lifetime"), "{s}");
        }
    }
}
