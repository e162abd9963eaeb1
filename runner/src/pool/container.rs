//! The Docker driver: a push worker as a container of `spec.worker.image`.
//!
//! The container listens on `spec.worker.port` (default 8080), published
//! on a loopback port of the node that Docker picks; it is ready once
//! `GET /healthz` answers 200. Containers are hardened whatever the image
//! asks: not privileged, every capability dropped, `no-new-privileges`, a
//! read-only root with a tmpfs at `/tmp` the worker's user may write
//! whatever the image's own `/tmp` is (see [`tmp_options`]), a pids limit, no Docker socket
//! inside, and an init as PID 1. Their output goes to the runner's log, one
//! line per event, tagged with the worker. An exit is watched: an OOM kill
//! is told apart from a crash.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use layer_protocol::runner::WorkerPlan;
use tokio_util::task::TaskTracker;

use super::Launch;
use super::process::{WorkerEnv, gpu_vars};
use crate::gpu::GpuBinding;
use crate::logs::WorkerLog;

/// The port a worker image listens on unless `spec.worker.port` says.
pub const DEFAULT_PORT: u16 = 8080;
/// The most processes (threads included) one worker container may run.
pub const PIDS_LIMIT: i64 = 512;
/// The size of the writable `/tmp` of a worker container, unless
/// `worker.resources.ephemeralDisk` says.
pub const TMP_SIZE: &str = "256m";
/// The label every worker container carries, with the runner's name.
pub const RUNNER_LABEL: &str = "com.hevlayer.layer.runner";

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub code: i64,
    /// The kernel killed it for exceeding its memory limit.
    pub oom_killed: bool,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.oom_killed {
            write!(f, "killed for exceeding its memory limit (OOM), exit code {}", self.code)
        } else {
            write!(f, "exit code {}", self.code)
        }
    }
}

/// The Docker engine a runner drives, and the settings containers get.
#[derive(Debug, Clone)]
pub struct Engine {
    pub docker: Docker,
    /// Written on every container as [`RUNNER_LABEL`].
    pub runner_name: String,
    /// Stops and removals under way, so a runner that shuts down can wait
    /// for its containers to be gone.
    pub stopping: TaskTracker,
}

impl Engine {
    /// Connects to the engine named by `DOCKER_HOST` (default: the local
    /// Unix socket), negotiates the API version and pings it. `Err` says
    /// why there is no engine; the runner then runs without the driver.
    pub async fn connect(runner_name: &str) -> Result<Engine, String> {
        let docker = Docker::connect_with_defaults().map_err(|e| format!("no Docker engine: {e}"))?;
        let docker = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
            .await
            .map_err(|_| "no Docker engine: it did not answer within 5 s".to_string())?
            .map_err(|e| format!("no Docker engine: {e}"))?;
        docker.ping().await.map_err(|e| format!("no Docker engine: {e}"))?;
        let engine = Engine { docker, runner_name: runner_name.to_string(), stopping: TaskTracker::new() };
        engine.remove_leftovers().await;
        Ok(engine)
    }

    /// Removes containers a previous run of a runner of this name left
    /// behind (it was killed before it could remove them).
    async fn remove_leftovers(&self) {
        let filters = HashMap::from([("label", vec![format!("{RUNNER_LABEL}={}", self.runner_name)])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let Ok(found) = self.docker.list_containers(Some(options)).await else {
            return;
        };
        for id in found.into_iter().filter_map(|c| c.id) {
            tracing::info!(container = %short(&id), "removing a worker container a previous run left behind");
            let _ =
                self.docker.remove_container(&id, Some(RemoveContainerOptionsBuilder::new().force(true).build())).await;
        }
    }
}

/// A started, ready worker container.
#[derive(Debug)]
pub struct ContainerWorker {
    pub name: String,
    /// The container's id.
    pub id: String,
    /// The loopback port of the node the worker's port is published on
    /// (0 for a pull worker, which publishes none).
    pub port: u16,
    docker: Docker,
    stopping: TaskTracker,
    exit: Arc<OnceLock<Exit>>,
    /// Given back once the container is removed.
    pub gpus: GpuBinding,
}

/// The user an image runs as, by number, when its `USER` gives one that is
/// not root: the owner of the worker's `/tmp` tmpfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmpOwner {
    pub uid: u32,
    pub gid: Option<u32>,
}

impl TmpOwner {
    /// Reads an image's `Config.User` (`uid`, `uid:gid`). Root, an empty
    /// user and names give `None`: root writes its own tmpfs, and a name
    /// would need the image's `/etc/passwd` (the tmpfs `mode=1777` serves
    /// named users on runtimes that honour it).
    pub fn of_image_user(user: &str) -> Option<TmpOwner> {
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user, None),
        };
        let uid: u32 = uid.parse().ok().filter(|u| *u != 0)?;
        Some(TmpOwner { uid, gid: gid.and_then(|g| g.parse().ok()) })
    }
}

/// The options of the worker's `/tmp` tmpfs. `mode=1777` (sticky, everyone
/// writes) is what the mount should have whatever the image's own `/tmp`
/// is; but runc before 1.1.8 copies the image directory's mode onto the
/// tmpfs after mounting it (opencontainers/runc#3911), so over an image
/// whose `/tmp` is root's 0700 a non-root worker could still write
/// nowhere. The tmpfs is therefore also owned by the image's user when
/// its `USER` is numeric: then that user writes it under either runc.
pub fn tmp_options(plan: &WorkerPlan, owner: Option<TmpOwner>) -> String {
    let size = plan.ephemeral_disk_bytes.map_or_else(|| TMP_SIZE.to_string(), |b| b.to_string());
    let mut options = format!("rw,noexec,nosuid,nodev,size={size},mode=1777");
    if let Some(o) = owner {
        options.push_str(&format!(",uid={}", o.uid));
        if let Some(g) = o.gid {
            options.push_str(&format!(",gid={g}"));
        }
    }
    options
}

/// The container's hardened host settings, with the plan's limits, the
/// GPUs bound to it (a device request for the NVIDIA runtime, by UUID)
/// and a `/tmp` its user may write ([`tmp_options`]).
/// A push worker's `port` is published on a loopback port of the node; a
/// pull worker (`None`) publishes nothing.
pub fn host_config(plan: &WorkerPlan, port: Option<u16>, gpus: &[String], tmp_owner: Option<TmpOwner>) -> HostConfig {
    let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) };
    HostConfig {
        port_bindings: port.map(|port| HashMap::from([(format!("{port}/tcp"), Some(vec![binding]))])),
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([("/tmp".to_string(), tmp_options(plan, tmp_owner))])),
        pids_limit: Some(PIDS_LIMIT),
        // An init as PID 1 passes SIGTERM on: a worker that installs no
        // handler still stops at once instead of after the grace period.
        init: Some(true),
        memory: plan.memory_bytes.map(|b| b as i64),
        // No swap: a worker over its memory is killed, not slowed down.
        memory_swap: plan.memory_bytes.map(|b| b as i64),
        nano_cpus: plan.cpu.map(|c| (c * 1e9) as i64),
        device_requests: (!gpus.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                device_ids: Some(gpus.to_vec()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        }),
        ..Default::default()
    }
}

impl ContainerWorker {
    /// Creates and starts a push worker's container and waits until it is
    /// ready, it exits, or `startup` passes. The error says which.
    pub async fn start(
        engine: &Engine,
        plan: &WorkerPlan,
        env: &WorkerEnv,
        launch: Launch,
        http: &reqwest::Client,
        startup: Duration,
    ) -> Result<ContainerWorker, String> {
        let port = plan.port.unwrap_or(DEFAULT_PORT);
        let worker = Self::spawn(engine, plan, env, launch, Some(port)).await?;
        let image = plan.image.clone().unwrap_or_default();
        let exit = worker.exit.clone();
        match super::wait_ready(http, &worker.base_url(), startup, || exit.get().map(Exit::to_string)).await {
            Ok(took) => {
                tracing::info!(worker = %worker.name, container = %short(&worker.id), port = worker.port,
                    ready_ms = took.as_millis() as u64, "worker container ready");
                Ok(worker)
            }
            Err(super::NotReady::Exited(how)) => {
                worker.kill();
                Err(format!("the container of image {image:?} stopped ({how}) before it was ready"))
            }
            Err(super::NotReady::TimedOut) => {
                worker.kill();
                Err(format!(
                    "the container of image {image:?} did not answer GET /healthz on port {port} with 200 within {} s",
                    startup.as_secs()
                ))
            }
        }
    }

    /// Creates and starts a pull worker's container: it publishes no port
    /// and is running once started; it claims its own work.
    pub async fn start_pull(
        engine: &Engine,
        plan: &WorkerPlan,
        env: &WorkerEnv,
        launch: Launch,
    ) -> Result<ContainerWorker, String> {
        let worker = Self::spawn(engine, plan, env, launch, None).await?;
        tracing::info!(worker = %worker.name, container = %short(&worker.id), "pull worker container started");
        Ok(worker)
    }

    /// Creates and starts the container, publishing `port` if given, and
    /// watches its exit and output.
    async fn spawn(
        engine: &Engine,
        plan: &WorkerPlan,
        env: &WorkerEnv,
        launch: Launch,
        port: Option<u16>,
    ) -> Result<ContainerWorker, String> {
        let Launch { name, gpus, log } = launch;
        let image = plan.image.as_deref().filter(|i| !i.is_empty()).ok_or("the Function has no worker.image")?;
        // Later entries win in Docker, as with the process driver. A pull
        // worker gets no PORT.
        let vars: Vec<String> = plan
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(
                env.vars(plan, port.unwrap_or_default())
                    .into_iter()
                    .filter(|(k, _)| port.is_some() || *k != "PORT")
                    .map(|(k, v)| format!("{k}={v}")),
            )
            .chain(gpu_vars(&gpus).into_iter().map(|(k, v)| format!("{k}={v}")))
            .collect();
        // The image's user owns the /tmp tmpfs (see tmp_options). An image
        // that cannot be inspected fails at create, with Docker's message.
        let tmp_owner = match engine.docker.inspect_image(image).await {
            Ok(info) => info.config.and_then(|c| c.user).as_deref().and_then(TmpOwner::of_image_user),
            Err(_) => None,
        };
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            env: Some(vars),
            exposed_ports: port.map(|port| vec![format!("{port}/tcp")]),
            labels: Some(HashMap::from([
                (RUNNER_LABEL.to_string(), engine.runner_name.clone()),
                ("com.hevlayer.layer.worker".to_string(), name.clone()),
                ("com.hevlayer.layer.udf".to_string(), env.udf_id.clone()),
                ("com.hevlayer.layer.dispatch".to_string(), if port.is_some() { "push" } else { "pull" }.to_string()),
            ])),
            host_config: Some(host_config(plan, port, gpus.uuids(), tmp_owner)),
            ..Default::default()
        };
        let docker = &engine.docker;
        let container_name = format!("layer-{}", sanitize(&name));
        let created = docker
            .create_container(Some(CreateContainerOptionsBuilder::new().name(&container_name).build()), body)
            .await
            .map_err(|e| format!("cannot create a container of image {image:?}: {}", docker_message(&e)))?;
        let id = created.id;
        let remove = |docker: &Docker, id: &str| {
            let (docker, id) = (docker.clone(), id.to_string());
            engine.stopping.spawn(async move {
                let _ =
                    docker.remove_container(&id, Some(RemoveContainerOptionsBuilder::new().force(true).build())).await;
            });
        };
        if let Err(e) = docker.start_container(&id, None).await {
            remove(docker, &id);
            return Err(format!("cannot start a container of image {image:?}: {}", docker_message(&e)));
        }
        let host_port = match port {
            Some(port) => match published_port(docker, &id, port).await {
                Ok(p) => p,
                Err(e) => {
                    remove(docker, &id);
                    return Err(e);
                }
            },
            None => 0,
        };
        let exit = Arc::new(OnceLock::new());
        watch_exit(docker.clone(), id.clone(), exit.clone());
        forward_logs(docker.clone(), id.clone(), name.clone(), log);
        Ok(ContainerWorker {
            name,
            id,
            port: host_port,
            docker: docker.clone(),
            stopping: engine.stopping.clone(),
            exit,
            gpus,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How the container ended, once it has.
    pub fn exited(&self) -> Option<Exit> {
        self.exit.get().cloned()
    }

    /// Stops the container (SIGTERM, SIGKILL after 2 s) and removes it.
    /// Returns at once.
    pub fn stop(self) {
        let (docker, id, gpus) = (self.docker, self.id, self.gpus);
        self.stopping.spawn(async move {
            let _ = docker.stop_container(&id, Some(StopContainerOptionsBuilder::new().t(2).build())).await;
            let _ = docker.remove_container(&id, Some(RemoveContainerOptionsBuilder::new().force(true).build())).await;
            // Only now may another worker have the GPUs.
            drop(gpus);
        });
    }

    /// Kills and removes the container at once (a timed-out call).
    pub fn kill(self) {
        let (docker, id, gpus) = (self.docker, self.id, self.gpus);
        self.stopping.spawn(async move {
            let _ = docker.remove_container(&id, Some(RemoveContainerOptionsBuilder::new().force(true).build())).await;
            drop(gpus);
        });
    }
}

/// A container name from a worker name: Docker allows `[a-zA-Z0-9_.-]`.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' }).collect()
}

/// A container id as Docker shows it: its first 12 characters.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The engine's own message, without bollard's wrapping.
fn docker_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, message } => {
            format!("{message} (HTTP {status_code})")
        }
        other => other.to_string(),
    }
}

/// The node port Docker published the container's `port` on.
async fn published_port(docker: &Docker, id: &str, port: u16) -> Result<u16, String> {
    let info = docker.inspect_container(id, None).await.map_err(|e| format!("cannot inspect container: {e}"))?;
    info.network_settings
        .and_then(|n| n.ports)
        .and_then(|ports| ports.get(&format!("{port}/tcp")).cloned().flatten())
        .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port?.parse().ok()))
        .ok_or_else(|| format!("the container's port {port} was not published"))
}

/// Records how the container ends: its exit code and whether it was OOM
/// killed (read before the container is removed).
fn watch_exit(docker: Docker, id: String, exit: Arc<OnceLock<Exit>>) {
    tokio::spawn(async move {
        let mut waits = docker.wait_container(&id, None);
        // A non-zero exit arrives as an error carrying the code.
        let code = match waits.next().await {
            Some(Ok(r)) => r.status_code,
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            _ => -1,
        };
        let oom_killed = match docker.inspect_container(&id, None).await {
            Ok(info) => info.state.and_then(|s| s.oom_killed).unwrap_or(false),
            Err(_) => false,
        };
        let _ = exit.set(Exit { code, oom_killed });
    });
}

/// Sends the container's output lines to the runner's log and the
/// worker's [`WorkerLog`], which ends with the stream.
fn forward_logs(docker: Docker, id: String, name: String, log: WorkerLog) {
    tokio::spawn(async move {
        let options = LogsOptionsBuilder::new().follow(true).stdout(true).stderr(true).build();
        let mut logs = docker.logs(&id, Some(options));
        while let Some(Ok(chunk)) = logs.next().await {
            let bytes = chunk.into_bytes();
            for line in String::from_utf8_lossy(&bytes).lines() {
                tracing::info!(target: "layer_worker", worker = %name, "{line}");
                log.push(line);
            }
        }
        log.end();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> WorkerPlan {
        serde_json::from_value(serde_json::json!({
            "batch_size": 1, "timeout_seconds": 1, "lease_seconds": 1, "replicas_min": 0, "replicas_max": 1
        }))
        .unwrap()
    }

    #[test]
    fn tmp_is_a_tmpfs_everyone_may_write_owned_by_the_images_user() {
        let mut plan = plan();
        let tmpfs = host_config(&plan, Some(8080), &[], None).tmpfs.unwrap();
        assert_eq!(tmpfs.keys().collect::<Vec<_>>(), ["/tmp"]);
        let options: Vec<&str> = tmpfs["/tmp"].split(',').collect();
        assert_eq!(options, ["rw", "noexec", "nosuid", "nodev", "size=256m", "mode=1777"], "{tmpfs:?}");
        plan.ephemeral_disk_bytes = Some(1 << 30);
        let owner = TmpOwner::of_image_user("65534:65534");
        let tmpfs = host_config(&plan, Some(8080), &[], owner).tmpfs.unwrap();
        assert_eq!(tmpfs["/tmp"], format!("rw,noexec,nosuid,nodev,size={},mode=1777,uid=65534,gid=65534", 1u64 << 30));
    }

    #[test]
    fn only_a_numeric_non_root_user_owns_the_tmpfs() {
        assert_eq!(TmpOwner::of_image_user("1000"), Some(TmpOwner { uid: 1000, gid: None }));
        assert_eq!(TmpOwner::of_image_user("1000:50"), Some(TmpOwner { uid: 1000, gid: Some(50) }));
        assert_eq!(TmpOwner::of_image_user("1000:staff"), Some(TmpOwner { uid: 1000, gid: None }));
        for none in ["", "0", "0:0", "root", "app", "app:app"] {
            assert_eq!(TmpOwner::of_image_user(none), None, "{none:?}");
        }
    }

    #[test]
    fn gpus_become_a_device_request_by_uuid() {
        let plan = plan();
        assert!(host_config(&plan, Some(8080), &[], None).device_requests.is_none(), "no GPU, no request");
        let gpus = ["GPU-a".to_string(), "GPU-b".to_string()];
        let r = host_config(&plan, Some(8080), &gpus, None).device_requests.unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(r[0].device_ids.as_deref(), Some(&gpus[..]));
        assert_eq!(r[0].capabilities, Some(vec![vec!["gpu".to_string()]]));
        assert_eq!(r[0].count, None, "the UUIDs, not a count");
    }
}
