//! `./test.sh` as a newcomer runs it, on a machine with no Docker at all:
//! the container tests are counted as skipped, and it says why, loudly.
//! (Where Docker exists, the suite this runs in is the proof that they
//! run: `./test.sh` runs them all.)

use std::path::{Path, PathBuf};
use std::process::Command;

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

#[test]
fn without_docker_test_sh_counts_the_container_tests_as_skipped_and_says_why() -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("layer-no-docker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let bin = path_without_docker(&scratch)?;
    let mut cmd = Command::new(workspace_dir().join("test.sh"));
    // The container tests and one quick test, in a clean environment (none
    // of the outer nextest's variables), but for what picks the build: with
    // another CARGO_INCREMENTAL, say, it would build the workspace again.
    cmd.args(["-E", "test(/^containers::/) | test(=dev::missing_postgres_binaries_say_what_to_install)"])
        .env_clear()
        .env("PATH", &bin)
        .env("CARGO_TERM_COLOR", "never");
    for var in [
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "TMPDIR",
        "DATABASE_URL",
        "RUSTUP_TOOLCHAIN",
        "CARGO_INCREMENTAL",
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
    ] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    let out = cmd.current_dir(workspace_dir()).output()?;
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
