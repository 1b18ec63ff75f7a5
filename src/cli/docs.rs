//! Documentation generated from the clap definitions: shell completion scripts, and the
//! man page, man/sifuse.1, which a test keeps in sync.

use std::io::{self, Write};

use clap::CommandFactory;

use super::Cli;

/// The man page: the top-level sections, then for every command its synopsis,
/// description, options and notes, as subsections of one section per command (one page
/// documents everything; clap_mangen's own list of commands would point at pages that do
/// not exist).
#[cfg(test)]
pub fn man_page() -> io::Result<Vec<u8>> {
    use clap_mangen::Man;

    // The version alone: `--version`'s long text names the commit, which would make the
    // committed page differ from what every new commit generates.
    let mut cmd = Cli::command()
        .long_version(None::<&str>)
        .disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    let man = Man::new(cmd.clone());
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_bin_name().unwrap_or(sub.get_name()).to_string();
        writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
        let man = Man::new(sub.clone());
        let mut section = Vec::new();
        man.render_synopsis_section(&mut section)?;
        man.render_description_section(&mut section)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut section)?;
        }
        if sub.get_after_long_help().is_some() || sub.get_after_help().is_some() {
            man.render_extra_section(&mut section)?;
        }
        // Each command's sections become subsections of its own section.
        let text = String::from_utf8_lossy(&section)
            .replace(".SH EXTRA", ".SH NOTES")
            .lines()
            .map(|l| {
                l.strip_prefix(".SH ")
                    .map_or_else(|| l.to_string(), |rest| format!(".SS {rest}"))
            })
            .collect::<Vec<_>>()
            .join("\n");
        writeln!(out, "{text}")?;
    }
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// Write the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> io::Result<()> {
    let mut cmd = Cli::command();
    let mut out = io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "sifuse", &mut out);
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAN_PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/man/sifuse.1");

    /// man/sifuse.1 must be what the clap definitions generate. To update it after
    /// changing the command line: `SIFUSE_UPDATE_MAN=1 cargo test --bin sifuse man_page`.
    #[test]
    fn man_page_is_up_to_date() {
        let generated = man_page().unwrap();
        if std::env::var_os("SIFUSE_UPDATE_MAN").is_some() {
            std::fs::create_dir_all(std::path::Path::new(MAN_PAGE).parent().unwrap()).unwrap();
            std::fs::write(MAN_PAGE, &generated).unwrap();
        }
        let committed = std::fs::read(MAN_PAGE).unwrap_or_default();
        assert!(
            committed == generated,
            "{MAN_PAGE} is out of date with the command line: regenerate it with\n    \
             SIFUSE_UPDATE_MAN=1 cargo test --bin sifuse man_page"
        );
    }

    #[test]
    fn man_page_documents_every_command_and_mount_option() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        for needle in [
            ".SH \"SIFUSE MOUNT\"",
            ".SH \"SIFUSE UMOUNT\"",
            ".SH \"SIFUSE COMPLETIONS\"",
            ".SH \"SIFUSE FETCH\"",
            ".SH \"SIFUSE CACHE\"",
            "notify_pipe",
            "uidmap",
            "cache_dir",
            "no_disk_cache",
        ] {
            assert!(page.contains(needle), "the man page lacks {needle:?}");
        }
    }
}
