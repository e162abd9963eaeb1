//! Path-aware field checks. Resources are validated from a JSON value (YAML is
//! converted first) so that every problem names the exact field path the user
//! wrote, in the spelling they wrote it in: camelCase for resource documents,
//! snake_case for the REST API.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::FieldProblem;

/// Which spelling a document uses for multi-word field names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// Resource documents (`batchSize`), as in seed 000's YAML.
    Camel,
    /// The REST API (`batch_size`), as the `hevlayer` client sends it.
    Snake,
}

/// A field known in both spellings.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub camel: &'static str,
    pub snake: &'static str,
}

/// Declares a field by its two spellings.
pub const fn field(camel: &'static str, snake: &'static str) -> Field {
    Field { camel, snake }
}

impl Field {
    pub fn name(&self, case: Case) -> &'static str {
        match case {
            Case::Camel => self.camel,
            Case::Snake => self.snake,
        }
    }
}

/// Collects every problem found, so one answer lists them all.
#[derive(Debug, Default)]
pub struct Problems {
    list: Vec<FieldProblem>,
}

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(FieldProblem { field: field.into(), message: message.into() });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// `Ok(value)` when nothing was found wrong.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<FieldProblem>> {
        if self.list.is_empty() { Ok(value) } else { Err(self.list) }
    }

    pub fn into_vec(self) -> Vec<FieldProblem> {
        self.list
    }
}

/// `parent.child`, or `child` at the root.
pub fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() { child.to_string() } else { format!("{parent}.{child}") }
}

/// `parent[index]`.
pub fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// A JSON type name for messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// What a string holding a NUL byte is told: PostgreSQL stores no NUL in
/// text or jsonb, so such a value is refused up front, never a 500 later.
pub const NUL_MESSAGE: &str = "strings may not hold NUL (\\u0000) bytes";

/// The path of the first string (or object key) inside `v` that holds a
/// NUL byte, `root` naming `v` itself.
pub fn nul_byte_path(v: &Value, root: &str) -> Option<String> {
    match v {
        Value::String(s) => s.contains('\0').then(|| root.to_string()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, x)| nul_byte_path(x, &index(root, i))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(join(root, &k.replace('\0', "\\u0000")))
            } else {
                nul_byte_path(x, &join(root, k))
            }
        }),
        _ => None,
    }
}

/// The closest allowed spelling to an unknown key, if one is close enough to
/// be a likely typo or a snake/camel mix-up.
pub fn suggest<'a>(unknown: &str, allowed: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let squash = |s: &str| s.replace(['_', '-'], "").to_ascii_lowercase();
    let wanted = squash(unknown);
    let mut best: Option<(&str, usize)> = None;
    for candidate in allowed {
        if squash(candidate) == wanted {
            return Some(candidate);
        }
        let d = strsim::osa_distance(&unknown.to_ascii_lowercase(), &candidate.to_ascii_lowercase());
        let limit = (candidate.len() / 3).clamp(1, 3);
        if d <= limit && best.is_none_or(|(_, bd)| d < bd) {
            best = Some((candidate, d));
        }
    }
    best.map(|(c, _)| c)
}

/// An object being validated, with its path and spelling.
#[derive(Debug, Clone)]
pub struct Obj<'a> {
    pub path: String,
    pub map: &'a Map<String, Value>,
    pub case: Case,
}

impl<'a> Obj<'a> {
    /// Checks that `value` is an object whose keys are all among `fields`
    /// (plus `extra`, keys spelled the same in both cases). Returns `None`
    /// when it is not an object.
    pub fn open(
        problems: &mut Problems,
        path: &str,
        value: &'a Value,
        case: Case,
        fields: &[Field],
    ) -> Option<Obj<'a>> {
        let Value::Object(map) = value else {
            problems.push(path, format!("expected an object, got {}", type_name(value)));
            return None;
        };
        for key in map.keys() {
            if fields.iter().any(|f| f.name(case) == key) {
                continue;
            }
            let names = fields.iter().map(|f| f.name(case));
            let message = match suggest(key, names.clone()) {
                Some(s) => format!("unknown field, did you mean {s}"),
                None => {
                    let all: Vec<&str> = names.collect();
                    format!("unknown field; allowed: {}", all.join(", "))
                }
            };
            problems.push(join(path, key), message);
        }
        Some(Obj { path: path.to_string(), map, case })
    }

    pub fn path_of(&self, f: Field) -> String {
        join(&self.path, f.name(self.case))
    }

    /// The value of a field; an explicit `null` counts as absent.
    pub fn get(&self, f: Field) -> Option<&'a Value> {
        self.map.get(f.name(self.case)).filter(|v| !v.is_null())
    }

    pub fn string(&self, p: &mut Problems, f: Field, required: bool) -> Option<String> {
        match self.get(f) {
            None => {
                if required {
                    p.push(self.path_of(f), "required");
                }
                None
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                p.push(self.path_of(f), "must not be empty");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                p.push(self.path_of(f), format!("expected a string, got {}", type_name(other)));
                None
            }
        }
    }

    pub fn int(&self, p: &mut Problems, f: Field, min: i64, max: i64) -> Option<i64> {
        let v = self.get(f)?;
        match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                p.push(self.path_of(f), format!("{n} is out of range; allowed {min}..={max}"));
                None
            }
            None => {
                p.push(self.path_of(f), format!("expected an integer, got {}", describe(v)));
                None
            }
        }
    }

    pub fn boolean(&self, p: &mut Problems, f: Field) -> Option<bool> {
        match self.get(f)? {
            Value::Bool(b) => Some(*b),
            other => {
                p.push(self.path_of(f), format!("expected true or false, got {}", describe(other)));
                None
            }
        }
    }

    pub fn one_of(&self, p: &mut Problems, f: Field, allowed: &[&str]) -> Option<String> {
        let s = self.string(p, f, false)?;
        if allowed.contains(&s.as_str()) {
            Some(s)
        } else {
            p.push(self.path_of(f), format!("\"{s}\" is not allowed; allowed: {}", allowed.join(", ")));
            None
        }
    }

    pub fn string_list(&self, p: &mut Problems, f: Field) -> Option<Vec<String>> {
        let v = self.get(f)?;
        let path = self.path_of(f);
        let Value::Array(items) = v else {
            p.push(path, format!("expected a list of strings, got {}", type_name(v)));
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) if !s.is_empty() => out.push(s.clone()),
                Value::String(_) => p.push(index(&path, i), "must not be empty"),
                other => p.push(index(&path, i), format!("expected a string, got {}", type_name(other))),
            }
        }
        Some(out)
    }

    pub fn string_map(&self, p: &mut Problems, f: Field) -> Option<BTreeMap<String, String>> {
        let v = self.get(f)?;
        string_map_at(p, &self.path_of(f), v)
    }
}

/// A map of strings to strings (labels, node selectors).
pub fn string_map_at(p: &mut Problems, path: &str, v: &Value) -> Option<BTreeMap<String, String>> {
    let Value::Object(map) = v else {
        p.push(path, format!("expected a map of strings, got {}", type_name(v)));
        return None;
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        match v {
            Value::String(s) => {
                out.insert(k.clone(), s.clone());
            }
            other => p.push(join(path, k), format!("expected a string, got {}", describe(other))),
        }
    }
    Some(out)
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => type_name(other).to_string(),
    }
}

/// Row-store namespace names: 1-128 of `[A-Za-z0-9-_.]`, as Turbopuffer allows.
pub fn check_namespace_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!("\"{name}\" is not a valid namespace name: use 1-128 letters, digits, '-', '_' or '.'"))
    }
}

/// Resource names (`metadata.name`): a DNS label, as Kubernetes requires.
pub fn check_resource_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not a valid name: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        ))
    }
}

/// Attribute names users may read or write.
pub fn check_attribute_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("attribute names must not be empty".into());
    }
    if name.len() > 128 {
        return Err(format!("attribute name \"{name}\" is longer than 128 bytes"));
    }
    if name.starts_with(crate::RESERVED_PREFIX) {
        return Err(format!(
            "\"{name}\" uses the reserved {} prefix, which belongs to the platform's completion markers",
            crate::RESERVED_PREFIX
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn suggests_camel_for_lowercase_and_snake() {
        let names = ["batchSize", "timeoutSeconds", "image"];
        assert_eq!(suggest("batchsize", names), Some("batchSize"));
        assert_eq!(suggest("batch_size", names), Some("batchSize"));
        assert_eq!(suggest("imgae", names), Some("image"));
        assert_eq!(suggest("replicas", names), None);
    }

    #[test]
    fn unknown_key_names_path_and_suggestion() {
        let mut p = Problems::new();
        let v = json!({"batchsize": 3});
        Obj::open(&mut p, "spec.worker", &v, Case::Camel, &[field("batchSize", "batch_size")]);
        let list = p.into_vec();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].to_string(), "spec.worker.batchsize: unknown field, did you mean batchSize");
    }

    #[test]
    fn names() {
        assert!(check_resource_name("tag-products").is_ok());
        assert!(check_resource_name("Tag").is_err());
        assert!(check_resource_name("-a").is_err());
        assert!(check_namespace_name("amazon-products.v2_x").is_ok());
        assert!(check_namespace_name("a/b").is_err());
        assert!(check_attribute_name("_hevlayer_udf_x_v").is_err());
    }
}
