//! Wrap a SquashFS image in a SIF as its primary system partition:
//! `cargo run --example mksif -- IMAGE.sqfs OUT.sif [ARCH]`. Used to build fixtures.

use std::path::PathBuf;

use sifuse::sif::{
    arch_code, host_arch, DataType, FsType, PartType, PartitionInfo, SifWriter, WriterObject,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: mksif IMAGE.sqfs OUT.sif [ARCH]");
        std::process::exit(2);
    }
    let arch = args.get(3).map(String::as_str).unwrap_or(host_arch());
    let info = PartitionInfo {
        fs_type: FsType::Squashfs,
        part_type: PartType::PrimarySystem,
        arch: arch_code(arch).unwrap_or(*b"00\0"),
    };
    let w = SifWriter {
        objects: vec![
            WriterObject::bytes(
                DataType::Deffile,
                "",
                b"bootstrap: localimage\nfrom: busybox\n".to_vec(),
            ),
            WriterObject::partition("rootfs", PathBuf::from(&args[1]), info),
        ],
        arch: arch.to_string(),
        ..Default::default()
    };
    if let Err(e) = w.write_file(std::path::Path::new(&args[2])) {
        eprintln!("mksif: {}: {e}", args[2]);
        std::process::exit(1);
    }
}
