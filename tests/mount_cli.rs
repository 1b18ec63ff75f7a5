//! The command line around mounting, without mounting: completion scripts, the usage text
//! launchers read, and option errors caught before anything happens.

use std::process::Command;

const SIFUSE: &str = env!("CARGO_BIN_EXE_sifuse");

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(SIFUSE)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["sifuse", "mount", "umount", "notify-pipe"] {
            assert!(script.contains(word), "the {shell} script lacks {word:?}");
        }
    }
    let out = Command::new(SIFUSE)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn mount_help_lists_the_squashfuse_options() {
    let out = Command::new(SIFUSE)
        .args(["mount", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "-o <OPT[,OPT...]>",
        "uid=N",
        "uidmap=",
        "notify_pipe=FIFO",
        "timeout=N",
        "allow_other",
        "--foreground",
    ] {
        assert!(
            help.contains(needle),
            "mount --help lacks {needle:?}:\n{help}"
        );
    }
}

#[test]
fn bad_options_fail_before_touching_the_image() {
    for (args, what) in [
        (&["-o", "uid=abc"][..], "not a valid number"),
        (&["--uidmap", "1:2"][..], "INSIDE:OUTSIDE:COUNT"),
        (&["-o", "offset=1,partition=x"][..], "cannot be combined"),
        (
            &["-o", "no_such_option"][..],
            "unknown mount option 'no_such_option'",
        ),
    ] {
        let out = Command::new(SIFUSE)
            .args(["mount", "/nonexistent.sif", "/nonexistent-mnt"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(what), "{args:?}: {err}");
        assert!(
            !err.contains("nonexistent.sif"),
            "options are checked first: {err}"
        );
    }
}
