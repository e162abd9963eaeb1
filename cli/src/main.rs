//! `layer`: the one binary. `dev` and `platform` run the control plane; the
//! other commands talk to it over the REST API (`LAYER_URL`, `LAYER_API_KEY`).
//!
//! Client commands write through [`out!`] and [`note!`], which return an
//! error where `println!` would panic: a closed pipe (`layer ... | head`)
//! ends the command quietly.

/// `println!` to standard output that returns the write's error (see
/// `commands::write_line`) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => { $crate::commands::write_line(::std::io::stdout(), format_args!($($arg)*)) };
}

/// `eprintln!` to standard error, likewise.
macro_rules! note {
    ($($arg:tt)*) => { $crate::commands::write_line(::std::io::stderr(), format_args!($($arg)*)) };
}

mod client;
mod commands;
mod run;
mod serve;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "layer", version, about = "Run functions over the rows of an index, reliably.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the platform is, for client commands.
#[derive(Args, Clone)]
struct Remote {
    /// The platform's base URL.
    #[arg(long, env = "LAYER_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// The API key (sent as a bearer token).
    #[arg(long, env = "LAYER_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Print raw JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum RunnersCommand {
    /// Runners with their state, capacity, load and warm workers.
    List,
}

#[derive(Subcommand)]
enum Command {
    /// Everything on one machine: an embedded PostgreSQL and the platform.
    Dev {
        /// The address the platform's API listens on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Holds the PostgreSQL cluster and its log; reused on the next start.
        #[arg(long, default_value = ".layer")]
        data_dir: PathBuf,
        /// The admin key to install at first start (else one is minted and printed).
        #[arg(long, env = "LAYER_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// A platform replica against an existing PostgreSQL.
    Platform {
        /// The PostgreSQL to use: postgres://user@host/db, or ?host=/socket/dir.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// The address the API listens on.
        #[arg(long, env = "LAYER_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Connections this replica may hold.
        #[arg(long, env = "LAYER_MAX_CONNECTIONS", default_value_t = 16)]
        max_connections: u32,
        /// Largest accepted request body, in bytes.
        #[arg(long, env = "LAYER_MAX_BODY_BYTES", default_value_t = 64 << 20)]
        max_body_bytes: usize,
        /// The admin key to install when the database has no keys.
        #[arg(long, env = "LAYER_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// How long finished batch records are kept.
        #[arg(long, env = "LAYER_BATCH_RETENTION_HOURS", default_value_t = 168)]
        batch_retention_hours: u64,
        /// How long the records of calls are kept after they ended.
        #[arg(long, env = "LAYER_CALL_RETENTION_HOURS", default_value_t = 168)]
        call_retention_hours: u64,
        /// How long a lost or deregistered runner stays in the runner list
        /// (at least 1; its batch records stay for their own retention).
        #[arg(long, env = "LAYER_RUNNER_RETENTION_HOURS", default_value_t = 24)]
        runner_retention_hours: u64,
    },
    /// A node runner: takes batches of push Functions and runs their workers.
    Runner {
        /// The platform's base URL.
        #[arg(long, env = "LAYER_URL", default_value = "http://127.0.0.1:8080")]
        platform: String,
        /// An API key with the `runner` claim or the admin scope.
        #[arg(long, env = "LAYER_API_KEY", hide_env_values = true)]
        api_key: String,
        /// The address this runner listens on for the platform's batches.
        #[arg(long, env = "LAYER_RUNNER_LISTEN", default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// The URL the platform reaches this runner at (default: http://<listen>).
        #[arg(long, env = "LAYER_RUNNER_ADVERTISE")]
        advertise: Option<String>,
        /// The runner's name (default: $HOSTNAME).
        #[arg(long)]
        name: Option<String>,
        /// Labels matched against compute pools' node selectors: k=v,k2=v2.
        #[arg(long)]
        labels: Vec<String>,
        /// Batches run at once (default: the CPU count, at least 2).
        #[arg(long)]
        slots: Option<u32>,
        /// Idle workers beyond replicas.min stop after this many seconds.
        #[arg(long, default_value_t = 300)]
        idle_timeout: u64,
        /// Handed to workers as LAYER_GATEWAY_API_KEY (none by default).
        #[arg(long, env = "LAYER_WORKER_API_KEY", hide_env_values = true)]
        worker_api_key: Option<String>,
        /// Do not run Functions with worker.image as containers, even where
        /// a Docker engine answers (DOCKER_HOST, else the local socket).
        #[arg(long)]
        no_docker: bool,
        /// Start Functions' worker.command as local processes on this host,
        /// with the runner's rights (off by default: only images, in
        /// containers, run here, and the platform sends no command Function).
        #[arg(long, env = "LAYER_RUNNER_ALLOW_COMMANDS", value_parser = clap::builder::BoolishValueParser::new())]
        allow_commands: bool,
        /// Pretend the node has this many GPUs instead of reading them
        /// through NVML (demos and tests on machines without one; workers
        /// see the simulated UUIDs in CUDA_VISIBLE_DEVICES).
        #[arg(long)]
        simulated_gpus: Option<u32>,
    },
    /// Runners known to the platform.
    Runners {
        #[command(subcommand)]
        command: RunnersCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Apply Function, Index and InfraRules documents (YAML or JSON; `-` reads stdin).
    Apply {
        /// A YAML or JSON file of documents (repeatable; `-` reads stdin).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Apply a file, discover its Functions' rows and watch them drain.
    Run {
        /// A YAML or JSON file of documents (repeatable; `-` reads stdin).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Give up after this many seconds (default: wait).
        #[arg(long)]
        timeout: Option<u64>,
        /// Give up when rows are left, none is processing and nothing has
        /// moved for this many seconds (0: wait regardless).
        #[arg(long, value_name = "SECONDS", default_value_t = run::DEFAULT_STALL_SECONDS)]
        stall_timeout: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Inspect and control Functions.
    Udf {
        #[command(subcommand)]
        command: UdfCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Write, read and query rows.
    Rows {
        #[command(subcommand)]
        command: RowsCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Call a Function over HTTP and print its answer (JSON in, JSON out).
    Invoke {
        /// The Function's name.
        function: String,
        /// The input: JSON, `@file.json`, or `@-` for standard input
        /// (none: no arguments).
        #[arg(short = 'd', long = "data")]
        data: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// A Function's calls, newest first; `layer calls get CALL_ID` shows one.
    #[command(args_conflicts_with_subcommands = true)]
    Calls {
        #[command(subcommand)]
        command: Option<CallsCommand>,
        /// The Function whose calls to list.
        function: Option<String>,
        /// Only calls that ended so: succeeded, failed, timed_out, rejected.
        #[arg(long)]
        status: Option<String>,
        /// Calls to show, at most.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// The recent output of a Function's workers, per worker, from every
    /// active runner.
    Logs {
        /// The Function's name.
        function: String,
        /// Lines per worker (1-500).
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: u32,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum CallsCommand {
    /// One call's record: status, timings, worker, trace.
    Get {
        /// The call's id (`Layer-Call-Id`).
        call_id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Mint a key; its token is printed once.
    Create {
        /// A name for the key, shown by `layer keys list`.
        name: String,
        /// read, write, admin or invoke (repeatable). Default: read.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Restrict the key to these namespaces (repeatable; `prefix*` allowed).
        #[arg(long = "namespace")]
        namespaces: Vec<String>,
        /// With `--scope invoke`: the Functions the key may call, and nothing
        /// else (repeatable; `prefix*` allowed).
        #[arg(long = "function")]
        functions: Vec<String>,
        /// Claims, such as `runner` (repeatable).
        #[arg(long = "claim")]
        claims: Vec<String>,
        /// Lifetime: 365d (default), 12h, 30m, or never.
        #[arg(long)]
        expires_after: Option<String>,
        /// What the key is for.
        #[arg(long)]
        description: Option<String>,
        /// Who holds the key.
        #[arg(long)]
        owner: Option<String>,
    },
    /// List keys (never their secrets).
    List {
        /// Include revoked keys.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a key: it is refused from now on.
    Revoke {
        /// The key's id, as `layer keys list` shows it.
        key_id: String,
    },
    /// Delete a key's record.
    Delete {
        /// The key's id, as `layer keys list` shows it.
        key_id: String,
    },
}

#[derive(Subcommand)]
enum UdfCommand {
    /// Functions with their version, dispatch, paused flag and targets.
    List,
    /// One Function: its spec in short, row counts and any problem running it.
    Get {
        /// The Function's name.
        name: String,
    },
    /// Every revision of a Function's spec: when, by which key, what changed.
    Revisions {
        /// The Function's name.
        name: String,
    },
    /// Stop handing out and discovering a Function's rows, until resumed.
    Pause {
        /// The Function's name.
        name: String,
    },
    /// Hand out and discover a paused Function's rows again.
    Resume {
        /// The Function's name.
        name: String,
    },
    /// Delete a Function; attributes it already wrote stay.
    Delete {
        /// The Function's name.
        name: String,
    },
    /// Put a Function's failed rows back in the queue.
    ResetFailed {
        /// The Function's name.
        name: String,
    },
    /// A push Function's batch records, newest first: runner, worker, timings, outcome, trace id.
    Batches {
        /// The Function's name.
        name: String,
        /// Only batches in this state: dispatched, reported or abandoned.
        #[arg(long)]
        state: Option<String>,
        /// Only batches sent to this runner id.
        #[arg(long)]
        runner: Option<String>,
        /// Only batches dispatched at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Batches to show, at most.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// A Function's failed rows with their attempts and last error.
    Failed {
        /// The Function's name.
        name: String,
        /// Rows to show, at most.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum RowsCommand {
    /// Upsert rows from a JSON array or JSON-lines file (`-` reads stdin).
    Upsert {
        /// The namespace to write into (created on first write).
        namespace: String,
        /// The rows: a JSON array or one JSON object a line (`-` reads stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Rows per request.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Fetch one row.
    Get {
        /// The row's namespace.
        namespace: String,
        /// The row's id.
        id: String,
    },
    /// Query rows (one JSON row per line).
    Query {
        /// The namespace to query.
        namespace: String,
        /// A JSON filter, e.g. '["category", "Eq", "outdoor"]'.
        #[arg(long)]
        filter: Option<String>,
        /// `attr`, `attr:asc` or `attr:desc`.
        #[arg(long)]
        rank_by: Option<String>,
        /// Rows to return, at most (1-10000); stderr says when more match.
        #[arg(long, default_value_t = 10)]
        top_k: i64,
        /// Comma-separated attributes to return (default: all).
        #[arg(long)]
        attributes: Option<String>,
    },
    /// List namespaces.
    Namespaces {
        /// Only namespaces whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Delete a namespace and all its rows.
    Drop {
        /// The namespace to delete.
        namespace: String,
    },
}

/// Logs to stderr and traces where the `OTEL_EXPORTER_OTLP_*` variables
/// say; the guard flushes spans when the command ends.
fn init_telemetry(service: &str) -> Result<layer_telemetry::TraceGuard> {
    layer_telemetry::init_logging();
    let export = layer_telemetry::TraceExport::from_env();
    let guard = layer_telemetry::init_traces(service, export.clone()).map_err(anyhow::Error::msg)?;
    if export != layer_telemetry::TraceExport::Off {
        tracing::info!(service, "exporting traces over OTLP/HTTP");
    }
    Ok(guard)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        // A reader that went away (`layer ... | head`) got what it wanted.
        if e.chain().any(|c| c.is::<commands::OutputClosed>()) {
            return;
        }
        let _ = writeln!(std::io::stderr(), "error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dev { listen, data_dir, api_key } => {
            let _traces = init_telemetry("layer")?;
            serve::dev(listen, data_dir, api_key).await
        }
        Command::Platform {
            database_url,
            listen,
            max_connections,
            max_body_bytes,
            api_key,
            batch_retention_hours,
            call_retention_hours,
            runner_retention_hours,
        } => {
            let _traces = init_telemetry("layer-platform")?;
            serve::platform(serve::PlatformArgs {
                database_url,
                listen,
                max_connections,
                max_body_bytes,
                api_key,
                batch_retention: std::time::Duration::from_secs(batch_retention_hours.max(1) * 3600),
                call_retention: std::time::Duration::from_secs(call_retention_hours.max(1) * 3600),
                runner_retention: std::time::Duration::from_secs(runner_retention_hours.max(1) * 3600),
            })
            .await
        }
        Command::Runner {
            platform,
            api_key,
            listen,
            advertise,
            name,
            labels,
            slots,
            idle_timeout,
            worker_api_key,
            no_docker,
            allow_commands,
            simulated_gpus,
        } => {
            let _traces = init_telemetry("layer-runner")?;
            serve::runner(serve::RunnerArgs {
                platform,
                api_key,
                listen,
                advertise,
                name,
                labels,
                slots,
                idle_timeout_seconds: idle_timeout,
                worker_api_key,
                docker: !no_docker,
                allow_commands,
                simulated_gpus,
            })
            .await
        }
        Command::Invoke { function, data, remote } => {
            let c = client::Client::new(&remote.url, remote.api_key)?;
            commands::invoke(&c, &function, data.as_deref()).await
        }
        Command::Calls { command: Some(CallsCommand::Get { call_id, remote }), .. } => {
            let c = client::Client::new(&remote.url, remote.api_key)?;
            commands::calls_get(&c, &call_id, remote.json).await
        }
        Command::Calls { command: None, function, status, limit, remote } => {
            let Some(function) = function else {
                anyhow::bail!("name a Function (`layer calls NAME`), or a call (`layer calls get CALL_ID`)");
            };
            let c = client::Client::new(&remote.url, remote.api_key)?;
            commands::calls_list(&c, &function, status.as_deref(), limit, remote.json).await
        }
        Command::Logs { function, lines, remote } => {
            let c = client::Client::new(&remote.url, remote.api_key)?;
            commands::logs(&c, &function, lines, remote.json).await
        }
        Command::Runners { command: RunnersCommand::List, remote } => {
            let c = client::Client::new(&remote.url, remote.api_key)?;
            commands::runners_list(&c, remote.json).await
        }
        Command::Apply { files, remote } => {
            let c = client::Client::new(&remote.url, remote.api_key)?;
            commands::apply(&c, &files, remote.json).await
        }
        Command::Run { files, timeout, stall_timeout, remote } => {
            let c = client::Client::new(&remote.url, remote.api_key)?;
            let stall = (stall_timeout > 0).then(|| std::time::Duration::from_secs(stall_timeout));
            run::run(&c, &files, timeout.map(std::time::Duration::from_secs), stall).await
        }
        Command::Keys { command, remote } => {
            let c = client::Client::new(&remote.url, remote.api_key)?;
            match command {
                KeysCommand::Create {
                    name,
                    scopes,
                    namespaces,
                    functions,
                    claims,
                    expires_after,
                    description,
                    owner,
                } => {
                    let k = commands::CreateKey {
                        name,
                        scopes,
                        namespaces,
                        functions,
                        claims,
                        expires_after,
                        description,
                        owner,
                    };
                    commands::keys_create(&c, k, remote.json).await
                }
                KeysCommand::List { all } => commands::keys_list(&c, all, remote.json).await,
                KeysCommand::Revoke { key_id } => commands::keys_revoke(&c, &key_id).await,
                KeysCommand::Delete { key_id } => commands::keys_delete(&c, &key_id).await,
            }
        }
        Command::Udf { command, remote } => {
            let c = client::Client::new(&remote.url, remote.api_key)?;
            match command {
                UdfCommand::List => commands::udf_list(&c, remote.json).await,
                UdfCommand::Get { name } => commands::udf_get(&c, &name, remote.json).await,
                UdfCommand::Revisions { name } => commands::udf_revisions(&c, &name, remote.json).await,
                UdfCommand::Pause { name } => commands::udf_set_paused(&c, &name, true).await,
                UdfCommand::Resume { name } => commands::udf_set_paused(&c, &name, false).await,
                UdfCommand::Delete { name } => commands::udf_delete(&c, &name).await,
                UdfCommand::ResetFailed { name } => commands::udf_reset_failed(&c, &name).await,
                UdfCommand::Batches { name, state, runner, since, limit } => {
                    let filters = commands::BatchFilters { state, runner, since, limit };
                    commands::udf_batches(&c, &name, &filters, remote.json).await
                }
                UdfCommand::Failed { name, limit } => commands::udf_failed(&c, &name, limit, remote.json).await,
            }
        }
        Command::Rows { command, remote } => {
            let c = client::Client::new(&remote.url, remote.api_key)?;
            match command {
                RowsCommand::Upsert { namespace, file, batch } => {
                    commands::rows_upsert(&c, &namespace, &file, batch).await
                }
                RowsCommand::Get { namespace, id } => commands::rows_get(&c, &namespace, &id).await,
                RowsCommand::Query { namespace, filter, rank_by, top_k, attributes } => {
                    commands::rows_query(&c, &namespace, commands::QueryArgs { filter, rank_by, top_k, attributes })
                        .await
                }
                RowsCommand::Namespaces { prefix } => commands::rows_namespaces(&c, prefix.as_deref()).await,
                RowsCommand::Drop { namespace } => commands::rows_drop(&c, &namespace).await,
            }
        }
    }
}
