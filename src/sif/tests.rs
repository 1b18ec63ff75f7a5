//! SIF edge cases: each malformed container gives its own clear error, never a panic.

use std::io::Cursor;

use super::writer::ObjectData;
use super::*;

fn squash_info(part_type: PartType) -> PartitionInfo {
    PartitionInfo {
        fs_type: FsType::Squashfs,
        part_type,
        arch: arch_code("amd64").unwrap(),
    }
}

fn fake_squashfs(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v[..4].copy_from_slice(b"hsqs");
    v
}

fn build(objects: Vec<WriterObject>) -> Vec<u8> {
    let w = SifWriter {
        objects,
        ..Default::default()
    };
    let mut c = Cursor::new(Vec::new());
    w.write(&mut c).unwrap();
    c.into_inner()
}

fn partition(name: &str, data: Vec<u8>, info: PartitionInfo) -> WriterObject {
    WriterObject {
        data_type: DataType::Partition,
        name: name.into(),
        data: ObjectData::Bytes(data),
        partition: Some(info),
        group: 1,
        link: 0,
    }
}

fn standard() -> Vec<u8> {
    build(vec![
        WriterObject::bytes(DataType::Deffile, "", b"bootstrap: scratch\n".to_vec()),
        partition(
            "rootfs",
            fake_squashfs(8192),
            squash_info(PartType::PrimarySystem),
        ),
        WriterObject::bytes(DataType::Signature, "", vec![1; 100]),
    ])
}

fn put_i64(b: &mut [u8], at: usize, v: i64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn desc_at(i: usize) -> usize {
    HEADER_LEN as usize + i * DESCRIPTOR_LEN as usize
}

#[test]
fn parses_what_the_writer_writes() {
    let b = standard();
    let img = SifImage::parse(&b).unwrap();
    assert_eq!(img.header.version, "01");
    assert_eq!(img.header.arch, host_arch());
    assert_eq!(img.header.descriptors_total, 48);
    assert_eq!(img.header.descriptors_free, 45);
    assert_eq!(img.descriptors.len(), 3, "unused slots are skipped");
    img.check_layout().unwrap();
    let p = img.select_partition(None).unwrap();
    assert_eq!(p.id, 2);
    assert_eq!(p.name, "rootfs");
    assert_eq!(p.offset % 4096, 0);
    assert_eq!(&b[p.offset as usize..p.offset as usize + 4], b"hsqs");
    assert_eq!(p.partition().unwrap().fs_type, FsType::Squashfs);
    assert_eq!(img.descriptors[0].group_id, 1, "group mark is stripped");
}

#[test]
fn selects_by_id_and_name() {
    let b = build(vec![
        partition(
            "one",
            fake_squashfs(4096),
            squash_info(PartType::PrimarySystem),
        ),
        partition("two", fake_squashfs(4096), squash_info(PartType::Data)),
    ]);
    let img = SifImage::parse(&b).unwrap();
    assert_eq!(img.select_partition(None).unwrap().name, "one");
    assert_eq!(img.select_partition(Some("2")).unwrap().name, "two");
    assert_eq!(img.select_partition(Some("two")).unwrap().id, 2);
    assert_eq!(
        img.select_partition(Some("three")).unwrap_err(),
        SifError::NoSuchPartition("three".into())
    );
}

#[test]
fn wrong_magic() {
    let mut b = standard();
    b[32] = b'X';
    assert_eq!(SifImage::parse(&b).unwrap_err(), SifError::BadMagic);
}

#[test]
fn wrong_version() {
    let mut b = standard();
    b[42..45].copy_from_slice(b"02\0");
    let e = SifImage::parse(&b).unwrap_err();
    assert_eq!(e, SifError::UnsupportedVersion("02".into()));
    assert!(e.to_string().contains("version"));
}

#[test]
fn truncated_header() {
    let b = standard();
    assert_eq!(
        SifImage::parse(&b[..100].to_vec()).unwrap_err(),
        SifError::Truncated("128-byte header")
    );
    assert_eq!(
        SifImage::parse(&Vec::new()).unwrap_err(),
        SifError::Truncated("128-byte header")
    );
}

#[test]
fn zero_descriptors() {
    let b = build(vec![]);
    let img = SifImage::parse(&b).unwrap();
    assert!(img.descriptors.is_empty());
    let e = img.select_partition(None).unwrap_err();
    assert!(matches!(e, SifError::NoSquashfsPartition(_)), "{e}");
    let mut b = b;
    put_i64(&mut b, 88, 0);
    put_i64(&mut b, 80, 0);
    let img = SifImage::parse(&b).unwrap();
    assert!(img.descriptors.is_empty());
}

#[test]
fn descriptor_table_out_of_bounds() {
    let mut b = standard();
    let near_end = b.len() as i64 - 100;
    put_i64(&mut b, 96, near_end);
    assert!(matches!(
        SifImage::parse(&b).unwrap_err(),
        SifError::DescriptorsOutOfBounds { .. }
    ));
    let mut b = standard();
    put_i64(&mut b, 96, -5);
    assert!(matches!(
        SifImage::parse(&b).unwrap_err(),
        SifError::DescriptorsOutOfBounds { .. }
    ));
    let mut b = standard();
    put_i64(&mut b, 88, 1 << 40);
    assert!(matches!(
        SifImage::parse(&b).unwrap_err(),
        SifError::BadHeader(_)
    ));
    let mut b = standard();
    put_i64(&mut b, 88, -1);
    assert!(matches!(
        SifImage::parse(&b).unwrap_err(),
        SifError::BadHeader(_)
    ));
    let mut b = standard();
    put_i64(&mut b, 88, 60_000);
    put_i64(&mut b, 104, 60_000 * 585);
    assert!(matches!(
        SifImage::parse(&b).unwrap_err(),
        SifError::DescriptorsOutOfBounds { .. }
    ));
}

#[test]
fn partition_outside_the_file() {
    let mut b = standard();
    let d = desc_at(1);
    put_i64(&mut b, d + 25, 1 << 40);
    let img = SifImage::parse(&b).unwrap();
    let e = img.select_partition(None).unwrap_err();
    assert!(
        matches!(e, SifError::ObjectOutOfBounds { id: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("truncated"));

    let mut b = standard();
    put_i64(&mut b, d + 17, -4096);
    let img = SifImage::parse(&b).unwrap();
    assert!(matches!(
        img.select_partition(None).unwrap_err(),
        SifError::ObjectOutOfBounds { .. }
    ));

    let mut b = standard();
    put_i64(&mut b, d + 17, i64::MAX);
    let img = SifImage::parse(&b).unwrap();
    assert!(matches!(
        img.select_partition(None).unwrap_err(),
        SifError::ObjectOutOfBounds { .. }
    ));
}

#[test]
fn truncated_file() {
    let b = standard();
    let img = SifImage::parse(&b).unwrap();
    let p = img.select_partition(None).unwrap().clone();
    let cut = b[..p.offset as usize + 100].to_vec();
    let img = SifImage::parse(&cut).unwrap();
    assert!(matches!(
        img.select_partition(None).unwrap_err(),
        SifError::ObjectOutOfBounds { .. }
    ));
}

#[test]
fn overlapping_objects() {
    let mut b = standard();
    let first = SifImage::parse(&b).unwrap().descriptors[0].offset;
    put_i64(&mut b, desc_at(1) + 17, first);
    let img = SifImage::parse(&b).unwrap();
    assert!(matches!(
        img.select_partition(None).unwrap_err(),
        SifError::Overlap { .. }
    ));

    let mut b = standard();
    put_i64(&mut b, desc_at(1) + 17, 200);
    let img = SifImage::parse(&b).unwrap();
    let e = img.select_partition(None).unwrap_err();
    assert!(e.to_string().contains("descriptor table"), "{e}");
}

#[test]
fn partition_too_small() {
    let b = build(vec![partition(
        "tiny",
        vec![0u8; 50],
        squash_info(PartType::PrimarySystem),
    )]);
    let img = SifImage::parse(&b).unwrap();
    assert!(matches!(
        img.select_partition(None).unwrap_err(),
        SifError::PartitionTooSmall { size: 50, .. }
    ));
}

#[test]
fn no_squashfs_partition() {
    let ext3 = PartitionInfo {
        fs_type: FsType::Ext3,
        part_type: PartType::PrimarySystem,
        arch: arch_code("amd64").unwrap(),
    };
    let b = build(vec![
        WriterObject::bytes(DataType::Deffile, "", b"x".to_vec()),
        partition("ext", vec![0; 4096], ext3),
    ]);
    let img = SifImage::parse(&b).unwrap();
    assert!(matches!(
        img.select_partition(None).unwrap_err(),
        SifError::NoSquashfsPartition(_)
    ));
    let e = img.select_partition(Some("2")).unwrap_err();
    assert!(matches!(e, SifError::NotSquashfs { .. }));
    assert!(e.to_string().contains("Ext3"));
    let e = img.select_partition(Some("1")).unwrap_err();
    assert!(e.to_string().contains("Def.FILE"), "{e}");
}

#[test]
fn encrypted_rootfs_is_named() {
    let enc = PartitionInfo {
        fs_type: FsType::EncryptedSquashfs,
        part_type: PartType::PrimarySystem,
        arch: arch_code("amd64").unwrap(),
    };
    let b = build(vec![partition("enc", vec![0; 4096], enc)]);
    let e = SifImage::parse(&b)
        .unwrap()
        .select_partition(None)
        .unwrap_err();
    assert!(e.to_string().contains("encrypted"), "{e}");
}

#[test]
fn several_squashfs_without_primary_needs_a_choice() {
    let b = build(vec![
        partition("a", fake_squashfs(4096), squash_info(PartType::System)),
        partition("b", fake_squashfs(4096), squash_info(PartType::Data)),
    ]);
    let img = SifImage::parse(&b).unwrap();
    let e = img.select_partition(None).unwrap_err();
    assert!(e.to_string().contains("--partition"), "{e}");
    assert_eq!(img.select_partition(Some("b")).unwrap().id, 2);
}

#[test]
fn only_squashfs_partition_is_used_without_primary_mark() {
    let b = build(vec![partition(
        "a",
        fake_squashfs(4096),
        squash_info(PartType::System),
    )]);
    assert_eq!(
        SifImage::parse(&b)
            .unwrap()
            .select_partition(None)
            .unwrap()
            .name,
        "a"
    );
}

#[test]
fn unused_slots_between_used_ones_are_skipped() {
    let mut b = standard();
    b[desc_at(0) + 4] = 0;
    let img = SifImage::parse(&b).unwrap();
    assert_eq!(img.descriptors.len(), 2);
    assert_eq!(img.select_partition(None).unwrap().name, "rootfs");
}

#[test]
fn arch_names_round_trip() {
    for name in [
        "386", "amd64", "arm64", "ppc64le", "s390x", "riscv64", "loong64",
    ] {
        assert_eq!(arch_name(&arch_code(name).unwrap()), name);
    }
    assert_eq!(arch_name(b"99\0"), "unknown(99)");
    assert_eq!(arch_name(b"\0\0\0"), "unknown()");
}

/// Every single-byte corruption of the header and the first descriptors parses or fails
/// cleanly: never a panic.
#[test]
fn byte_flips_never_panic() {
    let b = standard();
    let end = desc_at(3);
    for i in 0..end {
        for v in [0x00u8, 0xff, 0x80] {
            let mut c = b.clone();
            c[i] = v;
            if let Ok(img) = SifImage::parse(&c) {
                let _ = img.select_partition(None);
                let _ = img.select_partition(Some("1"));
            }
        }
    }
}
