//! The Function spec in its canonical form: snake_case, every default filled
//! in, as `/v2/udfs` stores and returns it (the client's `UdfSpec`). The same
//! validator reads the camelCase of resource documents and the snake_case of
//! the REST API, so errors name the field as the user spelled it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::filter::Filter;
use crate::validate::{Case, Field, Obj, Problems, check_attribute_name, check_namespace_name, field, index, join};

/// How batches reach the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    /// Workers claim batches through `/v2/udfs/{id}/claim` (the `hevlayer` SDK loop).
    Pull,
    /// The platform pushes batches to a runner, which calls the worker's `POST /run`.
    Push,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ComputeClass {
    Cpu,
    Gpu,
}

/// How a call of the Function reaches its worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CallProtocol {
    /// `POST /run` with a batch of one item (the caller's JSON object as its
    /// `input`); the item's `attributes` are the answer. A row worker
    /// answers calls unchanged.
    #[default]
    Run,
    /// `POST /invoke` with the caller's body and `Content-Type` as they
    /// came; the worker's status, content type and body go back to the
    /// caller as they are.
    Invoke,
}

impl CallProtocol {
    fn is_run(&self) -> bool {
        *self == CallProtocol::Run
    }
}

/// What starts discovery of rows that need work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// Periodic sweeps, on apply, and on demand.
    Discovery,
    /// Rows written through the API are enqueued at once.
    Write,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub dispatch: Dispatch,
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub compute_class: ComputeClass,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub port: Option<u16>,
    #[cfg_attr(feature = "openapi", schema(required = false, minimum = 1, maximum = 10_000))]
    pub batch_size: u32,
    #[cfg_attr(feature = "openapi", schema(required = false, minimum = 1, maximum = 86_400))]
    pub timeout_seconds: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub pod_spec: Option<Value>,
    /// A push worker started as a local process by the runner (argv), in
    /// place of an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Extra environment for the worker, beside the platform's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Limits for each worker (containers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<WorkerResources>,
    /// How calls reach the worker: `run` (default) or `invoke`.
    #[serde(default, skip_serializing_if = "CallProtocol::is_run")]
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub protocol: CallProtocol,
}

/// `spec.worker.resources`: what one worker may use, as Kubernetes-style
/// quantities (kept as written; [`parse_cpu`] and [`parse_bytes`] read
/// them). A container gets them as its limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerResources {
    /// CPUs: `2`, `0.5`, `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory: bytes, or `512Mi`, `4Gi`, `1G`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// The writable scratch space (`/tmp`), as for memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_disk: Option<String>,
    /// Whole NVIDIA GPUs bound to each worker (0 to 16). Omitted, a
    /// `computeClass: gpu` worker gets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 16))]
    pub gpus: Option<u32>,
}

/// CPUs from a quantity: `2`, `0.5`, `500m` (millicores).
pub fn parse_cpu(q: &str) -> Option<f64> {
    let q = q.trim();
    let v = match q.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok()? / 1000.0,
        None => q.parse::<f64>().ok()?,
    };
    (v.is_finite() && v > 0.0).then_some(v)
}

/// Bytes from a quantity: a plain number, or with a binary (`Ki`, `Mi`,
/// `Gi`, `Ti`) or decimal (`k`, `M`, `G`, `T`) suffix.
pub fn parse_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("k", 1e3),
        ("K", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let (number, scale) = SUFFIXES.iter().find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m))).unwrap_or((q, 1.0));
    let v = number.parse::<f64>().ok()? * scale;
    (v.is_finite() && (1.0..1.8e19).contains(&v)).then_some(v as u64)
}

/// A worker's limits once every source is read: `worker.resources` first,
/// then the first container's `resources.limits` in `worker.podSpec`
/// (`containers`, or `spec.containers`), then the compute pool's `limits`.
/// The Kubernetes names that mean the same are `cpu`, `memory`,
/// `ephemeral-storage` and `nvidia.com/gpu` (which may also come from
/// `requests`, as Kubernetes requires both to be equal). A `computeClass:
/// gpu` worker that names no GPU count gets one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResolvedResources {
    pub cpu: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub ephemeral_disk_bytes: Option<u64>,
    pub gpus: u32,
}

fn quantities(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some((k.clone(), s.clone())),
                    Value::Number(n) => Some((k.clone(), n.to_string())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads [`ResolvedResources`] from the worker spec and its compute pool.
pub fn resolve_resources(w: &WorkerSpec, pool: Option<&crate::resource::PoolResources>) -> ResolvedResources {
    let own = w.resources.clone().unwrap_or_default();
    let container = w.pod_spec.as_ref().and_then(|ps| {
        let containers = ps.get("containers").or_else(|| ps.get("spec").and_then(|s| s.get("containers")))?;
        containers.as_array()?.first()?.get("resources").cloned()
    });
    let pod_limits = quantities(container.as_ref().and_then(|r| r.get("limits")));
    let pod_requests = quantities(container.as_ref().and_then(|r| r.get("requests")));
    let empty = BTreeMap::new();
    let (pool_limits, pool_requests) = pool.map_or((&empty, &empty), |r| (&r.limits, &r.requests));
    let limit = |key: &str| pod_limits.get(key).or_else(|| pool_limits.get(key)).map(String::as_str);
    let gpus = own
        .gpus
        .or_else(|| {
            [&pod_limits, &pod_requests, pool_limits, pool_requests]
                .iter()
                .find_map(|m| m.get("nvidia.com/gpu"))
                .and_then(|q| q.trim().parse::<u32>().ok())
        })
        .unwrap_or(if w.compute_class == ComputeClass::Gpu { 1 } else { 0 });
    ResolvedResources {
        cpu: own.cpu.as_deref().or_else(|| limit("cpu")).and_then(parse_cpu),
        memory_bytes: own.memory.as_deref().or_else(|| limit("memory")).and_then(parse_bytes),
        ephemeral_disk_bytes: own
            .ephemeral_disk
            .as_deref()
            .or_else(|| limit("ephemeral-storage"))
            .and_then(parse_bytes),
        gpus,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleSpec {
    #[cfg_attr(feature = "openapi", schema(required = false, minimum = 1, maximum = 86_400))]
    pub discovery_interval_seconds: u32,
    #[cfg_attr(feature = "openapi", schema(required = false, minimum = 1, maximum = 86_400))]
    pub lease_seconds: u32,
    #[cfg_attr(feature = "openapi", schema(required = false, minimum = 1, maximum = 10_000))]
    pub max_in_flight_batches: u32,
    #[cfg_attr(feature = "openapi", schema(required = false, minimum = 1, maximum = 64))]
    pub max_concurrent_scans: u32,
    /// The `schedule` trigger: a cron expression (5 fields, or 6 with
    /// seconds first), evaluated in UTC. Set, it sweeps on each match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
}

impl ScheduleSpec {
    /// The next time the cron expression matches strictly after `after`.
    pub fn next_cron_after(&self, after: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
        let cron = parse_cron(self.cron.as_deref()?).ok()?;
        cron.find_next_occurrence(&after, false).ok()
    }
}

/// Parses a cron expression the way `spec.schedule.cron` is read: 5 fields
/// (minute hour day-of-month month day-of-week), or 6 with seconds first.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    let fields = expr.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "\"{expr}\" has {fields} fields; expected 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("\"{expr}\" is not a cron expression: {e}"))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RetrySpec {
    #[cfg_attr(feature = "openapi", schema(required = false, minimum = 1, maximum = 100))]
    pub max_attempts: u32,
    #[cfg_attr(feature = "openapi", schema(required = false, maximum = 86_400))]
    pub initial_backoff_seconds: u32,
    #[cfg_attr(feature = "openapi", schema(required = false, maximum = 86_400))]
    pub max_backoff_seconds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ScalingMode {
    Autoscale,
    Fixed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Replicas {
    #[cfg_attr(feature = "openapi", schema(required = false, maximum = 1_000))]
    pub min: u32,
    #[cfg_attr(feature = "openapi", schema(required = false, minimum = 1, maximum = 1_000))]
    pub max: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScalingSpec {
    /// A compute pool of `InfraRules/default`; omitted, `worker.compute_class` picks `cpu` or `gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub mode: ScalingMode,
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub replicas: Replicas,
}

/// A Kubernetes-style label selector over `Index` labels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelExpression>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LabelExpression {
    pub key: String,
    pub operator: SelectorOp,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SelectorOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Whether a set of labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let got = labels.get(&e.key);
                match e.operator {
                    SelectorOp::In => got.is_some_and(|g| e.values.contains(g)),
                    SelectorOp::NotIn => got.is_none_or(|g| !e.values.contains(g)),
                    SelectorOp::Exists => got.is_some(),
                    SelectorOp::DoesNotExist => got.is_none(),
                }
            })
    }
}

/// The canonical Function spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = UdfSpec))]
pub struct FunctionSpec {
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub target_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_selector: Option<LabelSelector>,
    #[cfg_attr(feature = "openapi", schema(required = false, max_items = 256))]
    pub inputs: Vec<String>,
    #[cfg_attr(feature = "openapi", schema(required = false, max_length = 64))]
    pub version: String,
    /// Stored exactly as given (array-form Turbopuffer filter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<serde_json::Value>>))]
    pub filter: Option<Value>,
    pub worker: WorkerSpec,
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub schedule: ScheduleSpec,
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub retry: RetrySpec,
    #[cfg_attr(feature = "openapi", schema(required = false, value_type = Vec<TriggerName>))]
    pub triggers: Vec<Trigger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingSpec>,
    #[serde(default)]
    pub invalidates: Vec<String>,
    /// When set, each result goes stale this long after it is written: the
    /// row gets `_hevlayer_udf_<fn>_stale_after` (epoch seconds) and is
    /// discovered again once that time has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315_360_000))]
    pub stale_after_seconds: Option<u32>,
    /// How the Function is called over HTTP.
    #[serde(default, skip_serializing_if = "CallsSpec::is_default")]
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub calls: CallsSpec,
}

/// `spec.calls`: the Function as an HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallsSpec {
    /// Whether a request without an API key may call the Function (off by
    /// default; see docs/security.md before turning it on).
    #[serde(default)]
    pub anonymous: bool,
    /// The most calls of the Function one platform replica holds at once,
    /// waiting for a worker or running; past it a call is a 429 at once.
    #[serde(default = "default_call_queue")]
    #[cfg_attr(feature = "openapi", schema(required = false, minimum = 1, maximum = 100_000))]
    pub queue: u32,
}

fn default_call_queue() -> u32 {
    limits::CALL_QUEUE.0 as u32
}

impl Default for CallsSpec {
    fn default() -> Self {
        CallsSpec { anonymous: false, queue: default_call_queue() }
    }
}

impl CallsSpec {
    fn is_default(&self) -> bool {
        *self == CallsSpec::default()
    }
}

/// The triggers a spec may name: `schedule` is on while `schedule.cron`
/// is set, and is not kept in the stored list.
#[cfg(feature = "openapi")]
#[derive(utoipa::ToSchema)]
#[allow(dead_code, non_camel_case_types)]
enum TriggerName {
    discovery,
    write,
    schedule,
}

impl FunctionSpec {
    /// The completion-marker attribute for a Function name: hyphens become
    /// underscores (`product-color` → `_hevlayer_udf_product_color_v`).
    pub fn marker_attribute(function_name: &str) -> String {
        format!("{}udf_{}_v", crate::RESERVED_PREFIX, function_name.replace('-', "_"))
    }

    /// The stale-after marker for a Function name.
    pub fn stale_after_attribute(function_name: &str) -> String {
        format!("{}udf_{}_stale_after", crate::RESERVED_PREFIX, function_name.replace('-', "_"))
    }
}

/// Limits, in one place so the docs and the checks agree.
pub mod limits {
    pub const BATCH_SIZE: (i64, i64) = (1, 10_000);
    pub const TIMEOUT_SECONDS: (i64, i64) = (1, 86_400);
    pub const LEASE_SECONDS: (i64, i64) = (1, 86_400);
    pub const DISCOVERY_INTERVAL_SECONDS: (i64, i64) = (1, 86_400);
    pub const MAX_IN_FLIGHT_BATCHES: (i64, i64) = (1, 10_000);
    pub const MAX_CONCURRENT_SCANS: (i64, i64) = (1, 64);
    pub const MAX_ATTEMPTS: (i64, i64) = (1, 100);
    pub const BACKOFF_SECONDS: (i64, i64) = (0, 86_400);
    pub const REPLICAS: (i64, i64) = (0, 1_000);
    pub const INPUTS: usize = 256;
    pub const STALE_AFTER_SECONDS: i64 = 10 * 365 * 86_400;
    /// `calls.queue`: (default, most).
    pub const CALL_QUEUE: (i64, i64) = (100, 100_000);
}

const SPEC_FIELDS: &[Field] = &[
    field("targetNamespaces", "target_namespaces"),
    field("indexSelector", "index_selector"),
    field("inputs", "inputs"),
    field("version", "version"),
    field("filter", "filter"),
    field("worker", "worker"),
    field("schedule", "schedule"),
    field("retry", "retry"),
    field("triggers", "triggers"),
    field("scaling", "scaling"),
    field("invalidates", "invalidates"),
    field("paused", "paused"),
    field("staleAfterSeconds", "stale_after_seconds"),
    field("calls", "calls"),
];
const CALLS_FIELDS: &[Field] = &[field("anonymous", "anonymous"), field("queue", "queue")];
const F_TARGETS: Field = SPEC_FIELDS[0];
const F_SELECTOR: Field = SPEC_FIELDS[1];
const F_INPUTS: Field = SPEC_FIELDS[2];
const F_VERSION: Field = SPEC_FIELDS[3];
const F_FILTER: Field = SPEC_FIELDS[4];
const F_WORKER: Field = SPEC_FIELDS[5];
const F_SCHEDULE: Field = SPEC_FIELDS[6];
const F_RETRY: Field = SPEC_FIELDS[7];
const F_TRIGGERS: Field = SPEC_FIELDS[8];
const F_SCALING: Field = SPEC_FIELDS[9];
const F_INVALIDATES: Field = SPEC_FIELDS[10];
const F_PAUSED: Field = SPEC_FIELDS[11];
const F_STALE_AFTER: Field = SPEC_FIELDS[12];
const F_CALLS: Field = SPEC_FIELDS[13];

const WORKER_FIELDS: &[Field] = &[
    field("image", "image"),
    field("url", "url"),
    field("dispatch", "dispatch"),
    field("computeClass", "compute_class"),
    field("port", "port"),
    field("batchSize", "batch_size"),
    field("timeoutSeconds", "timeout_seconds"),
    field("podSpec", "pod_spec"),
    field("command", "command"),
    field("env", "env"),
    field("resources", "resources"),
    field("protocol", "protocol"),
];
const RESOURCE_FIELDS: &[Field] =
    &[field("cpu", "cpu"), field("memory", "memory"), field("ephemeralDisk", "ephemeral_disk"), field("gpus", "gpus")];
const SCHEDULE_FIELDS: &[Field] = &[
    field("discoveryIntervalSeconds", "discovery_interval_seconds"),
    field("leaseSeconds", "lease_seconds"),
    field("maxInFlightBatches", "max_in_flight_batches"),
    field("maxConcurrentScans", "max_concurrent_scans"),
    field("cron", "cron"),
];
const RETRY_FIELDS: &[Field] = &[
    field("maxAttempts", "max_attempts"),
    field("initialBackoffSeconds", "initial_backoff_seconds"),
    field("maxBackoffSeconds", "max_backoff_seconds"),
];
const SCALING_FIELDS: &[Field] = &[field("pool", "pool"), field("mode", "mode"), field("replicas", "replicas")];
const REPLICA_FIELDS: &[Field] = &[field("min", "min"), field("max", "max")];
const SELECTOR_FIELDS: &[Field] =
    &[field("matchLabels", "match_labels"), field("matchExpressions", "match_expressions")];
const EXPRESSION_FIELDS: &[Field] = &[field("key", "key"), field("operator", "operator"), field("values", "values")];

/// A validated spec plus the `paused` flag a resource document may carry.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedSpec {
    pub spec: FunctionSpec,
    pub paused: Option<bool>,
}

/// Validates a Function spec object at `path` (`spec`), in either spelling,
/// filling in defaults. Every problem found is reported.
pub fn validate_spec(p: &mut Problems, path: &str, value: &Value, case: Case) -> Option<ValidatedSpec> {
    let start = p.is_empty();
    let obj = Obj::open(p, path, value, case, SPEC_FIELDS)?;

    let target_namespaces = obj.string_list(p, F_TARGETS).unwrap_or_default();
    for (i, ns) in target_namespaces.iter().enumerate() {
        if let Err(m) = check_namespace_name(ns) {
            p.push(index(&obj.path_of(F_TARGETS), i), m);
        }
    }
    let index_selector = obj.get(F_SELECTOR).and_then(|v| label_selector(p, &obj.path_of(F_SELECTOR), v, case));
    if target_namespaces.is_empty() && index_selector.is_none() && obj.get(F_SELECTOR).is_none() {
        p.push(
            obj.path_of(F_TARGETS),
            format!("one of {} or {} is required", F_TARGETS.name(case), F_SELECTOR.name(case)),
        );
    }

    let inputs = obj.string_list(p, F_INPUTS).unwrap_or_default();
    if inputs.len() > limits::INPUTS {
        p.push(obj.path_of(F_INPUTS), format!("at most {} inputs", limits::INPUTS));
    }
    for (i, name) in inputs.iter().enumerate() {
        if let Err(m) = check_attribute_name(name) {
            p.push(index(&obj.path_of(F_INPUTS), i), m);
        }
        if inputs[..i].contains(name) {
            p.push(index(&obj.path_of(F_INPUTS), i), format!("\"{name}\" is listed twice"));
        }
    }

    let version = obj.string(p, F_VERSION, false).unwrap_or_else(|| "v1".into());
    if version.len() > 64 {
        p.push(obj.path_of(F_VERSION), "must be at most 64 characters");
    }

    let filter = obj.get(F_FILTER).cloned();
    if let Some(f) = &filter {
        match Filter::parse(f, &obj.path_of(F_FILTER)) {
            Ok(Some(parsed)) => {
                for attr in parsed.attributes() {
                    if attr.starts_with(crate::RESERVED_PREFIX) {
                        p.push(
                            obj.path_of(F_FILTER),
                            format!(
                                "filter reads the reserved attribute \"{attr}\"; do not filter on completion markers, the gateway adds the marker predicate from {}",
                                join(path, F_VERSION.name(case))
                            ),
                        );
                    }
                }
            }
            Ok(None) => {}
            Err(e) => p.push(e.path, e.message),
        }
    }

    let worker = match obj.get(F_WORKER) {
        Some(w) => worker_spec(p, &obj.path_of(F_WORKER), w, case),
        None => {
            p.push(obj.path_of(F_WORKER), "required");
            None
        }
    };
    let schedule = schedule_spec(p, &obj, case);
    let retry = retry_spec(p, &obj, case);
    if let (Some(w), Some(s)) = (&worker, &schedule)
        && s.lease_seconds < w.timeout_seconds
    {
        p.push(
            join(&obj.path_of(F_SCHEDULE), SCHEDULE_FIELDS[1].name(case)),
            format!(
                "{} must be at least {} ({}), or claims are reissued while the worker is still running",
                s.lease_seconds,
                join(&obj.path_of(F_WORKER), WORKER_FIELDS[6].name(case)),
                w.timeout_seconds
            ),
        );
    }

    // `schedule` is the cron trigger: it is on exactly when
    // `schedule.cron` is set, so it is not kept in the list (the client's
    // models only know discovery and write).
    let cron_given = obj.get(F_SCHEDULE).and_then(|v| v.get(SCHEDULE_FIELDS[4].name(case))).is_some();
    let triggers = match obj.get(F_TRIGGERS) {
        None if cron_given => Vec::new(),
        None => vec![Trigger::Discovery],
        Some(_) => {
            let raw = obj.string_list(p, F_TRIGGERS).unwrap_or_default();
            let mut out = Vec::new();
            let mut scheduled = false;
            for (i, t) in raw.iter().enumerate() {
                let at = index(&obj.path_of(F_TRIGGERS), i);
                let trig = match t.as_str() {
                    "discovery" => Trigger::Discovery,
                    "write" => Trigger::Write,
                    "schedule" => {
                        if scheduled {
                            p.push(at, "\"schedule\" is listed twice");
                        } else if !cron_given {
                            p.push(
                                at,
                                format!(
                                    "\"schedule\" needs {}: a cron expression such as \"*/15 * * * *\"",
                                    join(&obj.path_of(F_SCHEDULE), SCHEDULE_FIELDS[4].name(case))
                                ),
                            );
                        }
                        scheduled = true;
                        continue;
                    }
                    other => {
                        p.push(at, format!("\"{other}\" is not allowed; allowed: discovery, write, schedule"));
                        continue;
                    }
                };
                if out.contains(&trig) {
                    p.push(at, format!("\"{t}\" is listed twice"));
                }
                out.push(trig);
            }
            if raw.is_empty() {
                p.push(obj.path_of(F_TRIGGERS), "at least one trigger is required (discovery, write or schedule)");
            }
            out
        }
    };

    let scaling = obj.get(F_SCALING).and_then(|v| scaling_spec(p, &obj.path_of(F_SCALING), v, case));
    let invalidates = obj.string_list(p, F_INVALIDATES).unwrap_or_default();
    let paused = obj.boolean(p, F_PAUSED);
    let stale_after_seconds = obj.int(p, F_STALE_AFTER, 1, limits::STALE_AFTER_SECONDS).map(|n| n as u32);
    let calls = match obj.get(F_CALLS) {
        None => CallsSpec::default(),
        Some(v) => match Obj::open(p, &obj.path_of(F_CALLS), v, case, CALLS_FIELDS) {
            Some(c) => CallsSpec {
                anonymous: c.boolean(p, CALLS_FIELDS[0]).unwrap_or(false),
                queue: c
                    .int(p, CALLS_FIELDS[1], 1, limits::CALL_QUEUE.1)
                    .map_or(limits::CALL_QUEUE.0 as u32, |n| n as u32),
            },
            None => CallsSpec::default(),
        },
    };

    if !p.is_empty() && start {
        return None;
    }
    Some(ValidatedSpec {
        spec: FunctionSpec {
            target_namespaces,
            index_selector,
            inputs,
            version,
            filter,
            worker: worker?,
            schedule: schedule?,
            retry: retry?,
            triggers,
            scaling,
            invalidates,
            stale_after_seconds,
            calls,
        },
        paused,
    })
}

fn worker_spec(p: &mut Problems, path: &str, v: &Value, case: Case) -> Option<WorkerSpec> {
    let o = Obj::open(p, path, v, case, WORKER_FIELDS)?;
    let image = o.string(p, WORKER_FIELDS[0], false);
    let url = o.string(p, WORKER_FIELDS[1], false);
    if let Some(u) = &url
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        p.push(o.path_of(WORKER_FIELDS[1]), format!("\"{u}\" is not an http:// or https:// URL"));
    }
    let dispatch = match o.one_of(p, WORKER_FIELDS[2], &["pull", "push"]).as_deref() {
        Some("push") => Dispatch::Push,
        _ => Dispatch::Pull,
    };
    let compute_class = match o.one_of(p, WORKER_FIELDS[3], &["cpu", "gpu"]).as_deref() {
        Some("gpu") => ComputeClass::Gpu,
        _ => ComputeClass::Cpu,
    };
    let port = o.int(p, WORKER_FIELDS[4], 1, 65_535).map(|n| n as u16);
    let (lo, hi) = limits::BATCH_SIZE;
    let batch_size = o.int(p, WORKER_FIELDS[5], lo, hi).unwrap_or(32) as u32;
    let (lo, hi) = limits::TIMEOUT_SECONDS;
    let timeout_seconds = o.int(p, WORKER_FIELDS[6], lo, hi).unwrap_or(30) as u32;
    let pod_spec = o.get(WORKER_FIELDS[7]).cloned();
    if let Some(ps) = &pod_spec
        && !ps.is_object()
    {
        p.push(o.path_of(WORKER_FIELDS[7]), "expected an object (a pod-level merge patch)");
    }
    let command = o.get(WORKER_FIELDS[8]).and_then(|_| o.string_list(p, WORKER_FIELDS[8]));
    if command.as_ref().is_some_and(Vec::is_empty) {
        p.push(o.path_of(WORKER_FIELDS[8]), "must name the program to run: [program, args...]");
    }
    let env = worker_env(p, &o);
    if dispatch == Dispatch::Push {
        let given = [image.is_some(), url.is_some(), command.is_some()].into_iter().filter(|b| *b).count();
        let names = format!(
            "{}, {} or {}",
            WORKER_FIELDS[0].name(case),
            WORKER_FIELDS[8].name(case),
            WORKER_FIELDS[1].name(case)
        );
        if given == 0 {
            p.push(
                path,
                format!("dispatch push needs one of {names}: the runner must have something to start or call"),
            );
        } else if given > 1 {
            p.push(path, format!("dispatch push takes exactly one of {names}"));
        }
    }
    let resources = o.get(WORKER_FIELDS[10]).and_then(|v| worker_resources(p, &o.path_of(WORKER_FIELDS[10]), v, case));
    let protocol = match o.one_of(p, WORKER_FIELDS[11], &["run", "invoke"]).as_deref() {
        Some("invoke") => CallProtocol::Invoke,
        _ => CallProtocol::Run,
    };
    Some(WorkerSpec {
        image,
        url,
        dispatch,
        compute_class,
        port,
        batch_size,
        timeout_seconds,
        pod_spec,
        command,
        env,
        resources,
        protocol,
    })
}

fn worker_resources(p: &mut Problems, path: &str, v: &Value, case: Case) -> Option<WorkerResources> {
    let o = Obj::open(p, path, v, case, RESOURCE_FIELDS)?;
    let mut quantity = |f: Field, valid: fn(&str) -> bool, example: &str| -> Option<String> {
        let text = match o.get(f)? {
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) => n.to_string(),
            other => {
                p.push(o.path_of(f), format!("expected a quantity such as \"{example}\", got {other}"));
                return None;
            }
        };
        if valid(&text) {
            Some(text)
        } else {
            p.push(o.path_of(f), format!("\"{text}\" is not a positive quantity such as \"{example}\""));
            None
        }
    };
    let cpu = quantity(RESOURCE_FIELDS[0], |q| parse_cpu(q).is_some(), "500m");
    let memory = quantity(RESOURCE_FIELDS[1], |q| parse_bytes(q).is_some_and(|b| b >= 6 << 20), "512Mi");
    let ephemeral_disk = quantity(RESOURCE_FIELDS[2], |q| parse_bytes(q).is_some(), "1Gi");
    let gpus = o.int(p, RESOURCE_FIELDS[3], 0, 16).map(|n| n as u32);
    Some(WorkerResources { cpu, memory, ephemeral_disk, gpus })
}

/// Environment names the runner sets itself.
pub const RESERVED_ENV: &[&str] = &["PORT", "LAYER_GATEWAY_API_KEY"];

fn worker_env(p: &mut Problems, o: &Obj<'_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(v) = o.get(WORKER_FIELDS[9]) else {
        return out;
    };
    let path = o.path_of(WORKER_FIELDS[9]);
    let Value::Object(map) = v else {
        p.push(path, "expected an object of NAME: value strings");
        return out;
    };
    for (k, v) in map {
        let at = join(&path, k);
        let valid = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            p.push(at, "not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)");
        } else if RESERVED_ENV.contains(&k.as_str()) || k.starts_with("HEVLAYER_") {
            p.push(at, "set by the runner for every worker; choose another name");
        } else {
            match v {
                Value::String(s) => {
                    out.insert(k.clone(), s.clone());
                }
                Value::Number(n) => {
                    out.insert(k.clone(), n.to_string());
                }
                Value::Bool(b) => {
                    out.insert(k.clone(), b.to_string());
                }
                other => p.push(at, format!("expected a string, got {}", crate::validate::type_name(other))),
            }
        }
    }
    out
}

fn schedule_spec(p: &mut Problems, spec: &Obj<'_>, case: Case) -> Option<ScheduleSpec> {
    let mut out = ScheduleSpec {
        discovery_interval_seconds: 60,
        lease_seconds: 120,
        max_in_flight_batches: 8,
        max_concurrent_scans: 4,
        cron: None,
    };
    let Some(v) = spec.get(F_SCHEDULE) else {
        return Some(out);
    };
    let o = Obj::open(p, &spec.path_of(F_SCHEDULE), v, case, SCHEDULE_FIELDS)?;
    let get = |p: &mut Problems, f: Field, (lo, hi): (i64, i64), d: u32| o.int(p, f, lo, hi).map_or(d, |n| n as u32);
    out.discovery_interval_seconds =
        get(p, SCHEDULE_FIELDS[0], limits::DISCOVERY_INTERVAL_SECONDS, out.discovery_interval_seconds);
    out.lease_seconds = get(p, SCHEDULE_FIELDS[1], limits::LEASE_SECONDS, out.lease_seconds);
    out.max_in_flight_batches = get(p, SCHEDULE_FIELDS[2], limits::MAX_IN_FLIGHT_BATCHES, out.max_in_flight_batches);
    out.max_concurrent_scans = get(p, SCHEDULE_FIELDS[3], limits::MAX_CONCURRENT_SCANS, out.max_concurrent_scans);
    out.cron = o.string(p, SCHEDULE_FIELDS[4], false);
    if let Some(expr) = &out.cron
        && let Err(e) = parse_cron(expr)
    {
        p.push(o.path_of(SCHEDULE_FIELDS[4]), e);
        out.cron = None;
    }
    Some(out)
}

fn retry_spec(p: &mut Problems, spec: &Obj<'_>, case: Case) -> Option<RetrySpec> {
    let mut out = RetrySpec { max_attempts: 8, initial_backoff_seconds: 5, max_backoff_seconds: 300 };
    let Some(v) = spec.get(F_RETRY) else {
        return Some(out);
    };
    let o = Obj::open(p, &spec.path_of(F_RETRY), v, case, RETRY_FIELDS)?;
    let (lo, hi) = limits::MAX_ATTEMPTS;
    out.max_attempts = o.int(p, RETRY_FIELDS[0], lo, hi).map_or(out.max_attempts, |n| n as u32);
    let (lo, hi) = limits::BACKOFF_SECONDS;
    out.initial_backoff_seconds = o.int(p, RETRY_FIELDS[1], lo, hi).map_or(out.initial_backoff_seconds, |n| n as u32);
    out.max_backoff_seconds = o.int(p, RETRY_FIELDS[2], lo, hi).map_or(out.max_backoff_seconds, |n| n as u32);
    if out.initial_backoff_seconds > out.max_backoff_seconds {
        p.push(
            o.path_of(RETRY_FIELDS[1]),
            format!(
                "{} is larger than {} ({})",
                out.initial_backoff_seconds,
                RETRY_FIELDS[2].name(case),
                out.max_backoff_seconds
            ),
        );
    }
    Some(out)
}

fn scaling_spec(p: &mut Problems, path: &str, v: &Value, case: Case) -> Option<ScalingSpec> {
    let o = Obj::open(p, path, v, case, SCALING_FIELDS)?;
    let pool = o.string(p, SCALING_FIELDS[0], false);
    if let Some(name) = &pool
        && let Err(m) = crate::validate::check_resource_name(name)
    {
        p.push(o.path_of(SCALING_FIELDS[0]), m);
    }
    let mode = match o.one_of(p, SCALING_FIELDS[1], &["autoscale", "fixed"]).as_deref() {
        Some("fixed") => ScalingMode::Fixed,
        _ => ScalingMode::Autoscale,
    };
    let mut replicas = Replicas { min: 0, max: 1 };
    if let Some(rv) = o.get(SCALING_FIELDS[2])
        && let Some(r) = Obj::open(p, &o.path_of(SCALING_FIELDS[2]), rv, case, REPLICA_FIELDS)
    {
        let (lo, hi) = limits::REPLICAS;
        replicas.min = r.int(p, REPLICA_FIELDS[0], lo, hi).map_or(0, |n| n as u32);
        replicas.max = r.int(p, REPLICA_FIELDS[1], 1, hi).map_or(replicas.min.max(1), |n| n as u32);
        if replicas.min > replicas.max {
            p.push(r.path_of(REPLICA_FIELDS[0]), format!("{} is larger than max ({})", replicas.min, replicas.max));
        }
    }
    Some(ScalingSpec { pool, mode, replicas })
}

fn label_selector(p: &mut Problems, path: &str, v: &Value, case: Case) -> Option<LabelSelector> {
    let o = Obj::open(p, path, v, case, SELECTOR_FIELDS)?;
    let match_labels = o.string_map(p, SELECTOR_FIELDS[0]).unwrap_or_default();
    let mut match_expressions = Vec::new();
    if let Some(list) = o.get(SELECTOR_FIELDS[1]) {
        let lpath = o.path_of(SELECTOR_FIELDS[1]);
        match list {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let ipath = index(&lpath, i);
                    let Some(e) = Obj::open(p, &ipath, item, case, EXPRESSION_FIELDS) else {
                        continue;
                    };
                    let key = e.string(p, EXPRESSION_FIELDS[0], true);
                    let op = e.one_of(p, EXPRESSION_FIELDS[1], &["In", "NotIn", "Exists", "DoesNotExist"]);
                    let values = e.string_list(p, EXPRESSION_FIELDS[2]).unwrap_or_default();
                    let operator = match op.as_deref() {
                        Some("In") => SelectorOp::In,
                        Some("NotIn") => SelectorOp::NotIn,
                        Some("Exists") => SelectorOp::Exists,
                        Some("DoesNotExist") => SelectorOp::DoesNotExist,
                        _ => {
                            if e.get(EXPRESSION_FIELDS[1]).is_none() {
                                p.push(e.path_of(EXPRESSION_FIELDS[1]), "required");
                            }
                            continue;
                        }
                    };
                    let needs_values = matches!(operator, SelectorOp::In | SelectorOp::NotIn);
                    if needs_values == values.is_empty() {
                        p.push(
                            e.path_of(EXPRESSION_FIELDS[2]),
                            if needs_values {
                                "In and NotIn need values"
                            } else {
                                "Exists and DoesNotExist take no values"
                            },
                        );
                    }
                    if let Some(key) = key {
                        match_expressions.push(LabelExpression { key, operator, values });
                    }
                }
            }
            other => p.push(lpath, format!("expected a list, got {}", crate::validate::type_name(other))),
        }
    }
    if match_labels.is_empty() && match_expressions.is_empty() {
        p.push(path, "an empty selector would select every Index; give matchLabels or matchExpressions");
    }
    Some(LabelSelector { match_labels, match_expressions })
}

/// A Function as `/v2/udfs` returns it (the client's `Udf`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Udf {
    pub id: String,
    pub spec: FunctionSpec,
    pub paused: bool,
    pub created_at: String,
    pub updated_at: String,
    /// The current revision number (1 for a new Function).
    pub revision: i32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UdfList {
    pub udfs: Vec<Udf>,
}

/// `GET /v2/udfs/{id}` (the client's `GetUdfResponse`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GetUdfResponse {
    pub udf: Udf,
    pub status: UdfStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UdfDiscoveryStatus {
    pub sweeps_completed: i64,
    pub last_completed_at: Option<String>,
    /// With a cron schedule: the last time it fired, and the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_scheduled_at: Option<String>,
}

/// The client's `UdfStatus`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UdfStatus {
    pub udf_id: String,
    pub paused: bool,
    pub active_namespaces: Vec<String>,
    pub discovery: UdfDiscoveryStatus,
    pub counts: BTreeMap<String, i64>,
    pub pending_count: i64,
    pub processing_count: i64,
    pub failed_count: i64,
    pub indexed_rate_per_min: f64,
    pub rate_window_seconds: i64,
    /// Why the Function's batches are not being placed, if they are not:
    /// its replicas are above its pool's limit, its pool is unknown, or no
    /// active runner can run it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<UdfCondition>,
}

/// The reasons of a [`UdfCondition`], for the OpenAPI document.
#[cfg(feature = "openapi")]
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
enum ConditionReason {
    ReplicasRejected,
    PoolNotFound,
    NoRunner,
    NoWorker,
    WorkerFailing,
}

/// A problem with running a Function, in its status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UdfCondition {
    /// `ReplicasRejected`, `PoolNotFound`, `NoRunner`, `NoWorker` or
    /// `WorkerFailing`.
    #[cfg_attr(feature = "openapi", schema(value_type = ConditionReason))]
    pub reason: String,
    pub message: String,
}

impl UdfCondition {
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        UdfCondition { reason: reason.into(), message: message.into() }
    }
}

/// One stored revision of a Function's spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Revision {
    pub revision: i32,
    pub created_at: String,
    /// The key that made the change (`null` for the bootstrap).
    pub key_id: Option<String>,
    /// The spec paths that differ from the previous revision.
    pub changed: Vec<String>,
    pub spec: FunctionSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevisionList {
    pub revisions: Vec<Revision>,
}

/// The spec paths (snake_case) whose values differ between two specs.
pub fn changed_paths(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff(old, new, "", &mut out);
    out
}

fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let child = join(path, k);
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff(va, vb, &child, out),
                    _ => out.push(child),
                }
            }
        }
        _ if a != b => out.push(if path.is_empty() { "spec".into() } else { path.to_string() }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value, case: Case) -> Result<ValidatedSpec, Vec<String>> {
        let mut p = Problems::new();
        let out = validate_spec(&mut p, "spec", &v, case);
        let list = p.into_vec();
        if list.is_empty() { Ok(out.unwrap()) } else { Err(list.iter().map(|x| x.to_string()).collect()) }
    }

    #[test]
    fn defaults_fill_in() {
        let s = check(json!({"targetNamespaces": ["a"], "worker": {}}), Case::Camel).unwrap().spec;
        assert_eq!(s.version, "v1");
        assert_eq!(s.worker.batch_size, 32);
        assert_eq!(s.worker.dispatch, Dispatch::Pull);
        assert_eq!(s.schedule.lease_seconds, 120);
        assert_eq!(s.retry.max_attempts, 8);
        assert_eq!(s.triggers, vec![Trigger::Discovery]);
    }

    #[test]
    fn calls_speak_run_unless_the_worker_says_invoke() {
        let s = check(json!({"targetNamespaces": ["a"], "worker": {}}), Case::Camel).unwrap().spec;
        assert_eq!(s.worker.protocol, CallProtocol::Run);
        // The default is not written out: stored specs stay as they were.
        assert!(serde_json::to_value(&s.worker).unwrap().get("protocol").is_none());
        let s = check(json!({"targetNamespaces": ["a"], "worker": {"protocol": "invoke"}}), Case::Camel).unwrap().spec;
        assert_eq!(s.worker.protocol, CallProtocol::Invoke);
        assert_eq!(serde_json::to_value(&s.worker).unwrap()["protocol"], "invoke");
        let e = check(json!({"targetNamespaces": ["a"], "worker": {"protocol": "grpc"}}), Case::Camel).unwrap_err();
        assert!(e.iter().any(|m| m.starts_with("spec.worker.protocol") && m.contains("grpc")), "{e:?}");
    }

    #[test]
    fn worker_resources_are_quantities() {
        assert_eq!(parse_cpu("500m"), Some(0.5));
        assert_eq!(parse_cpu("2"), Some(2.0));
        assert_eq!(parse_cpu("0"), None);
        assert_eq!(parse_bytes("64Mi"), Some(64 << 20));
        assert_eq!(parse_bytes("1G"), Some(1_000_000_000));
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("lots"), None);
        let s = check(
            json!({"targetNamespaces": ["a"], "worker": {"resources": {"cpu": 1.5, "memory": "2Gi", "ephemeralDisk": "1Gi"}}}),
            Case::Camel,
        )
        .unwrap()
        .spec;
        let r = s.worker.resources.unwrap();
        assert_eq!(
            (r.cpu.as_deref(), r.memory.as_deref(), r.ephemeral_disk.as_deref()),
            (Some("1.5"), Some("2Gi"), Some("1Gi"))
        );
        let e = check(
            json!({"targetNamespaces": ["a"], "worker": {"resources": {"cpu": "lots", "memory": "1Ki", "gpu": 1}}}),
            Case::Camel,
        )
        .unwrap_err();
        assert!(e.iter().any(|m| m.contains("spec.worker.resources.cpu") && m.contains("\"lots\"")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("spec.worker.resources.memory")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("spec.worker.resources.gpu") && m.contains("unknown field")), "{e:?}");
    }

    #[test]
    fn cron_is_the_schedule_trigger() {
        // Given alone, a cron schedule replaces the default trigger.
        let s =
            check(json!({"targetNamespaces": ["a"], "worker": {}, "schedule": {"cron": "*/15 * * * *"}}), Case::Camel)
                .unwrap()
                .spec;
        assert_eq!(s.triggers, Vec::<Trigger>::new());
        assert_eq!(s.schedule.cron.as_deref(), Some("*/15 * * * *"));
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:07:00Z").unwrap().to_utc();
        assert_eq!(s.schedule.next_cron_after(t0).unwrap().to_rfc3339(), "2026-11-22T10:15:00+00:00");
        // Listed with others, and with seconds.
        let s = check(
            json!({"targetNamespaces": ["a"], "worker": {}, "triggers": ["write", "schedule"],
                   "schedule": {"cron": "*/2 * * * * *"}}),
            Case::Camel,
        )
        .unwrap()
        .spec;
        assert_eq!(s.triggers, vec![Trigger::Write]);
        assert_eq!(s.schedule.next_cron_after(t0).unwrap().to_rfc3339(), "2026-11-22T10:07:02+00:00");
        // The API form serialises without "schedule" in the list, so the
        // client's models parse it.
        assert_eq!(serde_json::to_value(&s).unwrap()["triggers"], json!(["write"]));
    }

    #[test]
    fn cron_errors_name_the_field() {
        let e =
            check(json!({"targetNamespaces": ["a"], "worker": {}, "triggers": ["schedule"]}), Case::Camel).unwrap_err();
        assert_eq!(
            e,
            vec!["spec.triggers[0]: \"schedule\" needs spec.schedule.cron: a cron expression such as \"*/15 * * * *\""]
        );
        let e = check(json!({"targetNamespaces": ["a"], "worker": {}, "schedule": {"cron": "* * *"}}), Case::Camel)
            .unwrap_err();
        assert!(e[0].starts_with("spec.schedule.cron: \"* * *\" has 3 fields; expected 5"), "{e:?}");
        let e =
            check(json!({"targetNamespaces": ["a"], "worker": {}, "schedule": {"cron": "61 * * * *"}}), Case::Camel)
                .unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("spec.schedule.cron: \"61 * * * *\" is not a cron expression"), "{e:?}");
    }

    #[test]
    fn snake_case_for_the_api() {
        let s = check(json!({"target_namespaces": ["a"], "worker": {"batch_size": 7}}), Case::Snake).unwrap().spec;
        assert_eq!(s.worker.batch_size, 7);
        let e = check(json!({"target_namespaces": ["a"], "worker": {"batchSize": 7}}), Case::Snake).unwrap_err();
        assert_eq!(e, vec!["spec.worker.batchSize: unknown field, did you mean batch_size"]);
    }

    #[test]
    fn every_problem_is_reported() {
        let e = check(
            json!({
                "targetNamespaces": ["ok", "bad/ns"],
                "inputs": ["id", "_hevlayer_x"],
                "worker": {"batchSize": 0, "dispatch": "shove", "computeClass": "tpu"},
                "retry": {"initialBackoffSeconds": 10, "maxBackoffSeconds": 5},
                "triggers": ["cron"],
                "filter": ["a", "Like", 1]
            }),
            Case::Camel,
        )
        .unwrap_err();
        let joined = e.join("\n");
        for needle in [
            "spec.targetNamespaces[1]",
            "spec.inputs[1]",
            "spec.worker.batchSize: 0 is out of range",
            "spec.worker.dispatch: \"shove\" is not allowed",
            "spec.worker.computeClass",
            "spec.retry.initialBackoffSeconds",
            "spec.triggers[0]",
            "spec.filter[1]: unknown filter operator \"Like\"",
        ] {
            assert!(joined.contains(needle), "missing {needle} in:\n{joined}");
        }
    }

    #[test]
    fn lease_must_outlast_timeout() {
        let e = check(
            json!({"targetNamespaces": ["a"], "worker": {"timeoutSeconds": 60}, "schedule": {"leaseSeconds": 30}}),
            Case::Camel,
        )
        .unwrap_err();
        assert!(
            e[0].starts_with("spec.schedule.leaseSeconds: 30 must be at least spec.worker.timeoutSeconds"),
            "{e:?}"
        );
    }

    #[test]
    fn filter_on_markers_is_refused() {
        let e = check(
            json!({"targetNamespaces": ["a"], "worker": {}, "filter": ["_hevlayer_udf_a_v", "Eq", "v1"]}),
            Case::Camel,
        )
        .unwrap_err();
        assert!(e[0].contains("reserved attribute"), "{e:?}");
    }

    #[test]
    fn push_needs_something_to_run() {
        let e = check(json!({"targetNamespaces": ["a"], "worker": {"dispatch": "push"}}), Case::Camel).unwrap_err();
        assert!(e[0].starts_with("spec.worker: dispatch push needs one of image, command or url"), "{e:?}");
        let e = check(
            json!({"targetNamespaces": ["a"], "worker": {"dispatch": "push", "image": "x", "command": ["y"]}}),
            Case::Camel,
        )
        .unwrap_err();
        assert!(e[0].contains("exactly one of"), "{e:?}");
        let e = check(
            json!({"targetNamespaces": ["a"], "worker": {"dispatch": "push", "command": [], "env": {"PORT": "1", "1x": "y"}}}),
            Case::Camel,
        )
        .unwrap_err();
        let joined = e.join("\n");
        assert!(joined.contains("spec.worker.command: must name the program"), "{joined}");
        assert!(joined.contains("spec.worker.env.PORT: set by the runner"), "{joined}");
        assert!(joined.contains("spec.worker.env.1x: not an environment variable name"), "{joined}");
    }

    #[test]
    fn selector_matching() {
        let s = check(
            json!({"indexSelector": {"matchLabels": {"team": "shop"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold"]}]}, "worker": {}}),
            Case::Camel,
        )
        .unwrap()
        .spec;
        let sel = s.index_selector.unwrap();
        let mut labels = BTreeMap::from([("team".to_string(), "shop".to_string())]);
        assert!(!sel.matches(&labels));
        labels.insert("tier".into(), "gold".into());
        assert!(sel.matches(&labels));
    }

    #[test]
    fn markers_normalise_hyphens() {
        assert_eq!(FunctionSpec::marker_attribute("product-color"), "_hevlayer_udf_product_color_v");
    }

    #[test]
    fn diff_names_changed_paths() {
        let a = json!({"version": "v1", "worker": {"batch_size": 32, "image": "x"}});
        let b = json!({"version": "v2", "worker": {"batch_size": 32}});
        assert_eq!(changed_paths(&a, &b), vec!["version", "worker.image"]);
    }
}
