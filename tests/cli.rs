//! The `chatd` binary as an administrator meets it: how it finds itself
//! for a live upgrade, flag values it refuses, its log lines, and its pid
//! file.

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Server;

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
