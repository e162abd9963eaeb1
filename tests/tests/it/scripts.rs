//! `./test.sh` as a newcomer runs it: on a machine with no Docker at all
//! the container tests are counted as skipped, and it says why, loudly
//! (where Docker exists, the suite this runs in is the proof that they run:
//! `./test.sh` runs them all); on a full disk it refuses to start; stopped
//! with Ctrl-C, it leaves nothing behind. And `./dev.sh` as a non-root user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use layer_tests::workspace_dir;

/// A directory of links to every program on `PATH` except `docker`: this
/// machine as it would be without Docker.
fn path_without_docker(dir: &Path) -> anyhow::Result<PathBuf> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let link = bin.join(&name);
            if name.to_string_lossy().starts_with("docker") || link.symlink_metadata().is_ok() {
                continue;
            }
            std::os::unix::fs::symlink(entry.path(), &link)?;
        }
    }
    Ok(bin)
}

/// `./test.sh` with `args` on a PATH without Docker (so it builds no
/// images), in a clean environment: none of the outer nextest's variables
/// but `pass` and what picks the build (with another CARGO_INCREMENTAL, say,
/// it would build the workspace again).
fn test_sh(bin: &Path, args: &[&str], pass: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_dir().join("test.sh"));
    cmd.args(args).env_clear().env("PATH", bin).env("CARGO_TERM_COLOR", "never").current_dir(workspace_dir());
    let build =
        ["HOME", "CARGO_HOME", "RUSTUP_HOME", "RUSTUP_TOOLCHAIN", "CARGO_INCREMENTAL", "CARGO_TARGET_DIR", "RUSTFLAGS"];
    for var in build.iter().chain(pass) {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    cmd
}

#[test]
fn without_docker_test_sh_counts_the_container_tests_as_skipped_and_says_why() -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("layer-no-docker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let bin = path_without_docker(&scratch)?;
    // The container tests and one quick test.
    let mut cmd = test_sh(
        &bin,
        &["-E", "test(/^containers::/) | test(=dev::missing_postgres_binaries_say_what_to_install)"],
        &["TMPDIR", "DATABASE_URL"],
    );
    let out = cmd.output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&scratch);
    anyhow::ensure!(out.status.success(), "./test.sh without Docker failed ({}):\n{text}", out.status);
    anyhow::ensure!(
        text.contains("SKIPPING the container tests") && text.contains("no Docker at all"),
        "no banner says why the container tests are skipped:\n{text}"
    );
    anyhow::ensure!(text.contains("--profile no-docker"), "{text}");
    // nextest ran the one test and counted the rest, container tests among them, as skipped.
    let summary = text.lines().find(|l| l.contains("Summary [")).unwrap_or_default();
    anyhow::ensure!(summary.contains("1 test run: 1 passed") && summary.contains("skipped"), "{text}");
    anyhow::ensure!(!text.lines().any(|l| l.contains("PASS") && l.contains("containers")), "{text}");
    Ok(())
}

/// As root with the checkout under a directory other users cannot enter
/// (mode 0700, as `mktemp -d` and `/root` make them), `./dev.sh` says which
/// directory stops PostgreSQL's user and the `chmod` that lets it through,
/// before it builds anything.
#[test]
fn dev_sh_as_root_under_a_private_directory_says_what_to_chmod_before_building() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: ./dev.sh runs PostgreSQL as the caller, so no directory can stop it");
        return Ok(());
    }
    let scratch = std::env::temp_dir().join(format!("layer-dev-sh-private-{}", std::process::id()));
    let private = scratch.join("private");
    let clone = private.join("clone");
    std::fs::create_dir_all(clone.join("deploy"))?;
    for f in ["dev.sh", "deploy/prereqs.sh"] {
        std::fs::copy(workspace_dir().join(f), clone.join(f))?;
    }
    std::fs::set_permissions(&scratch, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let out = Command::new(clone.join("dev.sh")).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The same directory let through: it goes on to build (and, with no
    // Cargo.toml in this copy, stops there).
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o701))?;
    let after = Command::new(clone.join("dev.sh")).output()?;
    let after = format!("{}{}", String::from_utf8_lossy(&after.stdout), String::from_utf8_lossy(&after.stderr));
    let _ = std::fs::remove_dir_all(&scratch);
    anyhow::ensure!(out.status.code() == Some(1), "{}: {text}", out.status);
    anyhow::ensure!(text.contains(&format!("\n  chmod o+x {}\n", private.display())), "no chmod to run: {text}");
    anyhow::ensure!(text.contains(&format!("{} (mode 700, owner root)", private.display())), "{text}");
    anyhow::ensure!(text.contains(&format!("{}/.layer", clone.display())), "the data directory is not named: {text}");
    anyhow::ensure!(text.contains("--data-dir"), "no other place is offered: {text}");
    anyhow::ensure!(!text.contains("building"), "it built before saying so: {text}");
    anyhow::ensure!(after.contains("building") && !after.contains("cannot enter"), "{after}");
    Ok(())
}

/// Not root: `./dev.sh` installs nothing itself; it prints the one command
/// that installs what is missing and stops before building anything.
#[test]
fn dev_sh_without_root_prints_the_one_install_command_and_stops() -> anyhow::Result<()> {
    // A copy of the scripts where `nobody` can read them, wherever the checkout is.
    let scratch = std::env::temp_dir().join(format!("layer-dev-sh-{}", std::process::id()));
    std::fs::create_dir_all(scratch.join("deploy"))?;
    for f in ["dev.sh", "deploy/prereqs.sh"] {
        std::fs::copy(workspace_dir().join(f), scratch.join(f))?;
    }
    for d in [scratch.clone(), scratch.join("deploy")] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let script = scratch.join("dev.sh");
    let mut cmd = if nix::unistd::Uid::effective().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(&script);
        c
    } else {
        Command::new(&script)
    };
    // The server binaries are "missing": LAYER_PG_BINDIR names a place without them.
    let out = cmd
        .env("LAYER_PG_BINDIR", "/nonexistent/pg/bin")
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/nonexistent")
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&scratch);
    anyhow::ensure!(out.status.code() == Some(1), "{}: {text}", out.status);
    anyhow::ensure!(text.contains("\n  sudo apt-get install -y --no-install-recommends postgresql\n"), "{text}");
    anyhow::ensure!(!text.contains("building"), "it went on past the missing server: {text}");
    Ok(())
}

/// Too little free disk: `./test.sh` stops before anything else, says how
/// much is free and needed, and how to see what uses it.
#[test]
fn test_sh_refuses_to_start_on_a_full_disk_and_says_what_uses_it() -> anyhow::Result<()> {
    let out = Command::new(workspace_dir().join("test.sh")).env("LAYER_MIN_FREE_GIB", "1000000").output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.code() == Some(1), "{}: {text}", out.status);
    anyhow::ensure!(text.contains("==> free disk: ") && text.contains("needs at least 1000000 GiB"), "{text}");
    anyhow::ensure!(text.contains("du -xhd1 "), "no command shows what uses the disk: {text}");
    anyhow::ensure!(!text.contains("running the tests") && !text.contains("installing"), "it went on: {text}");
    Ok(())
}

/// Ctrl-C in the middle of the tests: `./test.sh` stops its PostgreSQL and
/// removes its temporary directory (the tests' TMPDIR with it), as it does
/// when the tests pass or fail.
#[test]
fn an_interrupted_test_sh_stops_its_postgres_and_removes_its_temporary_files() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    use std::os::unix::process::CommandExt as _;
    let scratch = std::env::temp_dir().join(format!("layer-interrupted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let bin = path_without_docker(&scratch)?;
    // A test that runs for seconds and makes a data directory under TMPDIR
    // as it starts; its own PostgreSQL (no DATABASE_URL).
    let mut cmd = test_sh(&bin, &["-E", "test(=dev::dev_starts_keeps_data_across_restarts_and_stops_cleanly)"], &[]);
    // Its own process group, as a terminal's foreground job: Ctrl-C signals them all.
    cmd.process_group(0).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let run_tmp = loop {
        let line = lines.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let Ok(line) = line else {
            let _ = child.kill();
            anyhow::bail!("./test.sh never named its temporary directory:\n{}", seen.join("\n"));
        };
        if let Some(rest) = line.split("this run's temporary files: ").nth(1) {
            break PathBuf::from(rest.split(' ').next().unwrap_or_default());
        }
        seen.push(line);
    };
    // Interrupt once the test runs: its data directory exists, and so does
    // the run's PostgreSQL.
    let postmaster = run_tmp.join("pg/data/postmaster.pid");
    loop {
        let started = std::fs::read_dir(run_tmp.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("layer-dev-test-restart-"));
        if started && postmaster.exists() {
            break;
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            anyhow::bail!("the test never started under {}", run_tmp.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pg_pid: i32 = std::fs::read_to_string(&postmaster)?.lines().next().unwrap_or_default().trim().parse()?;
    let group = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT)?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            anyhow::bail!("./test.sh did not stop on Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = reader.join();
    let _ = std::fs::remove_dir_all(&scratch);
    anyhow::ensure!(!status.success(), "an interrupted run reported success");
    anyhow::ensure!(!run_tmp.exists(), "{} is left after Ctrl-C", run_tmp.display());
    // `pg_ctl stop -w` returns once PostgreSQL removed its pid file, the
    // last thing it does; nothing the interrupted test started goes on
    // running from there either (its `layer dev` stops its own PostgreSQL).
    let stopped_by = Instant::now() + Duration::from_secs(30);
    loop {
        let left = processes_mentioning(&run_tmp);
        let pg_alive = running(pg_pid);
        if left.is_empty() && !pg_alive {
            break;
        }
        anyhow::ensure!(
            Instant::now() < stopped_by,
            "still running after Ctrl-C: the run's PostgreSQL (pid {pg_pid}): {pg_alive}; from {}: {left:?}",
            run_tmp.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Whether a process runs (a zombie waiting for its parent does not).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// The command lines of live processes that name `path`.
fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<i32>().is_ok_and(running))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}
