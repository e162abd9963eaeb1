//! Turns a write request into a checked plan before any SQL runs: ids
//! normalised, reserved attributes refused, columns zipped into rows,
//! duplicate ids resolved (last wins). Every error names its path.

use std::collections::HashMap;

use layer_protocol::filter::Filter;
use layer_protocol::namespace::{Attributes, WriteRequest};
use layer_protocol::validate::check_attribute_name;
use serde_json::{Map, Value};

use crate::error::{PlatformError, Result};

/// The largest number of rows one write may touch.
pub const MAX_ROWS_PER_WRITE: usize = 100_000;

/// A row to insert or replace.
#[derive(Debug, Clone, PartialEq)]
pub struct UpsertRow {
    pub id: String,
    pub attributes: Attributes,
    /// A PostgreSQL array literal (`{0.1,0.2}`), bound as text and cast.
    pub vector: Option<String>,
}

/// A merge into an existing row.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchRow {
    pub id: String,
    pub set: Attributes,
    pub unset: Vec<String>,
    /// `Some(None)` clears the vector, `Some(Some(..))` replaces it.
    pub vector: Option<Option<String>>,
}

#[derive(Debug, Default)]
pub struct WritePlan {
    pub deletes: Vec<String>,
    pub upserts: Vec<UpsertRow>,
    pub patches: Vec<PatchRow>,
    pub delete_filter: Option<Filter>,
}

impl WritePlan {
    pub fn is_empty(&self) -> bool {
        self.deletes.is_empty() && self.upserts.is_empty() && self.patches.is_empty() && self.delete_filter.is_none()
    }
}

/// Ids may be strings or integers; both are stored as strings.
pub fn normalize_id(v: &Value, path: &str) -> Result<String> {
    match v {
        Value::String(s) if !s.is_empty() && s.len() <= 512 => Ok(s.clone()),
        Value::String(_) => Err(PlatformError::invalid(path, "ids must be 1-512 bytes")),
        Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
        other => Err(PlatformError::invalid(
            path,
            format!("an id must be a string or an integer, got {}", layer_protocol::validate::type_name(other)),
        )),
    }
}

/// What a vector's values must be: numbers that stay finite as the 32-bit
/// floats the `real[]` column stores.
pub const VECTOR_VALUES: &str = "a vector holds numbers within the 32-bit float range only";

/// A vector as a PostgreSQL `real[]` literal, bound as text and cast. `Err`
/// is the index of the first value that is not a number or does not fit a
/// 32-bit float (`1e39` would become infinity).
pub fn real_array_literal(values: impl IntoIterator<Item = Option<f64>>) -> Result<String, usize> {
    let mut out = String::from("{");
    for (i, x) in values.into_iter().enumerate() {
        let Some(f) = x.map(|f| f as f32).filter(|f| f.is_finite()) else {
            return Err(i);
        };
        if i > 0 {
            out.push(',');
        }
        out.push_str(&f.to_string());
    }
    out.push('}');
    Ok(out)
}

fn vector_literal(v: &Value, path: &str) -> Result<String> {
    let Value::Array(items) = v else {
        return Err(PlatformError::invalid(path, "a vector must be a list of numbers"));
    };
    real_array_literal(items.iter().map(Value::as_f64))
        .map_err(|i| PlatformError::invalid(format!("{path}[{i}]"), VECTOR_VALUES))
}

fn check_attr(name: &str, path: &str) -> Result<()> {
    check_attribute_name(name).map_err(|m| PlatformError::invalid(path, m))
}

/// One row object taken apart.
struct SplitRow {
    id: String,
    attributes: Attributes,
    /// Attributes set to `null` (a patch removes them).
    unset: Vec<String>,
    /// `Some(None)`: the vector was `null`.
    vector: Option<Option<String>>,
}

/// Splits one row object into id, attributes and vector.
fn split_row(mut obj: Attributes, path: &str, patch: bool) -> Result<SplitRow> {
    let id = match obj.remove("id") {
        Some(v) => normalize_id(&v, &format!("{path}.id"))?,
        None => return Err(PlatformError::invalid(format!("{path}.id"), "required")),
    };
    let vector = match obj.remove("vector") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => Some(Some(vector_literal(&v, &format!("{path}.vector"))?)),
    };
    let mut attrs = Map::with_capacity(obj.len());
    let mut unset = Vec::new();
    for (k, v) in obj {
        check_attr(&k, &format!("{path}.{k}"))?;
        if v.is_null() {
            if patch {
                unset.push(k);
            }
        } else {
            attrs.insert(k, v);
        }
    }
    Ok(SplitRow { id, attributes: attrs, unset, vector })
}

/// Zips `{"id": [...], "attr": [...]}` into row objects.
fn columns_to_rows(cols: Map<String, Value>, path: &str) -> Result<Vec<Attributes>> {
    let Some(Value::Array(ids)) = cols.get("id") else {
        return Err(PlatformError::invalid(format!("{path}.id"), "required: a list of ids"));
    };
    let n = ids.len();
    let mut rows: Vec<Attributes> = (0..n).map(|_| Map::new()).collect();
    for (name, values) in cols {
        let Value::Array(values) = values else {
            return Err(PlatformError::invalid(format!("{path}.{name}"), "each column must be a list"));
        };
        if values.len() != n {
            return Err(PlatformError::invalid(
                format!("{path}.{name}"),
                format!("has {} values for {n} ids", values.len()),
            ));
        }
        for (row, v) in rows.iter_mut().zip(values) {
            row.insert(name.clone(), v);
        }
    }
    Ok(rows)
}

/// Builds the plan for one write request.
pub fn plan(req: WriteRequest) -> Result<WritePlan> {
    let mut plan = WritePlan::default();
    if let Some(m) = &req.distance_metric
        && !layer_protocol::resource::DISTANCE_METRICS.contains(&m.as_str())
    {
        return Err(PlatformError::invalid(
            "distance_metric",
            format!("\"{m}\" is not supported; allowed: {}", layer_protocol::resource::DISTANCE_METRICS.join(", ")),
        ));
    }
    if let Some(f) = &req.delete_by_filter {
        plan.delete_filter =
            Filter::parse(f, "delete_by_filter").map_err(|e| PlatformError::invalid(e.path, e.message))?;
        if plan.delete_filter.is_none() {
            return Err(PlatformError::invalid(
                "delete_by_filter",
                "an empty filter would delete every row; use DELETE /v2/namespaces/{ns} for that",
            ));
        }
    }
    for (i, id) in req.deletes.iter().flatten().enumerate() {
        plan.deletes.push(normalize_id(id, &format!("deletes[{i}]"))?);
    }

    let mut upsert_objs: Vec<(String, Attributes)> = Vec::new();
    for (i, row) in req.upsert_rows.into_iter().flatten().enumerate() {
        upsert_objs.push((format!("upsert_rows[{i}]"), row));
    }
    if let Some(cols) = req.upsert_columns {
        for (i, row) in columns_to_rows(cols, "upsert_columns")?.into_iter().enumerate() {
            upsert_objs.push((format!("upsert_columns[{i}]"), row));
        }
    }
    let mut patch_objs: Vec<(String, Attributes)> = Vec::new();
    for (i, row) in req.patch_rows.into_iter().flatten().enumerate() {
        patch_objs.push((format!("patch_rows[{i}]"), row));
    }
    if let Some(cols) = req.patch_columns {
        for (i, row) in columns_to_rows(cols, "patch_columns")?.into_iter().enumerate() {
            patch_objs.push((format!("patch_columns[{i}]"), row));
        }
    }
    let total = plan.deletes.len() + upsert_objs.len() + patch_objs.len();
    if total > MAX_ROWS_PER_WRITE {
        return Err(PlatformError::invalid(
            "",
            format!("a write may touch at most {MAX_ROWS_PER_WRITE} rows; got {total}"),
        ));
    }

    let mut seen: HashMap<String, usize> = HashMap::with_capacity(upsert_objs.len());
    for (path, obj) in upsert_objs {
        let SplitRow { id, attributes, vector, .. } = split_row(obj, &path, false)?;
        let row = UpsertRow { id: id.clone(), attributes, vector: vector.flatten() };
        match seen.get(&id) {
            Some(&at) => plan.upserts[at] = row,
            None => {
                seen.insert(id, plan.upserts.len());
                plan.upserts.push(row);
            }
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(patch_objs.len());
    for (path, obj) in patch_objs {
        let SplitRow { id, attributes: set, unset, vector } = split_row(obj, &path, true)?;
        match seen.get(&id) {
            Some(&at) => {
                // Two patches of one row in one write compose in order.
                let p = &mut plan.patches[at];
                for k in &unset {
                    p.set.remove(k);
                }
                p.unset.retain(|k| !set.contains_key(k));
                p.unset.extend(unset);
                p.set.extend(set);
                if vector.is_some() {
                    p.vector = vector;
                }
            }
            None => {
                seen.insert(id.clone(), plan.patches.len());
                plan.patches.push(PatchRow { id, set, unset, vector });
            }
        }
    }
    if plan.is_empty() && req.distance_metric.is_none() {
        return Err(PlatformError::invalid(
            "",
            "the write is empty: give upsert_rows, upsert_columns, patch_rows, patch_columns, deletes or delete_by_filter",
        ));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: Value) -> WriteRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn columns_zip_into_rows_and_duplicates_keep_the_last() {
        let p = plan(req(json!({
            "upsert_columns": {"id": [1, "b", 1], "title": ["x", "y", "z"], "vector": [[1, 2], null, [3, 4]]}
        })))
        .unwrap();
        assert_eq!(p.upserts.len(), 2);
        assert_eq!(p.upserts[0].id, "1");
        assert_eq!(p.upserts[0].attributes["title"], "z");
        assert_eq!(p.upserts[0].vector.as_deref(), Some("{3,4}"));
        assert_eq!(p.upserts[1].vector, None);
    }

    #[test]
    fn patches_split_set_and_unset() {
        let p = plan(req(json!({"patch_columns": {"id": ["a"], "x": [1], "y": [null]}}))).unwrap();
        assert_eq!(p.patches[0].set, json!({"x": 1}).as_object().unwrap().clone());
        assert_eq!(p.patches[0].unset, vec!["y".to_string()]);
    }

    #[test]
    fn errors_name_their_path() {
        let e = plan(req(json!({"upsert_rows": [{"id": "a"}, {"id": "b", "_hevlayer_udf_x_v": "v1"}]}))).unwrap_err();
        assert!(e.to_string().starts_with("upsert_rows[1]._hevlayer_udf_x_v: "), "{e}");
        let e = plan(req(json!({"upsert_columns": {"id": ["a", "b"], "t": ["x"]}}))).unwrap_err();
        assert_eq!(e.to_string(), "upsert_columns.t: has 1 values for 2 ids");
        let e = plan(req(json!({"upsert_rows": [{"id": 1.5}]}))).unwrap_err();
        assert!(e.to_string().starts_with("upsert_rows[0].id: an id must be"), "{e}");
        let e = plan(req(json!({"upsert_rows": [{"id": "a", "vector": [1, "x"]}]}))).unwrap_err();
        assert_eq!(e.to_string(), format!("upsert_rows[0].vector[1]: {VECTOR_VALUES}"));
        let e = plan(req(json!({"upsert_rows": [{"id": "a", "vector": [1, 1e39]}]}))).unwrap_err();
        assert_eq!(e.to_string(), format!("upsert_rows[0].vector[1]: {VECTOR_VALUES}"), "overflows a 32-bit float");
        assert!(plan(req(json!({}))).is_err());
        assert!(plan(req(json!({"delete_by_filter": []}))).is_err());
    }
}
