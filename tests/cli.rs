//! The `chatd` binary as an administrator meets it: how it finds itself
//! for a live upgrade, flag values it refuses, its log lines, and its pid
//! file.

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, poll_until};

/// A directory of the test's own, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("chatd-cli-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes an executable shell script at `name`.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Points the symlink `link` at `target`, replacing it atomically as a
    /// deployment does (`ln -sfn` to a new name, then rename).
    fn point(&self, link: &str, target: &Path) {
        let tmp = self.join(&format!("{link}.new"));
        let _ = std::fs::remove_file(&tmp);
        symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, self.join(link)).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A script that leaves `marker` and then runs the real chatd: a "new
/// version" whose start the test can see.
fn marking_successor(dir: &TempDir, marker: &Path) -> PathBuf {
    dir.script(
        "v2",
        &format!(
            "echo ran > '{}'\nexec '{}' \"$@\"",
            marker.display(),
            env!("CARGO_BIN_EXE_chatd")
        ),
    )
}

/// Started through a symlink, a live upgrade runs what the link points to
/// when the upgrade begins, not the file the old process was loaded from.
#[test]
fn upgrade_follows_a_repointed_symlink() {
    let dir = TempDir::new("symlink");
    dir.point("chatd", Path::new(env!("CARGO_BIN_EXE_chatd")));
    let mut server = Server::spawn(Command::new(dir.join("chatd")), &[]);
    let mut alice = server.login("alice");
    let marker = dir.join("v2-ran");
    dir.point("chatd", &marking_successor(&dir, &marker));
    server.upgrade(1);
    assert!(marker.exists(), "the link's new target did not run");
    alice.sync("alice");
}

/// Started by a bare name found in `PATH`, a live upgrade runs what that
/// `PATH` entry holds when the upgrade begins.
#[test]
fn upgrade_follows_a_symlink_found_in_path() {
    let dir = TempDir::new("path");
    dir.point("chatd", Path::new(env!("CARGO_BIN_EXE_chatd")));
    let mut cmd = Command::new("chatd");
    cmd.env("PATH", format!("{}:/usr/bin:/bin", dir.0.display()));
    let mut server = Server::spawn(cmd, &[]);
    let mut alice = server.login("alice");
    let marker = dir.join("v2-ran");
    dir.point("chatd", &marking_successor(&dir, &marker));
    server.upgrade(1);
    assert!(marker.exists(), "the PATH entry's new target did not run");
    alice.sync("alice");
}

/// Runs `chatd --addr 127.0.0.1:0 ARGS` with `ENV` to its end (for flags
/// it refuses); one that is still running after [`common::TIMEOUT`] is
/// killed and fails the test.
fn chatd(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    use std::process::Stdio;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.args(["--addr", "127.0.0.1:0"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        cmd.env(key, value);
    }
    let mut child = cmd.spawn().expect("run chatd");
    if poll_until(|| child.try_wait().unwrap()).is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "chatd {args:?} {env:?} did not exit; stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().unwrap()
}

/// Checks that `chatd ARGS` with `ENV` exits 2 with one line that names
/// `source` and contains `why`.
fn assert_refused(args: &[&str], env: &[(&str, &str)], source: &str, why: &str) {
    let out = chatd(args, env);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?} {env:?}: {stderr}");
    assert!(
        stderr.starts_with(&format!("chatd: invalid value for {source}: ")),
        "{stderr}"
    );
    assert!(stderr.contains(why), "{args:?} {env:?}: {stderr}");
}

/// Every seconds-valued flag refuses a value that is not 0 but rounds to
/// 0 ms (which would mean off), from the command line or the environment.
#[test]
fn sub_millisecond_seconds_are_refused() {
    for flag in [
        "login-timeout",
        "idle-timeout",
        "shutdown-timeout",
        "stats-interval",
        "cluster-lease",
    ] {
        // The lease says its own floor, a second.
        let why = if flag == "cluster-lease" {
            "at least 1"
        } else {
            "less than a millisecond"
        };
        assert_refused(
            &[&format!("--{flag}"), "0.0004"],
            &[],
            &format!("--{flag}"),
            why,
        );
        let var = format!("CHATD_{}", flag.replace('-', "_").to_uppercase());
        assert_refused(&[], &[(&var, "0.0009")], &var, why);
    }
}

/// A millisecond, the least time a seconds flag can be, is taken.
#[test]
fn one_millisecond_is_taken() {
    let mut server = Server::start(&["--login-timeout", "0.001"]);
    let started = server.wait_log("listening on");
    assert!(started.contains("login-timeout 0.001s"), "{started}");
}

/// The start line shows `--reuse-port` and `--cluster` when they are in
/// force, and nothing of them otherwise.
#[test]
fn start_line_shows_reuse_port_and_cluster() {
    let mut plain = Server::start(&[]);
    let started = plain.wait_log("listening on");
    assert!(!started.contains("reuse-port"), "{started}");
    assert!(!started.contains("cluster"), "{started}");
    // No Redis listens there: the start line comes before the link connects.
    let mut node = Server::start(&[
        "--reuse-port",
        "--cluster",
        "redis://127.0.0.1:1",
        "--cluster-prefix",
        "test",
    ]);
    let started = node.wait_log("listening on");
    assert!(
        started.ends_with(", cluster redis://127.0.0.1:1 prefix test, reuse-port)"),
        "{started}"
    );
    assert!(!node.log().contains("--reuse-port without --cluster"));
}

/// `--reuse-port` without `--cluster` starts with a warning that each
/// process on the port has a name space of its own.
#[test]
fn reuse_port_without_cluster_warns() {
    let mut server = Server::start(&["--reuse-port"]);
    let warning = server.wait_log("--reuse-port without --cluster");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("its own name space"), "{warning}");
    let started = server.wait_log("listening on");
    assert!(started.ends_with(", reuse-port)"), "{started}");
}

/// A switch's bad value is refused with exactly the values it accepts,
/// and each of those is accepted.
#[test]
fn switch_values_are_the_ones_the_error_lists() {
    let listed = "(expected true, false, yes, no, 1 or 0)";
    assert_refused(
        &[],
        &[("CHATD_REUSE_PORT", "banana")],
        "CHATD_REUSE_PORT",
        listed,
    );
    for (value, on) in [
        ("true", true),
        ("yes", true),
        ("1", true),
        ("false", false),
        ("no", false),
        ("0", false),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
        cmd.env("CHATD_REUSE_PORT", value);
        let mut server = Server::spawn(cmd, &[]);
        let started = server.wait_log("listening on");
        assert_eq!(started.contains("reuse-port"), on, "{value}: {started}");
    }
}

/// Whether `line` starts with an RFC 3339 UTC timestamp to the
/// millisecond and a space: `2025-01-31T12:00:00.123Z `.
fn is_stamped(line: &str) -> bool {
    let pattern = b"dddd-dd-ddTdd:dd:dd.dddZ ";
    line.len() > pattern.len()
        && line.bytes().zip(pattern).all(|(b, &p)| match p {
            b'd' => b.is_ascii_digit(),
            _ => b == p,
        })
}

/// Log lines start with a UTC timestamp when stderr is not the journal,
/// also when `JOURNAL_STREAM` is inherited but names another stream.
#[test]
fn log_lines_are_stamped_off_the_journal() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.env_remove("JOURNAL_STREAM");
    let mut server = Server::spawn(cmd, &[]);
    let started = server.wait_log("listening on");
    assert!(is_stamped(&started), "{started}");
    assert!(started[25..].starts_with("INFO  [chatd::server] chatd listening on"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.env("JOURNAL_STREAM", "8:12345");
    let mut server = Server::spawn(cmd, &[]);
    let started = server.wait_log("listening on");
    assert!(is_stamped(&started), "{started}");
}

/// With stderr the stream `JOURNAL_STREAM` names (systemd's journal),
/// lines carry no timestamp: the journal stamps them.
#[test]
fn log_lines_are_not_stamped_in_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("journal");
    let path = dir.join("stderr");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["--addr", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let started = poll_until(|| {
        let log = std::fs::read_to_string(&path).unwrap();
        log.lines()
            .find(|l| l.contains("listening on"))
            .map(str::to_string)
    });
    let _ = child.kill();
    let _ = child.wait();
    let started = started.expect("a start line");
    assert!(
        started.starts_with("INFO  [chatd::server] chatd listening on 127.0.0.1:"),
        "{started}"
    );
}

/// `--pid-file` holds the pid and a newline once chatd listens, the new
/// pid after a live upgrade, and is removed when chatd stops on SIGTERM.
#[test]
fn pid_file_follows_upgrades_and_goes_at_exit() {
    let dir = TempDir::new("pid");
    let path = dir.join("chatd.pid");
    let pid_file = path.to_str().unwrap();
    let mut server = Server::start(&["--pid-file", pid_file]);
    let holds = |pid: u32| {
        poll_until(|| (std::fs::read_to_string(&path).ok()? == format!("{pid}\n")).then_some(()))
            .is_some()
    };
    assert!(holds(server.pid()), "{:?}", std::fs::read_to_string(&path));
    let new_pid = server.upgrade(1);
    assert!(holds(new_pid), "{:?}", std::fs::read_to_string(&path));
    server.signal("TERM");
    server.wait_log("shutdown complete");
    let gone = poll_until(|| (!path.exists()).then_some(()));
    assert!(gone.is_some(), "the pid file outlived chatd");
}

/// A new process that cannot rewrite the pid file after an upgrade
/// removes it rather than leave it naming the old process, which exits.
#[test]
fn a_pid_file_the_new_process_cannot_write_is_removed() {
    let dir = TempDir::new("pid-unwritable");
    let path = dir.join("chatd.pid");
    let pid_file = path.to_str().unwrap();
    let mut server = Server::start(&["--pid-file", pid_file]);
    let written = poll_until(|| path.exists().then_some(()));
    assert!(written.is_some());
    // The file is written through `PATH.new`: a directory there fails it.
    std::fs::create_dir(dir.join("chatd.pid.new")).unwrap();
    server.upgrade(1);
    server.wait_log("cannot write the pid file");
    let gone = poll_until(|| (!path.exists()).then_some(()));
    assert!(gone.is_some(), "{:?}", std::fs::read_to_string(&path));
}

/// A pid file that cannot be written stops chatd at start (status 1, an
/// error naming the file), from `--pid-file` or `CHATD_PID_FILE`; an
/// empty path is refused as a bad value.
#[test]
fn pid_file_that_cannot_be_written_stops_the_start() {
    let out = chatd(&[], &[("CHATD_PID_FILE", "/nonexistent/dir/chatd.pid")]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write the pid file /nonexistent/dir/chatd.pid"),
        "{stderr}"
    );
    assert_refused(&["--pid-file", ""], &[], "--pid-file", "expected a path");
}

/// `--help` documents `--pid-file`.
#[test]
fn help_documents_the_pid_file() {
    let out = chatd(&["--help"], &[]);
    let help = String::from_utf8(out.stdout).unwrap();
    let line = help
        .lines()
        .find(|l| l.trim_start().starts_with("--pid-file PATH"));
    assert!(line.is_some_and(|l| l.contains("upgrade")), "{help}");
}

/// `--cluster` with several Redis: each URL is checked, a Redis listed
/// twice is refused, more than 64 are refused, and every password in the
/// echoed value is `***`, a comma in one included (it is taken as part
/// of the password).
#[test]
fn a_list_of_redis_is_checked_and_its_passwords_hidden() {
    let twice = "redis://127.0.0.1:7001,redis://127.0.0.1:7001";
    assert_refused(&["--cluster", twice], &[], "--cluster", "listed twice");
    let many: Vec<String> = (0..65)
        .map(|i| format!("redis://127.0.0.1:{}", 7000 + i))
        .collect();
    assert_refused(
        &["--cluster", &many.join(",")],
        &[],
        "--cluster",
        "at most 64",
    );
    let bad = "redis://:s3cret@127.0.0.1:7001,redis://u:pa,ss@127.0.0.1:7002,http://x";
    assert_refused(
        &[],
        &[("CHATD_CLUSTER", bad)],
        "CHATD_CLUSTER",
        "expected redis://",
    );
    let out = chatd(&["--cluster", bad], &[]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        !stderr.contains("s3cret") && !stderr.contains("pa,ss"),
        "{stderr}"
    );
    assert!(
        stderr.contains("redis://:***@127.0.0.1:7001,redis://u:***@127.0.0.1:7002"),
        "{stderr}"
    );
}
