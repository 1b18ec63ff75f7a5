//! What `sifuse --version` says: the version, the git commit the binary was built from (see
//! build.rs) and the compressors compiled in. `sifuse -V` prints the version alone, and
//! squashfuse_ll -V keeps squashfuse's form (compat.rs).

use std::sync::LazyLock;

use sifuse::codec::Compressor;

/// The commit build.rs recorded; empty when the build was not from a git checkout.
const GIT_COMMIT: &str = env!("SIFUSE_GIT_COMMIT");

static LONG_VERSION: LazyLock<String> =
    LazyLock::new(|| long_version_text(env!("CARGO_PKG_VERSION"), GIT_COMMIT));

/// The text after `sifuse ` for `--version`.
pub fn long_version() -> &'static str {
    LONG_VERSION.as_str()
}

fn long_version_text(version: &str, commit: &str) -> String {
    let commit = if commit.is_empty() {
        "unknown (not built from a git checkout)"
    } else {
        commit
    };
    let compressors: Vec<&str> = Compressor::ALL.iter().map(|c| c.name()).collect();
    format!(
        "{version}\ncommit: {commit}\ncompressors: {}",
        compressors.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_version_commit_and_every_compressor() {
        assert_eq!(
            long_version_text("1.2.3", "0123456789ab"),
            "1.2.3\ncommit: 0123456789ab\ncompressors: gzip lzma lzo xz lz4 zstd"
        );
    }

    #[test]
    fn says_when_the_commit_is_unknown() {
        let text = long_version_text("1.2.3", "");
        assert!(
            text.contains("\ncommit: unknown (not built from a git checkout)\n"),
            "{text}"
        );
    }
}
