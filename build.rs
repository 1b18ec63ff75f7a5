//! Records the git commit sifuse is built from, for `sifuse --version`, as the compile-time
//! variable SIFUSE_GIT_COMMIT (empty when it is not known). In order of preference:
//! SIFUSE_GIT_COMMIT from the environment (a packager building from a tarball names the
//! commit); `git rev-parse` when the crate's own directory is the top of a git checkout (not
//! a tarball unpacked inside some other repository); the `.cargo_vcs_info.json` that `cargo
//! package` writes into a crate tarball; otherwise nothing.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How many hex digits of the commit to show.
const SHORT: usize = 12;

fn main() {
    println!("cargo:rerun-if-env-changed=SIFUSE_GIT_COMMIT");
    let dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let commit = env::var("SIFUSE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| from_checkout(&dir))
        .or_else(|| from_vcs_info(&dir))
        .map(|c| c.chars().take(SHORT).collect::<String>())
        .unwrap_or_default();
    println!("cargo:rustc-env=SIFUSE_GIT_COMMIT={commit}");
}

/// `git -C dir ARGS`, its output trimmed, or None if git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// HEAD's commit when `dir` is the top of a git work tree. Asks cargo to run this script
/// again when HEAD moves: HEAD itself (a branch switch, or a detached HEAD moving), the
/// branch it names, and packed-refs (where a branch's ref may live instead). Only files that
/// exist are named: cargo would run the script on every build for a missing one.
fn from_checkout(dir: &Path) -> Option<String> {
    let top = PathBuf::from(git(dir, &["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    let commit = git(dir, &["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])?;
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(dir, &["symbolic-ref", "--quiet", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &name]) {
            let path = dir.join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Some(commit)
}

/// The commit `cargo package` recorded: `{"git": {"sha1": "<40 hex digits>"}, ...}`.
fn from_vcs_info(dir: &Path) -> Option<String> {
    let path = dir.join(".cargo_vcs_info.json");
    let text = fs::read_to_string(&path).ok()?;
    println!("cargo:rerun-if-changed={}", path.display());
    let after = &text[text.find("\"sha1\"")? + "\"sha1\"".len()..];
    let value = after.split('"').nth(1)?;
    (value.len() == 40 && value.bytes().all(|b| b.is_ascii_hexdigit())).then(|| value.to_string())
}
