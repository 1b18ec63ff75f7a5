//! The SIF parser: header, descriptor table, layout checks and partition selection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sifuse::sif::{arch_name, SifImage};

fuzz_target!(|data: &[u8]| {
    let src = data.to_vec();
    let Ok(sif) = SifImage::parse(&src) else {
        return;
    };
    let _ = arch_name(sif.header.arch.as_bytes());
    let layout_ok = sif.check_layout().is_ok();
    for d in &sif.descriptors {
        let _ = (d.partition(), d.label(), d.data_type.name());
        if let Some(p) = d.partition() {
            let _ = (p.fs_type.name(), p.part_type.name(), arch_name(&p.arch));
        }
    }
    let mut selectors = vec![None, Some("1".to_string()), Some("rootfs".to_string())];
    selectors.extend(
        sif.descriptors
            .iter()
            .take(4)
            .map(|d| Some(d.id.to_string())),
    );
    selectors.extend(sif.descriptors.iter().take(4).map(|d| Some(d.name.clone())));
    for sel in selectors {
        if let Ok(part) = sif.select_partition(sel.as_deref()) {
            // What the caller relies on: the chosen partition lies inside the file.
            assert!(layout_ok);
            assert!(part.offset >= 0 && part.size >= 96);
            let end = part.offset as u64 + part.size as u64;
            assert!(
                end <= data.len() as u64,
                "partition ends at {end} of {}",
                data.len()
            );
        }
    }
});
