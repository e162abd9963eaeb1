//! An embedded PostgreSQL for `layer dev` and the test harness: finds the
//! server binaries, initialises a cluster on first start, runs it on a Unix
//! socket only, and stops it cleanly.
//!
//! `initdb` refuses to run as root, so when we are root the cluster is owned
//! by and run as an unprivileged user (`postgres` if it exists, else `nobody`;
//! `LAYER_PG_USER` overrides).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid, User, chown};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::process::{Child, Command};

use crate::error::{PlatformError, Result};

/// The database the platform uses inside the embedded cluster.
pub const DATABASE: &str = "layer";
/// The cluster's superuser.
pub const SUPERUSER: &str = "layer";

/// Where and how to run the embedded server.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// The cluster lives in `data_dir/pg`; its log in `data_dir/postgres.log`.
    pub data_dir: PathBuf,
    /// Names the socket file (`.s.PGSQL.<port>`); nothing listens on TCP.
    pub port: u16,
    /// Trade durability for speed (tests): fsync and synchronous commit off.
    pub ephemeral: bool,
}

/// A running embedded server. Call [`EmbeddedPostgres::stop`] to shut it down.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    socket_dir: PathBuf,
    port: u16,
    pid: Pid,
    child: Option<Child>,
    log_path: PathBuf,
}

/// Finds the directory holding `initdb` and `postgres`: `LAYER_PG_BINDIR`,
/// then `PATH`, then `pg_config --bindir`, then the Debian layout
/// (`/usr/lib/postgresql/<version>/bin`, newest first).
pub fn find_bindir() -> Result<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("LAYER_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_both(&dir) {
            return Ok(dir);
        }
        return Err(PlatformError::Setup(format!(
            "LAYER_PG_BINDIR={} does not contain initdb and postgres",
            dir.display()
        )));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                // Resolve symlinks so initdb finds its sibling programs.
                let real = std::fs::canonicalize(dir.join("initdb")).ok();
                return Ok(real.and_then(|r| r.parent().map(Path::to_path_buf)).unwrap_or(dir));
            }
        }
    }
    if let Ok(out) = std::process::Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_both(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_both(d))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    Err(PlatformError::Setup(
        "PostgreSQL server binaries (initdb, postgres) were not found on PATH, by pg_config, or under \
         /usr/lib/postgresql. Install the server: `apt-get install postgresql` (Debian/Ubuntu), \
         `dnf install postgresql-server` (Fedora), `brew install postgresql@16` (macOS); or set \
         LAYER_PG_BINDIR to the directory holding initdb and postgres, or run `layer platform \
         --database-url` against a server you already have."
            .into(),
    ))
}

/// The user the server runs as: ourselves, or when we are root an
/// unprivileged account.
fn server_user() -> Result<Option<User>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let wanted = std::env::var("LAYER_PG_USER").ok();
    let candidates: Vec<&str> = match &wanted {
        Some(u) => vec![u.as_str()],
        None => vec!["postgres", "nobody"],
    };
    for name in candidates {
        if let Ok(Some(u)) = User::from_name(name) {
            return Ok(Some(u));
        }
    }
    Err(PlatformError::Setup(
        "running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as \
         (initdb refuses root); create one or set LAYER_PG_USER"
            .into(),
    ))
}

/// Checks that `user` (the account the server runs as) can enter every
/// directory on the way to `dir`, before anything is initialised; if not,
/// says which directories stop it and what to run.
///
/// Permission bits only (owner, then the user's groups, then others), as
/// the kernel checks them for a user without capabilities.
fn check_reachable(dir: &Path, user: &User) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let groups: Vec<u32> = std::ffi::CString::new(user.name.as_str())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![user.gid.as_raw()]);
    // (directory, mode, owner, the chmod class that lets the user through)
    let mut blocked: Vec<(PathBuf, u32, u32, char)> = Vec::new();
    let mut path = PathBuf::new();
    for part in dir.components() {
        path.push(part);
        let Ok(meta) = std::fs::metadata(&path) else { break };
        let (bit, class) = if meta.uid() == user.uid.as_raw() {
            (0o100, 'u')
        } else if groups.contains(&meta.gid()) {
            (0o010, 'g')
        } else {
            (0o001, 'o')
        };
        if meta.mode() & bit == 0 {
            blocked.push((path.clone(), meta.mode() & 0o7777, meta.uid(), class));
        }
    }
    if blocked.is_empty() {
        return Ok(());
    }
    let owner =
        |uid: u32| User::from_uid(Uid::from_raw(uid)).ok().flatten().map(|u| u.name).unwrap_or_else(|| uid.to_string());
    let which: Vec<String> = blocked
        .iter()
        .map(|(p, mode, uid, _)| format!("{} (mode {mode:04o}, owner {})", p.display(), owner(*uid)))
        .collect();
    let mut fix = String::new();
    for class in ['u', 'g', 'o'] {
        let dirs: Vec<String> = blocked.iter().filter(|b| b.3 == class).map(|b| b.0.display().to_string()).collect();
        if !dirs.is_empty() {
            fix.push_str(&format!("\n  chmod {class}+x {}", dirs.join(" ")));
        }
    }
    Err(PlatformError::Setup(format!(
        "PostgreSQL runs as user {name} here (initdb refuses root), and {name} cannot enter {which} on the way \
         to the data directory {dir}; nothing was initialised. Either let it through ({class}+x lets it pass, \
         not list):\n{fix}\n\nor keep the data where it can reach, for example:\n\n  --data-dir /var/tmp/layer-dev",
        name = user.name,
        which = which.join(", "),
        dir = dir.display(),
        class = blocked[0].3,
    )))
}

fn setup_err(what: &str, e: impl std::fmt::Display) -> PlatformError {
    PlatformError::Setup(format!("{what}: {e}"))
}

/// A socket directory whose path fits in `sun_path` (107 bytes with the file name).
fn socket_dir_for(data_dir: &Path) -> PathBuf {
    let preferred = data_dir.join("run");
    if preferred.as_os_str().len() < 80 {
        return preferred;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    std::env::temp_dir().join(format!("layer-pg-{}", &hex::encode(digest)[..16]))
}

fn own(path: &Path, user: Option<&User>) -> Result<()> {
    if let Some(u) = user {
        chown(path, Some(u.uid), Some(u.gid)).map_err(|e| setup_err(&format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| setup_err(&format!("chmod {}", path.display()), e))
}

fn command(bin: PathBuf, user: Option<&User>) -> Command {
    let mut cmd = Command::new(bin);
    if let Some(u) = user {
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        cmd.env("HOME", &u.dir);
    }
    cmd.env_remove("PGDATA").env_remove("PGHOST").env_remove("PGPORT");
    cmd
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl EmbeddedPostgres {
    /// Initialises the cluster if needed, starts the server (or adopts one a
    /// crashed run left behind), waits until it accepts connections, and
    /// creates the `layer` database.
    pub async fn start(opts: EmbeddedOptions) -> Result<Self> {
        let bindir = find_bindir()?;
        let user = server_user()?;
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(|e| setup_err(&format!("cannot create {}", opts.data_dir.display()), e))?;
        let data_dir = std::fs::canonicalize(&opts.data_dir).map_err(|e| setup_err("data dir", e))?;
        if let Some(u) = &user {
            check_reachable(&data_dir, u)?;
        }
        let pgdata = data_dir.join("pg");
        let log_path = data_dir.join("postgres.log");
        let socket_dir = socket_dir_for(&data_dir);

        if !pgdata.join("PG_VERSION").is_file() {
            std::fs::create_dir_all(&pgdata).map_err(|e| setup_err("create pg dir", e))?;
            own(&pgdata, user.as_ref())?;
            set_mode(&pgdata, 0o700)?;
            tracing::info!(dir = %pgdata.display(), "initialising PostgreSQL cluster");
            let out = command(bindir.join("initdb"), user.as_ref())
                .arg("-D")
                .arg(&pgdata)
                .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-instructions"])
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(|e| setup_err("cannot run initdb", e))?;
            if !out.status.success() {
                let hint = if user.is_some() {
                    format!(
                        " (initdb runs as user {}; every directory above {} must be readable by it)",
                        user.as_ref().map(|u| u.name.as_str()).unwrap_or_default(),
                        pgdata.display()
                    )
                } else {
                    String::new()
                };
                return Err(PlatformError::Setup(format!(
                    "initdb failed{hint}: {}{}",
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&out.stdout)
                )));
            }
        }
        std::fs::create_dir_all(&socket_dir).map_err(|e| setup_err("create socket dir", e))?;
        own(&socket_dir, user.as_ref())?;
        set_mode(&socket_dir, 0o700)?;

        let mut server = match Self::running_postmaster(&pgdata) {
            Some(pid) => {
                tracing::warn!(pid = pid.as_raw(), "adopting a PostgreSQL server left running by an earlier run");
                EmbeddedPostgres { socket_dir, port: opts.port, pid, child: None, log_path }
            }
            None => {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .map_err(|e| setup_err("open postgres.log", e))?;
                let mut cmd = command(bindir.join("postgres"), user.as_ref());
                cmd.arg("-D")
                    .arg(&pgdata)
                    .arg("-k")
                    .arg(&socket_dir)
                    .args(["-p", &opts.port.to_string(), "-c", "listen_addresses=", "-c", "max_connections=200"])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().map_err(|e| setup_err("log", e))?)
                    .stderr(log)
                    // Its own process group: a Ctrl-C in the terminal reaches
                    // us, and we stop the server in order.
                    .process_group(0)
                    .kill_on_drop(false);
                if opts.ephemeral {
                    cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]);
                }
                let child = cmd.spawn().map_err(|e| setup_err("cannot start postgres", e))?;
                let pid = Pid::from_raw(child.id().unwrap_or_default() as i32);
                EmbeddedPostgres { socket_dir, port: opts.port, pid, child: Some(child), log_path }
            }
        };
        server.wait_ready().await?;
        server.ensure_database().await?;
        Ok(server)
    }

    /// The pid in `postmaster.pid`, if that process is alive.
    fn running_postmaster(pgdata: &Path) -> Option<Pid> {
        let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
        let pid = Pid::from_raw(text.lines().next()?.trim().parse().ok()?);
        kill(pid, None).ok().map(|_| pid)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(PlatformError::Setup(format!(
                    "postgres exited during start-up ({status}); the end of {}:\n{}",
                    self.log_path.display(),
                    tail(&self.log_path, 20)
                )));
            }
            match self.options("postgres").connect().await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(PlatformError::Setup(format!(
                        "postgres did not accept connections within 60 s ({e}); the end of {}:\n{}",
                        self.log_path.display(),
                        tail(&self.log_path, 20)
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn ensure_database(&self) -> Result<()> {
        let mut conn = self.options("postgres").connect().await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DATABASE)
            .fetch_one(&mut conn)
            .await?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {DATABASE}")).execute(&mut conn).await?;
        }
        conn.close().await?;
        Ok(())
    }

    /// Connection options for a database of this server, over its socket.
    pub fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new().socket(&self.socket_dir).port(self.port).username(SUPERUSER).database(database)
    }

    /// A `postgres://` URL for a database of this server (for tools and tests).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@localhost:{}/{database}?host={}", self.port, self.socket_dir.display())
    }

    /// Fast shutdown: disconnects clients, checkpoints, exits. Waits for it.
    pub async fn stop(mut self) -> Result<()> {
        let _ = kill(self.pid, Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let gone = match &mut self.child {
                Some(child) => matches!(child.try_wait(), Ok(Some(_))),
                None => kill(self.pid, None).is_err(),
            };
            if gone {
                return Ok(());
            }
            if Instant::now() > deadline {
                tracing::warn!("postgres did not stop within 30 s; sending SIGQUIT");
                let _ = kill(self.pid, Signal::SIGQUIT);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
