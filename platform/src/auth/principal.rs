//! The caller of a request and its permissions.

use layer_protocol::keys::{Entitlements, Scope};

use crate::error::PlatformError;

/// The claim prefix of keys minted for one Function's workers: `udf:<id>`.
pub const WORKER_CLAIM: &str = "udf:";

/// An authenticated key.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub entitlements: Entitlements,
}

fn pattern_matches(pattern: &str, namespace: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => namespace.starts_with(prefix),
        None => pattern == namespace,
    }
}

impl Principal {
    /// (scope, namespace restriction) of every grant over rows and the
    /// platform: `invoke`, and grants restricted to Functions
    /// (`functions`), reach calls alone (see [`Principal::require_call`]).
    fn grants(&self) -> impl Iterator<Item = (Scope, Option<&Vec<String>>)> {
        self.entitlements.values().filter(|e| e.functions.is_none()).flat_map(|e| {
            e.scopes.iter().flatten().filter(|s| **s != Scope::Invoke).map(move |s| (*s, e.namespaces.as_ref()))
        })
    }

    /// The key that makes no request: an anonymous call of a Function that
    /// allows them. It holds nothing.
    pub fn anonymous() -> Self {
        Principal { key_id: String::new(), entitlements: Default::default() }
    }

    pub fn is_anonymous(&self) -> bool {
        self.key_id.is_empty()
    }

    /// Checks that the key may call Function `udf_id`: the `invoke` scope
    /// (or `write`, or `admin`) on a grant without a namespace restriction,
    /// for every Function or for this one. A key whose grants name other
    /// Functions only is told there is no such Function (404); a key that
    /// may call none, that it lacks the scope (403).
    pub fn require_call(&self, udf_id: &str) -> Result<(), PlatformError> {
        let invokers = || {
            self.entitlements
                .values()
                .filter(|e| e.namespaces.is_none() && e.scopes.iter().flatten().any(|s| s.covers(Scope::Invoke)))
        };
        let allowed =
            invokers().any(|e| e.functions.as_ref().is_none_or(|list| list.iter().any(|p| pattern_matches(p, udf_id))));
        if allowed {
            Ok(())
        } else if invokers().next().is_some() {
            Err(PlatformError::NotFound(format!("function {udf_id} not found")))
        } else {
            Err(PlatformError::Forbidden(format!(
                "key {} lacks the invoke scope calling a Function needs",
                self.key_id
            )))
        }
    }

    /// Whether the key holds `needed` for the whole platform (no namespace
    /// restriction on the grant that gives it).
    pub fn require(&self, needed: Scope) -> Result<(), PlatformError> {
        if self.grants().any(|(s, ns)| s.covers(needed) && ns.is_none()) {
            Ok(())
        } else {
            Err(PlatformError::Forbidden(format!(
                "key {} lacks the {} scope this operation needs",
                self.key_id,
                scope_name(needed)
            )))
        }
    }

    /// Whether the key holds the admin scope for the whole platform.
    pub fn is_admin(&self) -> bool {
        self.require(Scope::Admin).is_ok()
    }

    /// Whether the key may see a namespace at all (any scope).
    pub fn can_see(&self, namespace: &str) -> bool {
        self.grants().any(|(_, ns)| ns.is_none_or(|list| list.iter().any(|p| pattern_matches(p, namespace))))
    }

    /// Checks access to one namespace. A namespace outside the key's
    /// restriction answers 404, as if it did not exist; a visible namespace
    /// without the needed scope answers 403.
    pub fn require_namespace(&self, namespace: &str, needed: Scope) -> Result<(), PlatformError> {
        let allowed = self.grants().any(|(s, ns)| {
            s.covers(needed) && ns.is_none_or(|list| list.iter().any(|p| pattern_matches(p, namespace)))
        });
        if allowed {
            Ok(())
        } else if self.can_see(namespace) {
            Err(PlatformError::Forbidden(format!(
                "key {} lacks the {} scope on namespace {namespace}",
                self.key_id,
                scope_name(needed)
            )))
        } else {
            Err(PlatformError::NotFound(format!("namespace {namespace} not found")))
        }
    }

    /// Whether the key was minted for the workers of Function `udf_id`
    /// (the claim `udf:<id>`): it may speak the pull protocol for it.
    pub fn works_for(&self, udf_id: &str) -> bool {
        self.worker_of() == Some(udf_id)
    }

    /// The Function a worker key was minted for.
    pub fn worker_of(&self) -> Option<&str> {
        self.entitlements.values().flat_map(|e| e.claims.iter().flatten()).find_map(|c| c.strip_prefix(WORKER_CLAIM))
    }

    /// Whether any entitlement carries a claim (`runner`).
    pub fn has_claim(&self, claim: &str) -> bool {
        self.entitlements.values().any(|e| e.claims.iter().flatten().any(|c| c == claim))
    }
}

fn scope_name(s: Scope) -> &'static str {
    s.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use layer_protocol::keys::Entitlement;

    fn principal(scopes: Vec<Scope>, namespaces: Option<Vec<&str>>) -> Principal {
        let e = Entitlement {
            scopes: Some(scopes),
            functions: None,
            namespaces: namespaces.map(|v| v.into_iter().map(String::from).collect()),
            claims: None,
        };
        Principal { key_id: "k".into(), entitlements: [("main".to_string(), e)].into() }
    }

    #[test]
    fn restricted_namespaces_are_invisible() {
        let p = principal(vec![Scope::Write], Some(vec!["shop", "logs-*"]));
        assert!(p.require_namespace("shop", Scope::Write).is_ok());
        assert!(p.require_namespace("logs-2026", Scope::Read).is_ok());
        assert!(matches!(p.require_namespace("other", Scope::Read), Err(PlatformError::NotFound(_))));
        assert!(matches!(p.require(Scope::Read), Err(PlatformError::Forbidden(_))));
    }

    #[test]
    fn read_only_cannot_write() {
        let p = principal(vec![Scope::Read], None);
        assert!(p.require_namespace("a", Scope::Read).is_ok());
        assert!(matches!(p.require_namespace("a", Scope::Write), Err(PlatformError::Forbidden(_))));
    }

    #[test]
    fn an_invoke_key_calls_its_functions_and_does_nothing_else() {
        let mut p = principal(vec![Scope::Invoke], None);
        p.entitlements.get_mut("main").unwrap().functions = Some(vec!["tag-products".into(), "echo-*".into()]);
        assert!(p.require_call("tag-products").is_ok());
        assert!(p.require_call("echo-v2").is_ok());
        assert!(matches!(p.require_call("other"), Err(PlatformError::NotFound(_))));
        assert!(matches!(p.require(Scope::Read), Err(PlatformError::Forbidden(_))));
        assert!(matches!(p.require_namespace("a", Scope::Read), Err(PlatformError::NotFound(_))));
        // Unrestricted, it calls any Function, and still reads nothing.
        let p = principal(vec![Scope::Invoke], None);
        assert!(p.require_call("anything").is_ok());
        assert!(matches!(p.require(Scope::Read), Err(PlatformError::Forbidden(_))));
        assert!(!p.can_see("a"), "an invoke key sees no namespace");
        // Write and admin keys may call; read keys may not.
        assert!(principal(vec![Scope::Write], None).require_call("x").is_ok());
        assert!(principal(vec![Scope::Admin], None).require_call("x").is_ok());
        assert!(matches!(principal(vec![Scope::Read], None).require_call("x"), Err(PlatformError::Forbidden(_))));
        assert!(Principal::anonymous().require_call("x").is_err());
    }

    #[test]
    fn admin_covers_everything() {
        let p = principal(vec![Scope::Admin], None);
        assert!(p.require(Scope::Admin).is_ok());
        assert!(p.require_namespace("x", Scope::Write).is_ok());
    }
}
