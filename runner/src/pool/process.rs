//! The process driver: a push worker as a local child process.
//!
//! The child gets `PORT` and the worker environment, runs in its own process
//! group (so stopping it stops what it started), and is ready once
//! `GET /healthz` answers 200. Its output goes to the runner's log, one line
//! per event, tagged with the worker.
//!
//! A worker dies with its runner, however the runner ends (`kill -9`
//! included): on Linux the child asks the kernel for SIGKILL when its
//! parent goes (`PR_SET_PDEATHSIG`). The kernel means the parent *thread*:
//! the signal comes when the thread that forked the child exits. Tokio's
//! blocking threads come and go, so every worker is forked on one thread
//! kept for the life of the process ([`spawn_tied_to_runner`]).

use std::process::Stdio;
use std::time::Duration;

use layer_protocol::runner::WorkerPlan;

use super::Launch;
use crate::gpu::GpuBinding;
use crate::logs::WorkerLog;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// Environment every worker gets, beside `PORT` and the spec's own `env`.
#[derive(Debug, Clone, Default)]
pub struct WorkerEnv {
    pub udf_id: String,
    pub platform_url: String,
    pub api_key: Option<String>,
}

impl WorkerEnv {
    /// The worker environment of DESIGN.md, whatever the driver: `PORT`
    /// (where the worker listens), the `HEVLAYER_*` variables and
    /// `LAYER_GATEWAY_API_KEY`. They win over the spec's `env`.
    pub fn vars(&self, plan: &WorkerPlan, port: u16) -> [(&'static str, String); 7] {
        [
            ("PORT", port.to_string()),
            ("HEVLAYER_UDF_ID", self.udf_id.clone()),
            ("HEVLAYER_BASE_URL", self.platform_url.clone()),
            ("HEVLAYER_UDF_BATCH_SIZE", plan.batch_size.to_string()),
            ("HEVLAYER_UDF_TIMEOUT_SECONDS", plan.timeout_seconds.to_string()),
            ("HEVLAYER_UDF_LEASE_SECONDS", plan.lease_seconds.to_string()),
            ("LAYER_GATEWAY_API_KEY", self.api_key.clone().unwrap_or_default()),
        ]
    }
}

/// The GPUs a worker may see: those bound to it, by UUID, for CUDA and for
/// the NVIDIA container runtime. Empty, the worker sees none.
pub fn gpu_vars(gpus: &GpuBinding) -> [(&'static str, String); 2] {
    let list = gpus.uuids().join(",");
    [
        ("CUDA_VISIBLE_DEVICES", list.clone()),
        ("NVIDIA_VISIBLE_DEVICES", if list.is_empty() { "void".into() } else { list }),
    ]
}

/// A started, ready worker process.
#[derive(Debug)]
pub struct ProcessWorker {
    pub name: String,
    pub pid: u32,
    pub port: u16,
    child: Child,
    /// Given back once the process has exited.
    pub gpus: GpuBinding,
}

/// Work for the spawner thread.
type SpawnJob = Box<dyn FnOnce() + Send>;

/// The thread every worker process is forked on. Its sender lives in a
/// static, so the thread runs until the process exits, and the workers'
/// parent-death signal fires exactly when the runner's process ends.
fn spawner() -> &'static std::sync::mpsc::Sender<SpawnJob> {
    static SPAWNER: std::sync::OnceLock<std::sync::mpsc::Sender<SpawnJob>> = std::sync::OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        let started = std::thread::Builder::new().name("layer-worker-spawner".into()).spawn(move || {
            for job in rx {
                job();
            }
        });
        // Without the thread its receiver is gone: every spawn then fails
        // with "the worker spawner thread has stopped".
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start the worker spawner thread: no worker process can start");
        }
        tx
    })
}

/// Starts `cmd` so that it dies with the runner: `PR_SET_PDEATHSIG` with
/// SIGKILL, set in the child between fork and exec, with the fork done on
/// the [`spawner`] thread (see the module's documentation). A runner that
/// died between the fork and the `prctl` would send no signal, so the
/// child checks that its parent is still the runner and gives up if not.
async fn spawn_tied_to_runner(mut cmd: Command) -> std::io::Result<Child> {
    die_with_parent(&mut cmd);
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: SpawnJob = Box::new(move || {
        // The child's reaper belongs to the runtime the worker is used from.
        let _entered = runtime.enter();
        let _ = tx.send(cmd.spawn());
    });
    spawner().send(job).map_err(|_| std::io::Error::other("the worker spawner thread has stopped"))?;
    rx.await.map_err(|_| std::io::Error::other("the worker spawner thread dropped the spawn"))?
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use nix::sys::prctl;
    use nix::unistd::getppid;
    let runner = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes two system calls
    // (prctl, getppid) and builds an io::Error from an errno, which does
    // not allocate. It touches no lock and no state of the parent.
    unsafe {
        cmd.pre_exec(move || {
            prctl::set_pdeathsig(Signal::SIGKILL)?;
            if getppid() != runner {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// Elsewhere there is no parent-death signal: a runner killed outright
/// leaves its workers running.
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// The lowest port the kernel hands out for outbound connections (and for
/// listeners bound to port 0): Linux's `ip_local_port_range`, else its
/// default.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A port for a worker to listen on, checked free by binding it.
///
/// Why not port 0: between this check and the worker's own bind the port
/// is free, and a port from the kernel's ephemeral range can be taken in
/// that moment by any outbound connection on the host (the runner's own
/// calls among them); the worker then dies with "address in use" and its
/// start is charged to the Function. A port drawn at random from the half
/// range below the ephemeral one is only taken by another listener that
/// asks for it by number.
fn free_port() -> std::io::Result<u16> {
    let high = ephemeral_low();
    let low = high / 2;
    if low >= 1024 {
        for _ in 0..64 {
            let port = rand::random_range(low..high);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Sends a worker's output lines to the runner's log and the worker's
/// [`WorkerLog`]; with `last`, the log ends with the stream.
fn forward_lines(name: String, log: WorkerLog, stream: impl AsyncRead + Unpin + Send + 'static, last: bool) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "layer_worker", worker = %name, "{line}");
            log.push(&line);
        }
        if last {
            log.end();
        }
    });
}

impl ProcessWorker {
    /// Starts the worker and waits until it is ready, it exits, or
    /// `startup` passes. The error says which.
    pub async fn start(
        plan: &WorkerPlan,
        env: &WorkerEnv,
        launch: Launch,
        http: &reqwest::Client,
        startup: Duration,
    ) -> Result<ProcessWorker, String> {
        let Launch { name, gpus, log } = launch;
        let argv = plan.command.as_deref().filter(|c| !c.is_empty()).ok_or("the Function has no worker.command")?;
        let port = free_port().map_err(|e| format!("no free port for the worker: {e}"))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            // The runner's own key is not the worker's.
            .env_remove("LAYER_API_KEY")
            .envs(&plan.env)
            .envs(env.vars(plan, port))
            .envs(gpu_vars(&gpus))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child =
            spawn_tied_to_runner(cmd).await.map_err(|e| format!("cannot start worker command {:?}: {e}", argv[0]))?;
        let pid = child.id().unwrap_or_default();
        if let Some(err) = child.stderr.take() {
            forward_lines(name.clone(), log.clone(), err, false);
        }
        if let Some(out) = child.stdout.take() {
            forward_lines(name.clone(), log, out, true);
        }
        let mut worker = ProcessWorker { name, pid, port, child, gpus };
        let base_url = worker.base_url();
        match super::wait_ready(http, &base_url, startup, || worker.exited().map(|s| s.to_string())).await {
            Ok(took) => {
                tracing::info!(worker = %worker.name, pid, port, ready_ms = took.as_millis() as u64, "worker ready");
                Ok(worker)
            }
            Err(super::NotReady::Exited(status)) => {
                Err(format!("worker command {:?} exited ({status}) before it was ready", argv[0]))
            }
            Err(super::NotReady::TimedOut) => {
                worker.stop();
                Err(format!(
                    "worker command {:?} did not answer GET /healthz with 200 within {} s",
                    argv[0],
                    startup.as_secs()
                ))
            }
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops the worker in two stages: SIGTERM to its process group, then
    /// SIGKILL after a grace period. Returns at once.
    pub fn stop(mut self) {
        let pgid = Pid::from_raw(self.pid as i32);
        if self.exited().is_some() {
            return;
        }
        let _ = killpg(pgid, Signal::SIGTERM);
        let gpus = std::mem::take(&mut self.gpus);
        tokio::spawn(async move {
            let graceful = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
            if graceful.is_err() {
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = self.child.wait().await;
            }
            // Only now may another worker have the GPUs.
            drop(gpus);
        });
    }

    /// Kills the worker and its process group at once (a timed-out call).
    pub fn kill(mut self) {
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let gpus = std::mem::take(&mut self.gpus);
        tokio::spawn(async move {
            let _ = self.child.wait().await;
            drop(gpus);
        });
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn worker_ports_are_free_and_below_the_ephemeral_range() {
        let high = super::ephemeral_low();
        for _ in 0..20 {
            let port = super::free_port().unwrap();
            assert!((high / 2..high).contains(&port), "{port} is not in {}..{high}", high / 2);
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }

    use super::*;
    use std::time::Instant;

    /// Whether the process is dead or about to be: gone, a zombie, or with
    /// SIGKILL pending.
    fn killed(pid: u32) -> bool {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return true;
        };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("");
        let sigkill_pending = |name: &str| u64::from_str_radix(field(name), 16).unwrap_or(0) & (1 << 8) != 0;
        field("State:").starts_with(['Z', 'X']) || sigkill_pending("SigPnd:") || sigkill_pending("ShdPnd:")
    }

    /// The parent-death signal follows the thread that forked: a worker
    /// asked for on a blocking thread must not die when that thread ends.
    #[test]
    fn a_worker_outlives_the_thread_that_asked_for_it() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_keep_alive(Duration::from_millis(1))
            .enable_all()
            .build()
            .unwrap();
        let (mut child, thread) = rt.block_on(async {
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                // "<pid>/task/<tid>": this thread, as /proc names it.
                let thread = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
                let mut cmd = Command::new("sleep");
                cmd.arg("60");
                let child = handle.block_on(spawn_tied_to_runner(cmd)).expect("spawn sleep");
                (child, std::path::Path::new("/proc").join(thread))
            })
            .await
            .unwrap()
        });
        let pid = child.id().expect("running");
        // Once the thread is reaped, the kernel has sent any parent-death
        // signal it was going to.
        let deadline = Instant::now() + Duration::from_secs(10);
        while thread.exists() {
            assert!(Instant::now() < deadline, "the blocking thread {} did not exit", thread.display());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!killed(pid), "the worker died with the thread that asked for it");
        rt.block_on(async {
            child.kill().await.unwrap();
        });
        assert!(killed(pid));
    }
}
