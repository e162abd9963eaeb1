//! Compiles a parsed filter to parameterised SQL over `rows` (aliased `r`).
//!
//! Attribute names and values are always bound parameters, never spliced, so
//! no filter can change the shape of the statement. Every leaf is wrapped in
//! `coalesce(…, false)`, so `Not` and the negated operators see plain
//! booleans: a missing attribute never equals anything and is "not equal" to
//! everything.

use layer_protocol::filter::{Filter, Op, glob_to_regex};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder};

/// Appends `(<filter>)` to the query.
pub fn push_filter(qb: &mut QueryBuilder<'_, Postgres>, f: &Filter) {
    match f {
        Filter::And(parts) | Filter::Or(parts) if parts.is_empty() => {
            qb.push(if matches!(f, Filter::And(_)) { "true" } else { "false" });
        }
        Filter::And(parts) | Filter::Or(parts) => {
            let joiner = if matches!(f, Filter::And(_)) { " AND " } else { " OR " };
            qb.push("(");
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    qb.push(joiner);
                }
                push_filter(qb, p);
            }
            qb.push(")");
        }
        Filter::Not(inner) => {
            qb.push("(NOT ");
            push_filter(qb, inner);
            qb.push(")");
        }
        Filter::Cmp { attr, op, value } => {
            qb.push("coalesce((");
            push_comparison(qb, attr, *op, value);
            qb.push("), false)");
        }
    }
}

/// The jsonb value of an attribute (`id` is the row id, as a JSON string).
pub(super) fn push_attr(qb: &mut QueryBuilder<'_, Postgres>, attr: &str) {
    if attr == "id" {
        qb.push("to_jsonb(r.id)");
    } else {
        qb.push("(r.attributes -> ");
        qb.push_bind(attr.to_string());
        qb.push("::text)");
    }
}

fn push_json(qb: &mut QueryBuilder<'_, Postgres>, v: &Value) {
    qb.push_bind(Json(v.clone()));
    qb.push("::jsonb");
}

/// Ids are stored as strings; a numeric id in a filter means the same id.
fn id_value(attr: &str, v: &Value) -> Value {
    if attr != "id" {
        return v.clone();
    }
    match v {
        Value::Number(n) => Value::String(n.to_string()),
        Value::Array(items) => Value::Array(items.iter().map(|i| id_value(attr, i)).collect()),
        other => other.clone(),
    }
}

fn push_comparison(qb: &mut QueryBuilder<'_, Postgres>, attr: &str, op: Op, raw: &Value) {
    let value = id_value(attr, raw);
    let v = &value;
    match op {
        Op::Eq | Op::NotEq => {
            if op == Op::NotEq {
                qb.push("NOT coalesce(");
            }
            if v.is_null() {
                push_attr(qb, attr);
                qb.push(" IS NULL OR ");
                push_attr(qb, attr);
                qb.push(" = 'null'::jsonb");
            } else {
                push_attr(qb, attr);
                qb.push(" = ");
                push_json(qb, v);
            }
            if op == Op::NotEq {
                qb.push(", false)");
            }
        }
        Op::Lt | Op::Lte | Op::Gt | Op::Gte => {
            qb.push("jsonb_typeof(");
            push_attr(qb, attr);
            qb.push(") = jsonb_typeof(");
            push_json(qb, v);
            qb.push(") AND ");
            push_attr(qb, attr);
            qb.push(sql_op(op));
            push_json(qb, v);
        }
        Op::AnyLt | Op::AnyLte | Op::AnyGt | Op::AnyGte => {
            qb.push("jsonb_typeof(");
            push_attr(qb, attr);
            qb.push(") = 'array' AND EXISTS (SELECT 1 FROM jsonb_array_elements(");
            push_attr(qb, attr);
            qb.push(") AS e(v) WHERE jsonb_typeof(e.v) = jsonb_typeof(");
            push_json(qb, v);
            qb.push(") AND e.v");
            qb.push(sql_op(op));
            push_json(qb, v);
            qb.push(")");
        }
        Op::In | Op::NotIn => {
            if op == Op::NotIn {
                qb.push("NOT coalesce(");
            }
            push_attr(qb, attr);
            qb.push(" IN (SELECT jsonb_array_elements(");
            push_json(qb, v);
            qb.push("))");
            if op == Op::NotIn {
                qb.push(", false)");
            }
        }
        Op::Contains | Op::NotContains => {
            if op == Op::NotContains {
                qb.push("NOT coalesce(");
            }
            qb.push("jsonb_typeof(");
            push_attr(qb, attr);
            qb.push(") = 'array' AND ");
            push_attr(qb, attr);
            qb.push(" @> jsonb_build_array(");
            push_json(qb, v);
            qb.push(")");
            if op == Op::NotContains {
                qb.push(", false)");
            }
        }
        Op::ContainsAny | Op::NotContainsAny => {
            if op == Op::NotContainsAny {
                qb.push("NOT coalesce(");
            }
            qb.push("jsonb_typeof(");
            push_attr(qb, attr);
            qb.push(") = 'array' AND EXISTS (SELECT 1 FROM jsonb_array_elements(");
            push_json(qb, v);
            qb.push(") AS e(v) WHERE ");
            push_attr(qb, attr);
            qb.push(" @> jsonb_build_array(e.v))");
            if op == Op::NotContainsAny {
                qb.push(", false)");
            }
        }
        Op::Glob | Op::NotGlob | Op::IGlob | Op::NotIGlob | Op::Regex => {
            let pattern = v.as_str().unwrap_or_default();
            let (regex, case_insensitive, negate) = match op {
                Op::Glob => (glob_to_regex(pattern), false, false),
                Op::NotGlob => (glob_to_regex(pattern), false, true),
                Op::IGlob => (glob_to_regex(pattern), true, false),
                Op::NotIGlob => (glob_to_regex(pattern), true, true),
                _ => (pattern.to_string(), false, false),
            };
            if negate {
                qb.push("NOT coalesce(");
            }
            qb.push("jsonb_typeof(");
            push_attr(qb, attr);
            qb.push(") = 'string' AND (");
            push_attr(qb, attr);
            qb.push(" #>> '{}')");
            qb.push(if case_insensitive { " ~* " } else { " ~ " });
            qb.push_bind(regex);
            qb.push("::text");
            if negate {
                qb.push(", false)");
            }
        }
    }
}

fn sql_op(op: Op) -> &'static str {
    match op {
        Op::Lt | Op::AnyLt => " < ",
        Op::Lte | Op::AnyLte => " <= ",
        Op::Gt | Op::AnyGt => " > ",
        _ => " >= ",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sql(v: Value) -> String {
        let f = Filter::parse(&v, "filters").unwrap().unwrap();
        let mut qb = QueryBuilder::<Postgres>::new("");
        push_filter(&mut qb, &f);
        qb.sql().to_string()
    }

    #[test]
    fn names_and_values_are_bound_never_spliced() {
        let evil = "x'; DROP TABLE rows; --";
        let s = sql(json!(["And", [[evil, "Eq", evil], [evil, "Glob", evil], [evil, "In", [evil]]]]));
        assert!(!s.contains("DROP"), "{s}");
        assert!(s.contains("$1") && s.contains("$6"), "{s}");
    }

    #[test]
    fn id_compares_the_id_column() {
        let s = sql(json!(["id", "Eq", 5]));
        assert!(s.contains("to_jsonb(r.id) = $1::jsonb"), "{s}");
    }
}
