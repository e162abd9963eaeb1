//! Resource documents: `Function`, `Index` and `InfraRules`, apiVersion
//! `hevlayer.com/v1alpha1`, in YAML or JSON, one or many per file.
//!
//! `layer apply` sends the documents as JSON to `POST /v2/apply`; the platform
//! validates them with [`validate_document`] and answers with every problem,
//! each naming its field path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::FieldProblem;
use crate::function::{FunctionSpec, validate_spec};
use crate::validate::{
    Case, Field, Obj, Problems, check_namespace_name, check_resource_name, field, index, join, string_map_at,
};

/// The resource kinds this platform understands.
pub const KINDS: [&str; 3] = ["Function", "Index", "InfraRules"];

/// Resource metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    /// The Kubernetes namespace the resource belongs to (default `layer`).
    /// Not a row-store namespace.
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A validated resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Function { metadata: Metadata, spec: Box<FunctionSpec>, paused: Option<bool> },
    Index { metadata: Metadata, spec: IndexSpec },
    InfraRules { metadata: Metadata, spec: InfraRulesSpec },
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Function { .. } => "Function",
            Resource::Index { .. } => "Index",
            Resource::InfraRules { .. } => "InfraRules",
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Function { metadata, .. }
            | Resource::Index { metadata, .. }
            | Resource::InfraRules { metadata, .. } => metadata,
        }
    }
}

/// An `Index`: a row-store namespace (`metadata.name`) and the labels that
/// `indexSelector` matches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IndexSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_metric: Option<String>,
}

/// `InfraRules`: compute pools.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InfraRulesSpec {
    pub compute_pools: Vec<ComputePool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ComputePool {
    pub name: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_workload: Option<u32>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub resources: PoolResources,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Toleration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
}

/// Requests and limits, as Kubernetes quantities (`4Gi`, `"1"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolResources {
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
}

/// Why a file could not be read as resource documents.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("the file holds no documents")]
    Empty,
}

/// YAML is read with the YAML 1.2 core schema: only `true`/`false` (`True`,
/// `TRUE`, ...) are booleans, so an input, a filter value or a label spelt
/// `y`, `n`, `yes`, `no`, `on` or `off` stays the string it is; `1_000` is a
/// string too. (The YAML 1.1 rules, serde-saphyr's default, would turn `n`
/// into `false`.)
fn yaml_core_schema() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        underscored_numbers_as_strings: true,
        legacy_octal_numbers: false,
    }
}

fn parse_yaml(text: &str) -> Result<Vec<Value>, ParseError> {
    serde_saphyr::from_multiple_with_options(text, yaml_core_schema()).map_err(|e| ParseError::Syntax(e.to_string()))
}

/// Splits a YAML or JSON file into documents (YAML `---` separators; a JSON
/// array, or a `{"items": [...]}` list, counts as several).
pub fn parse_documents(text: &str) -> Result<Vec<Value>, ParseError> {
    let trimmed = text.trim_start();
    let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => vec![v],
            Err(_) => parse_yaml(text)?,
        }
    } else {
        parse_yaml(text)?
    };
    let mut out = Vec::new();
    for d in docs {
        match d {
            Value::Null => {}
            Value::Array(items) => out.extend(items),
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                if let Some(Value::Array(items)) = m.get("items") {
                    out.extend(items.iter().cloned());
                }
            }
            other => out.push(other),
        }
    }
    if out.is_empty() {
        return Err(ParseError::Empty);
    }
    Ok(out)
}

const TOP_FIELDS: &[Field] = &[
    field("apiVersion", "apiVersion"),
    field("kind", "kind"),
    field("metadata", "metadata"),
    field("spec", "spec"),
    field("status", "status"),
];
const META_FIELDS: &[Field] = &[
    field("name", "name"),
    field("namespace", "namespace"),
    field("labels", "labels"),
    field("annotations", "annotations"),
];
const INDEX_FIELDS: &[Field] = &[field("distanceMetric", "distance_metric")];
const INFRA_FIELDS: &[Field] = &[field("computePools", "compute_pools")];
const POOL_FIELDS: &[Field] = &[
    field("name", "name"),
    field("kind", "kind"),
    field("maxReplicasPerWorkload", "max_replicas_per_workload"),
    field("nodeSelector", "node_selector"),
    field("tolerations", "tolerations"),
    field("resources", "resources"),
];
const TOLERATION_FIELDS: &[Field] = &[
    field("key", "key"),
    field("operator", "operator"),
    field("value", "value"),
    field("effect", "effect"),
    field("tolerationSeconds", "toleration_seconds"),
];
const RESOURCES_FIELDS: &[Field] = &[field("requests", "requests"), field("limits", "limits")];

/// The metric names a namespace may use.
pub const DISTANCE_METRICS: [&str; 2] = ["cosine_distance", "euclidean_squared"];

/// Validates one resource document. `Err` lists every problem, each with the
/// field path inside the document.
pub fn validate_document(doc: &Value) -> Result<Resource, Vec<FieldProblem>> {
    let mut p = Problems::new();
    let Some(top) = Obj::open(&mut p, "", doc, Case::Camel, TOP_FIELDS) else {
        return Err(p.into_vec());
    };
    match top.string(&mut p, TOP_FIELDS[0], true) {
        Some(v) if v != crate::API_VERSION => {
            p.push("apiVersion", format!("\"{v}\" is not supported; use {}", crate::API_VERSION))
        }
        _ => {}
    }
    let kind = top.string(&mut p, TOP_FIELDS[1], true);
    if let Some(k) = &kind
        && !KINDS.contains(&k.as_str())
    {
        let hint = crate::validate::suggest(k, KINDS).map(|s| format!(" (did you mean {s}?)")).unwrap_or_default();
        p.push("kind", format!("\"{k}\" is not a known kind{hint}; allowed: {}", KINDS.join(", ")));
    }
    let metadata = match top.get(TOP_FIELDS[2]) {
        Some(m) => metadata(&mut p, m, kind.as_deref() == Some("Index")),
        None => {
            p.push("metadata", "required");
            None
        }
    };
    let spec = top.get(TOP_FIELDS[3]);
    let resource = match kind.as_deref() {
        Some("Function") => match spec {
            Some(s) => {
                validate_spec(&mut p, "spec", s, Case::Camel).map(|v| (v.spec, v.paused)).and_then(|(spec, paused)| {
                    Some(Resource::Function { metadata: metadata.clone()?, spec: Box::new(spec), paused })
                })
            }
            None => {
                p.push("spec", "required");
                None
            }
        },
        Some("Index") => {
            index_spec(&mut p, spec).and_then(|spec| Some(Resource::Index { metadata: metadata.clone()?, spec }))
        }
        Some("InfraRules") => match spec {
            Some(s) => {
                infra_spec(&mut p, s).and_then(|spec| Some(Resource::InfraRules { metadata: metadata.clone()?, spec }))
            }
            None => {
                p.push("spec", "required");
                None
            }
        },
        _ => None,
    };
    match resource {
        Some(r) if p.is_empty() => Ok(r),
        _ => {
            let list = p.into_vec();
            debug_assert!(!list.is_empty());
            Err(list)
        }
    }
}

fn metadata(p: &mut Problems, v: &Value, is_index: bool) -> Option<Metadata> {
    let o = Obj::open(p, "metadata", v, Case::Camel, META_FIELDS)?;
    let name = o.string(p, META_FIELDS[0], true);
    if let Some(n) = &name {
        // An Index names a row-store namespace, which allows more characters.
        let check = if is_index { check_namespace_name(n) } else { check_resource_name(n) };
        if let Err(m) = check {
            p.push("metadata.name", m);
        }
    }
    let namespace = o.string(p, META_FIELDS[1], false).unwrap_or_else(|| "layer".into());
    if let Err(m) = check_resource_name(&namespace) {
        p.push("metadata.namespace", m);
    }
    let labels = o.string_map(p, META_FIELDS[2]).unwrap_or_default();
    let annotations = o.string_map(p, META_FIELDS[3]).unwrap_or_default();
    Some(Metadata { name: name?, namespace, labels, annotations })
}

fn index_spec(p: &mut Problems, spec: Option<&Value>) -> Option<IndexSpec> {
    let Some(v) = spec else {
        return Some(IndexSpec::default());
    };
    let o = Obj::open(p, "spec", v, Case::Camel, INDEX_FIELDS)?;
    Some(IndexSpec { distance_metric: o.one_of(p, INDEX_FIELDS[0], &DISTANCE_METRICS) })
}

/// Validates an `InfraRules` spec (camelCase, as in a resource file).
pub fn infra_spec(p: &mut Problems, v: &Value) -> Option<InfraRulesSpec> {
    let o = Obj::open(p, "spec", v, Case::Camel, INFRA_FIELDS)?;
    let path = o.path_of(INFRA_FIELDS[0]);
    let Some(list) = o.get(INFRA_FIELDS[0]) else {
        p.push(path, "required");
        return None;
    };
    let Value::Array(items) = list else {
        p.push(path, "expected a list of compute pools");
        return None;
    };
    let mut pools: Vec<ComputePool> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ipath = index(&path, i);
        let Some(po) = Obj::open(p, &ipath, item, Case::Camel, POOL_FIELDS) else {
            continue;
        };
        let name = po.string(p, POOL_FIELDS[0], true);
        if let Some(n) = &name {
            if let Err(m) = check_resource_name(n) {
                p.push(po.path_of(POOL_FIELDS[0]), m);
            }
            if pools.iter().any(|x| &x.name == n) {
                p.push(po.path_of(POOL_FIELDS[0]), format!("pool \"{n}\" is defined twice"));
            }
        }
        let kind = po.one_of(p, POOL_FIELDS[1], &["cpu", "gpu"]);
        if po.get(POOL_FIELDS[1]).is_none() {
            p.push(po.path_of(POOL_FIELDS[1]), "required (cpu or gpu)");
        }
        let max = po.int(p, POOL_FIELDS[2], 1, 10_000).map(|n| n as u32);
        let node_selector = po.string_map(p, POOL_FIELDS[3]).unwrap_or_default();
        let mut tolerations = Vec::new();
        if let Some(tv) = po.get(POOL_FIELDS[4]) {
            let tpath = po.path_of(POOL_FIELDS[4]);
            match tv {
                Value::Array(ts) => {
                    for (j, t) in ts.iter().enumerate() {
                        let Some(to) = Obj::open(p, &index(&tpath, j), t, Case::Camel, TOLERATION_FIELDS) else {
                            continue;
                        };
                        let key = to.string(p, TOLERATION_FIELDS[0], false);
                        let operator =
                            to.one_of(p, TOLERATION_FIELDS[1], &["Equal", "Exists"]).unwrap_or_else(|| "Equal".into());
                        let value = to.string(p, TOLERATION_FIELDS[2], false);
                        let effect =
                            to.one_of(p, TOLERATION_FIELDS[3], &["NoSchedule", "PreferNoSchedule", "NoExecute"]);
                        to.int(p, TOLERATION_FIELDS[4], 0, i64::MAX);
                        if operator == "Exists" && value.is_some() {
                            p.push(to.path_of(TOLERATION_FIELDS[2]), "operator Exists takes no value");
                        }
                        tolerations.push(Toleration { key, operator, value, effect });
                    }
                }
                _ => p.push(tpath, "expected a list of tolerations"),
            }
        }
        let mut resources = PoolResources::default();
        if let Some(rv) = po.get(POOL_FIELDS[5])
            && let Some(ro) = Obj::open(p, &po.path_of(POOL_FIELDS[5]), rv, Case::Camel, RESOURCES_FIELDS)
        {
            resources.requests = quantities(p, &ro, RESOURCES_FIELDS[0]);
            resources.limits = quantities(p, &ro, RESOURCES_FIELDS[1]);
        }
        if let (Some(name), Some(kind)) = (name, kind) {
            pools.push(ComputePool {
                name,
                kind,
                max_replicas_per_workload: max,
                node_selector,
                tolerations,
                resources,
            });
        }
    }
    Some(InfraRulesSpec { compute_pools: pools })
}

/// Kubernetes quantities may be written as strings or bare numbers.
fn quantities(p: &mut Problems, o: &Obj<'_>, f: Field) -> BTreeMap<String, String> {
    let Some(v) = o.get(f) else {
        return BTreeMap::new();
    };
    let path = o.path_of(f);
    let Value::Object(map) = v else {
        p.push(path, "expected a map of resource quantities");
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for (k, q) in map {
        match q {
            Value::String(s) => {
                out.insert(k.clone(), s.clone());
            }
            Value::Number(n) => {
                out.insert(k.clone(), n.to_string());
            }
            _ => p.push(join(&path, k), "expected a quantity like \"4Gi\" or \"1\""),
        }
    }
    let _ = string_map_at;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_TAG_PRODUCTS: &str = r#"
apiVersion: hevlayer.com/v1alpha1
kind: Function
metadata:
  name: tag-products
  namespace: layer
spec:
  targetNamespaces:
    - products
  inputs:
    - id
    - title
  version: v1
  filter:
    - category
    - Eq
    - outdoor
  worker:
    image: ghcr.io/hev/tag-products:latest
    dispatch: pull
    computeClass: cpu
    batchSize: 32
    timeoutSeconds: 30
  schedule:
    discoveryIntervalSeconds: 300
    leaseSeconds: 120
    maxInFlightBatches: 8
    maxConcurrentScans: 1
  retry:
    maxAttempts: 8
    initialBackoffSeconds: 5
    maxBackoffSeconds: 300
  triggers:
    - discovery
  scaling:
    pool: cpu
    mode: autoscale
    replicas:
      min: 0
      max: 6
"#;

    #[test]
    fn seed_function_validates() {
        let docs = parse_documents(SEED_TAG_PRODUCTS).unwrap();
        let r = validate_document(&docs[0]).unwrap();
        let Resource::Function { metadata, spec, .. } = r else { panic!() };
        assert_eq!(metadata.name, "tag-products");
        assert_eq!(spec.schedule.discovery_interval_seconds, 300);
        assert_eq!(spec.filter, Some(serde_json::json!(["category", "Eq", "outdoor"])));
        assert_eq!(spec.scaling.unwrap().replicas.max, 6);
    }

    #[test]
    fn misspelt_field_names_its_path() {
        let text = SEED_TAG_PRODUCTS.replace("batchSize", "batchsize");
        let docs = parse_documents(&text).unwrap();
        let e = validate_document(&docs[0]).unwrap_err();
        assert_eq!(e[0].to_string(), "spec.worker.batchsize: unknown field, did you mean batchSize");
    }

    #[test]
    fn multi_document_files() {
        let text = format!(
            "{SEED_TAG_PRODUCTS}\n---\napiVersion: hevlayer.com/v1alpha1\nkind: Index\nmetadata:\n  name: products\n  labels:\n    team: shop\n"
        );
        let docs = parse_documents(&text).unwrap();
        assert_eq!(docs.len(), 2);
        let r = validate_document(&docs[1]).unwrap();
        assert_eq!(r.kind(), "Index");
        assert_eq!(r.metadata().labels.get("team").map(String::as_str), Some("shop"));
    }

    #[test]
    fn wrong_kind_and_version() {
        let v = serde_json::json!({"apiVersion": "v1", "kind": "Functon", "metadata": {"name": "x"}});
        let e = validate_document(&v).unwrap_err();
        let s: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert!(s[0].starts_with("apiVersion: \"v1\" is not supported"), "{s:?}");
        assert!(s[1].contains("did you mean Function"), "{s:?}");
    }

    #[test]
    fn infra_rules_pools() {
        let text = r#"
apiVersion: hevlayer.com/v1alpha1
kind: InfraRules
metadata:
  name: default
spec:
  computePools:
    - name: gpu
      kind: gpu
      maxReplicasPerWorkload: 4
      nodeSelector:
        layer.hev.dev/node-role: worker-gpu
      tolerations:
        - key: nvidia.com/gpu
          operator: Exists
          effect: NoSchedule
      resources:
        requests: { memory: 4Gi, nvidia.com/gpu: "1" }
        limits: { memory: 10Gi, nvidia.com/gpu: 1 }
"#;
        let r = validate_document(&parse_documents(text).unwrap()[0]).unwrap();
        let Resource::InfraRules { spec, .. } = r else { panic!() };
        assert_eq!(spec.compute_pools[0].max_replicas_per_workload, Some(4));
        assert_eq!(spec.compute_pools[0].resources.limits["nvidia.com/gpu"], "1");
    }

    /// YAML 1.2 core schema: the YAML 1.1 boolean spellings stay strings
    /// wherever they appear; `true`/`false` stay booleans.
    #[test]
    fn yaml_1_1_booleans_stay_strings() {
        let text = r#"
apiVersion: hevlayer.com/v1alpha1
kind: Function
metadata:
  name: norway
  labels: {on: yes, y: n, off: NO}
spec:
  targetNamespaces: [products]
  inputs: [id, n, y, on, no, off, yes, Y, On]
  filter: [And, [[flag, Eq, on], [answer, In, [y, n, yes, no, off]], [ok, Eq, true], [count, Eq, 1_000]]]
  paused: true
  worker: {dispatch: pull}
"#;
        let docs = parse_documents(text).unwrap();
        let d = &docs[0];
        assert_eq!(d["spec"]["inputs"], serde_json::json!(["id", "n", "y", "on", "no", "off", "yes", "Y", "On"]));
        assert_eq!(
            d["spec"]["filter"],
            serde_json::json!([
                "And",
                [
                    ["flag", "Eq", "on"],
                    ["answer", "In", ["y", "n", "yes", "no", "off"]],
                    ["ok", "Eq", true],
                    ["count", "Eq", "1_000"]
                ]
            ])
        );
        assert_eq!(d["spec"]["paused"], serde_json::json!(true));
        let Resource::Function { metadata, spec, paused } = validate_document(d).unwrap() else { panic!() };
        assert_eq!(paused, Some(true));
        assert_eq!(spec.inputs, ["id", "n", "y", "on", "no", "off", "yes", "Y", "On"]);
        let labels: Vec<(&str, &str)> = metadata.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(labels, [("off", "NO"), ("on", "yes"), ("y", "n")]);
        // The rest of the core schema still holds.
        for (yaml, want) in [
            ("a: TRUE", serde_json::json!(true)),
            ("a: False", serde_json::json!(false)),
            ("a: 0o17", serde_json::json!(15)),
            ("a: 0x1F", serde_json::json!(31)),
            ("a: 1.5e3", serde_json::json!(1500.0)),
            ("a: ~", Value::Null),
            ("a: null", Value::Null),
        ] {
            assert_eq!(parse_documents(yaml).unwrap()[0]["a"], want, "{yaml}");
        }
    }

    #[test]
    fn garbage_is_a_syntax_error() {
        assert!(matches!(parse_documents("a: [1, 2"), Err(ParseError::Syntax(_))));
        assert!(matches!(parse_documents("   \n"), Err(ParseError::Empty)));
    }
}

/// `POST /v2/apply`: resource documents, applied all or nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// `Function`, `Index` and `InfraRules` documents, as in a resource
    /// file (camelCase; see docs/resources.md).
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>, min_items = 1))]
    pub documents: Vec<Value>,
}

/// What applying one document did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplyResult {
    pub kind: String,
    pub name: String,
    pub action: ApplyAction,
    /// For Functions: the revision now current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplyResponse {
    pub results: Vec<ApplyResult>,
}

/// An `Index` as `GET /v2/indexes` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IndexInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub spec: IndexSpec,
    pub created_at: String,
    pub updated_at: String,
}

/// An `InfraRules` as `GET /v2/infrarules` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InfraRulesInfo {
    pub name: String,
    pub spec: InfraRulesSpec,
    pub updated_at: String,
}

/// `GET /v2/indexes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IndexList {
    pub indexes: Vec<IndexInfo>,
}

/// `GET /v2/infrarules`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InfraRulesList {
    pub infra_rules: Vec<InfraRulesInfo>,
}
