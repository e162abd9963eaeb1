//! The Turbopuffer array-form filter language.
//!
//! A filter is `[attr, Op, value]`, or `["And", [f, ...]]`, `["Or", [f, ...]]`,
//! `["Not", f]`. Parsing checks every operator and operand shape up front so an
//! unknown operator is a 400 at apply (or query) time, never a SQL error later.
//! The platform compiles the AST to parameterised SQL; attribute names and
//! values are always bound, never spliced.

use serde_json::Value;

use crate::validate::{index, type_name};

/// Nesting deeper than this is refused (it is never needed, and bounds recursion).
pub const MAX_DEPTH: usize = 32;
/// More leaf conditions than this are refused.
pub const MAX_CONDITIONS: usize = 1024;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Eq,
    NotEq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    NotIn,
    Contains,
    NotContains,
    ContainsAny,
    NotContainsAny,
    AnyLt,
    AnyLte,
    AnyGt,
    AnyGte,
    Glob,
    NotGlob,
    IGlob,
    NotIGlob,
    Regex,
}

impl Op {
    pub const ALL: [Op; 21] = [
        Op::Eq,
        Op::NotEq,
        Op::Lt,
        Op::Lte,
        Op::Gt,
        Op::Gte,
        Op::In,
        Op::NotIn,
        Op::Contains,
        Op::NotContains,
        Op::ContainsAny,
        Op::NotContainsAny,
        Op::AnyLt,
        Op::AnyLte,
        Op::AnyGt,
        Op::AnyGte,
        Op::Glob,
        Op::NotGlob,
        Op::IGlob,
        Op::NotIGlob,
        Op::Regex,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Eq => "Eq",
            Op::NotEq => "NotEq",
            Op::Lt => "Lt",
            Op::Lte => "Lte",
            Op::Gt => "Gt",
            Op::Gte => "Gte",
            Op::In => "In",
            Op::NotIn => "NotIn",
            Op::Contains => "Contains",
            Op::NotContains => "NotContains",
            Op::ContainsAny => "ContainsAny",
            Op::NotContainsAny => "NotContainsAny",
            Op::AnyLt => "AnyLt",
            Op::AnyLte => "AnyLte",
            Op::AnyGt => "AnyGt",
            Op::AnyGte => "AnyGte",
            Op::Glob => "Glob",
            Op::NotGlob => "NotGlob",
            Op::IGlob => "IGlob",
            Op::NotIGlob => "NotIGlob",
            Op::Regex => "Regex",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == s)
    }

    /// What shape of operand the operator takes.
    fn operand(self) -> Operand {
        match self {
            Op::Eq | Op::NotEq | Op::Contains | Op::NotContains => Operand::Any,
            Op::Lt | Op::Lte | Op::Gt | Op::Gte | Op::AnyLt | Op::AnyLte | Op::AnyGt | Op::AnyGte => Operand::Ordered,
            Op::In | Op::NotIn | Op::ContainsAny | Op::NotContainsAny => Operand::List,
            Op::Glob | Op::NotGlob | Op::IGlob | Op::NotIGlob | Op::Regex => Operand::Pattern,
        }
    }
}

enum Operand {
    Any,
    Ordered,
    List,
    Pattern,
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Cmp { attr: String, op: Op, value: Value },
}

/// Why a filter could not be parsed: the path inside the filter and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FilterError {
    pub path: String,
    pub message: String,
}

impl Filter {
    /// Parses a filter. `root` is the path of the filter itself in the request
    /// (`filters`, `spec.filter`), used in error messages. `null` and `[]`
    /// mean "no filter" and give `Ok(None)`.
    pub fn parse(value: &Value, root: &str) -> Result<Option<Filter>, FilterError> {
        match value {
            Value::Null => Ok(None),
            Value::Array(a) if a.is_empty() => Ok(None),
            _ => {
                let mut count = 0;
                parse_node(value, root, 0, &mut count).map(Some)
            }
        }
    }

    /// Every attribute the filter reads.
    pub fn attributes(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.walk_attrs(&mut out);
        out
    }

    fn walk_attrs<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Filter::And(v) | Filter::Or(v) => v.iter().for_each(|f| f.walk_attrs(out)),
            Filter::Not(f) => f.walk_attrs(out),
            Filter::Cmp { attr, .. } => out.push(attr),
        }
    }
}

fn err(path: &str, message: impl Into<String>) -> FilterError {
    FilterError { path: path.to_string(), message: message.into() }
}

fn parse_node(v: &Value, path: &str, depth: usize, count: &mut usize) -> Result<Filter, FilterError> {
    if depth > MAX_DEPTH {
        return Err(err(path, format!("filter is nested deeper than {MAX_DEPTH} levels")));
    }
    let Value::Array(items) = v else {
        return Err(err(path, format!("expected a filter array like [\"attr\", \"Eq\", value], got {}", type_name(v))));
    };
    let head = items.first().and_then(Value::as_str);
    match (head, items.len()) {
        (Some(kind @ ("And" | "Or")), 2) => {
            let sub_path = index(path, 1);
            let Value::Array(subs) = &items[1] else {
                return Err(err(&sub_path, format!("{kind} takes a list of filters, got {}", type_name(&items[1]))));
            };
            let parsed = subs
                .iter()
                .enumerate()
                .map(|(i, s)| parse_node(s, &index(&sub_path, i), depth + 1, count))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if kind == "And" { Filter::And(parsed) } else { Filter::Or(parsed) })
        }
        (Some("Not"), 2) => Ok(Filter::Not(Box::new(parse_node(&items[1], &index(path, 1), depth + 1, count)?))),
        (Some("And" | "Or" | "Not"), n) => {
            Err(err(path, format!("{} takes exactly one operand, got {}", head.unwrap_or_default(), n - 1)))
        }
        (_, 3) => {
            let Value::String(attr) = &items[0] else {
                return Err(err(
                    &index(path, 0),
                    format!("attribute name must be a string, got {}", type_name(&items[0])),
                ));
            };
            if attr.is_empty() || attr.len() > 128 {
                return Err(err(&index(path, 0), "attribute name must be 1-128 bytes"));
            }
            if attr.contains('\0') {
                return Err(err(&index(path, 0), crate::validate::NUL_MESSAGE));
            }
            let op_path = index(path, 1);
            let Value::String(op_name) = &items[1] else {
                return Err(err(&op_path, format!("operator must be a string, got {}", type_name(&items[1]))));
            };
            let Some(op) = Op::parse(op_name) else {
                let names: Vec<&str> = Op::ALL.iter().map(|o| o.name()).collect();
                let hint = spelled_out(op_name)
                    .or_else(|| crate::validate::suggest(op_name, names.iter().copied()))
                    .map(|s| format!(" (did you mean {s}?)"))
                    .unwrap_or_default();
                return Err(err(
                    &op_path,
                    format!(
                        "unknown filter operator \"{op_name}\"{hint}; supported: {}, And, Or, Not",
                        names.join(", ")
                    ),
                ));
            };
            *count += 1;
            if *count > MAX_CONDITIONS {
                return Err(err(path, format!("filter has more than {MAX_CONDITIONS} conditions")));
            }
            let value = items[2].clone();
            check_operand(op, &value, &index(path, 2))?;
            if let Some(at) = crate::validate::nul_byte_path(&value, &index(path, 2)) {
                return Err(err(&at, crate::validate::NUL_MESSAGE));
            }
            Ok(Filter::Cmp { attr: attr.clone(), op, value })
        }
        _ => Err(err(path, "expected [attr, Op, value], [\"And\", [...]], [\"Or\", [...]] or [\"Not\", filter]")),
    }
}

fn check_operand(op: Op, value: &Value, path: &str) -> Result<(), FilterError> {
    match op.operand() {
        Operand::Any => Ok(()),
        Operand::Ordered => match value {
            Value::Number(_) | Value::String(_) => Ok(()),
            other => Err(err(path, format!("{} compares numbers or strings, got {}", op.name(), type_name(other)))),
        },
        Operand::List => match value {
            Value::Array(_) => Ok(()),
            other => Err(err(path, format!("{} takes a list of values, got {}", op.name(), type_name(other)))),
        },
        Operand::Pattern => match value {
            Value::String(s) if op == Op::Regex => check_regex(s).map_err(|m| err(path, m)),
            Value::String(_) => Ok(()),
            other => Err(err(path, format!("{} takes a pattern string, got {}", op.name(), type_name(other)))),
        },
    }
}

/// A cheap sanity check of a regular expression: balanced groups and classes
/// and no dangling escape. PostgreSQL has the final word; its rejection is
/// also reported as a 400.
fn check_regex(s: &str) -> Result<(), String> {
    let mut depth: i32 = 0;
    let mut in_class = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.next().is_none() => {
                return Err("regular expression ends with a lone backslash".into());
            }
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            '(' if !in_class => depth += 1,
            ')' if !in_class => {
                depth -= 1;
                if depth < 0 {
                    return Err("regular expression has an unmatched ')'".into());
                }
            }
            _ => {}
        }
    }
    if in_class {
        return Err("regular expression has an unclosed '['".into());
    }
    if depth != 0 {
        return Err("regular expression has an unclosed '('".into());
    }
    Ok(())
}

/// Translates a glob (`*`, `?`, `[abc]`, `[!abc]`, `\` escapes) into an
/// anchored POSIX regular expression with every other character escaped.
pub fn glob_to_regex(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() * 2 + 2);
    out.push('^');
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '\\' => match chars.next() {
                Some(n) => push_escaped(&mut out, n),
                None => push_escaped(&mut out, '\\'),
            },
            '[' => {
                // Copy a character class through, if it is closed.
                let rest: String = chars.clone().collect();
                if let Some(end) = rest.find(']').filter(|&e| e > 0 || rest.len() > 1) {
                    let body: String = rest[..end].to_string();
                    if body.is_empty() {
                        push_escaped(&mut out, '[');
                        continue;
                    }
                    out.push('[');
                    let mut body_chars = body.chars();
                    let first = body_chars.clone().next();
                    if first == Some('!') || first == Some('^') {
                        out.push('^');
                        body_chars.next();
                    }
                    for bc in body_chars {
                        if bc == '\\' || bc == '[' || bc == ']' {
                            out.push('\\');
                        }
                        out.push(bc);
                    }
                    out.push(']');
                    for _ in 0..=body.chars().count() {
                        chars.next();
                    }
                } else {
                    push_escaped(&mut out, '[');
                }
            }
            other => push_escaped(&mut out, other),
        }
    }
    out.push('$');
    out
}

fn push_escaped(out: &mut String, c: char) {
    if "\\.^$|?*+()[]{}".contains(c) {
        out.push('\\');
    }
    out.push(c);
}

/// The operator meant by a spelled-out name (`Equals`, `GreaterThan`,
/// `not_equal`, `>=`), which spelling distance alone would not find.
fn spelled_out(name: &str) -> Option<&'static str> {
    let squashed: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || "<>=!".contains(*c)).collect();
    Some(match squashed.to_ascii_lowercase().as_str() {
        "equals" | "equal" | "equalto" | "is" | "=" | "==" => "Eq",
        "notequals" | "notequal" | "notequalto" | "isnot" | "ne" | "neq" | "!=" | "<>" => "NotEq",
        "lessthan" | "less" | "below" | "<" => "Lt",
        "lessthanorequal" | "lessthanorequals" | "lessorequal" | "le" | "lte" | "atmost" | "<=" => "Lte",
        "greaterthan" | "greater" | "above" | ">" => "Gt",
        "greaterthanorequal" | "greaterthanorequals" | "greaterorequal" | "ge" | "atleast" | ">=" => "Gte",
        "oneof" | "anyof" | "isin" => "In",
        "notoneof" | "noneof" | "notanyof" => "NotIn",
        "matches" | "like" => "Glob",
        "ilike" => "IGlob",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Option<Filter>, FilterError> {
        Filter::parse(&v, "filters")
    }

    #[test]
    fn parses_every_operator() {
        for op in Op::ALL {
            let value = match op.operand() {
                Operand::Any => json!("x"),
                Operand::Ordered => json!(3),
                Operand::List => json!([1, 2]),
                Operand::Pattern => json!("a*"),
            };
            let f = parse(json!(["a", op.name(), value])).unwrap().unwrap();
            assert!(matches!(f, Filter::Cmp { op: o, .. } if o == op), "{op:?}");
        }
    }

    #[test]
    fn nested_boolean_structure() {
        let f = parse(json!(["And", [["a", "Eq", 1], ["Or", [["b", "In", [1, 2]], ["Not", ["c", "Glob", "x*"]]]]]]))
            .unwrap()
            .unwrap();
        assert_eq!(f.attributes(), vec!["a", "b", "c"]);
    }

    #[test]
    fn unknown_operator_is_named_with_path() {
        let e = parse(json!(["And", [["a", "Eq", 1], ["b", "Equals", 2]]])).unwrap_err();
        assert_eq!(e.path, "filters[1][1][1]");
        assert!(e.message.contains("unknown filter operator \"Equals\" (did you mean Eq?)"), "{}", e.message);
        for (written, meant) in
            [("eq", "Eq"), ("GreaterThan", "Gt"), ("not_equal", "NotEq"), (">=", "Gte"), ("Contain", "Contains")]
        {
            let e = parse(json!(["a", written, 1])).unwrap_err();
            assert!(e.message.contains(&format!("(did you mean {meant}?)")), "{written}: {}", e.message);
        }
        let e = parse(json!(["a", "Frobnicate", 1])).unwrap_err();
        assert!(!e.message.contains("did you mean"), "{}", e.message);
    }

    #[test]
    fn operand_shapes_are_checked() {
        assert!(parse(json!(["a", "In", 3])).unwrap_err().message.contains("list"));
        assert!(parse(json!(["a", "Lt", [1]])).unwrap_err().message.contains("numbers or strings"));
        assert!(parse(json!(["a", "Glob", 1])).unwrap_err().message.contains("pattern"));
        assert!(parse(json!(["a", "Regex", "(a"])).unwrap_err().message.contains("unclosed"));
        assert!(parse(json!(["And", ["a", "Eq", 1]])).is_err());
        assert!(parse(json!(["a", "Eq"])).is_err());
        assert!(parse(json!({"a": 1})).is_err());
        assert_eq!(parse(json!([])).unwrap(), None);
        assert_eq!(parse(Value::Null).unwrap(), None);
    }

    #[test]
    fn nul_bytes_are_refused_with_their_path() {
        let e = parse(json!(["And", [["a", "Eq", 1], ["b", "In", ["x", "y\u{0}z"]]]])).unwrap_err();
        assert_eq!(e.path, "filters[1][1][2][1]");
        assert!(e.message.contains("NUL"), "{}", e.message);
        let e = parse(json!(["a\u{0}", "Eq", 1])).unwrap_err();
        assert_eq!(e.path, "filters[0]");
        let e = parse(json!(["a", "Eq", {"k\u{0}": 1}])).unwrap_err();
        assert_eq!(e.path, "filters[2].k\\u0000", "{}", e.message);
    }

    #[test]
    fn depth_is_bounded() {
        let mut v = json!(["a", "Eq", 1]);
        for _ in 0..40 {
            v = json!(["Not", v]);
        }
        assert!(parse(v).unwrap_err().message.contains("nested deeper"));
    }

    #[test]
    fn glob_translation() {
        assert_eq!(glob_to_regex("foo*"), "^foo.*$");
        assert_eq!(glob_to_regex("a?c"), "^a.c$");
        assert_eq!(glob_to_regex("a.b"), "^a\\.b$");
        assert_eq!(glob_to_regex("[ab]x"), "^[ab]x$");
        assert_eq!(glob_to_regex("[!ab]x"), "^[^ab]x$");
        assert_eq!(glob_to_regex("x[y"), "^x\\[y$");
        assert_eq!(glob_to_regex("\\*"), "^\\*$");
        assert_eq!(glob_to_regex("(a|b)"), "^\\(a\\|b\\)$");
    }
}
