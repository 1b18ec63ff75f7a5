//! What a FUSE mount of an image looks like to the kernel, built once from the mount
//! options and used by every way of making one: mount(2), the new mount API (attached at a
//! path, or handed over detached) and the fusermount3 helper.

use std::os::fd::RawFd;
use std::path::Path;

use super::options::{Access, MountOptions};
use super::sys::MountFlags;

/// The subtype mountinfo shows (`fuse.sifuse`) unless the options name another.
pub const DEFAULT_SUBTYPE: &str = "sifuse";

/// The source, type, flags, access and owner of a mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// The source mountinfo shows.
    pub source: String,
    /// mountinfo shows the type as `fuse.SUBTYPE`.
    pub subtype: String,
    pub flags: MountFlags,
    pub access: Access,
    /// The user and group the kernel lets use the mount without allow_other (FUSE's
    /// `user_id` and `group_id`): the real ids of the process that mounts.
    pub owner: (u32, u32),
}

impl MountSpec {
    /// The mount of `image` that `options` ask for, owned by `owner`: the source is the
    /// image's absolute path (a URL: its address without credentials) unless `fsname`
    /// names another.
    pub fn new(image: &Path, options: &MountOptions, owner: (u32, u32)) -> MountSpec {
        let source = match &options.fsname {
            Some(name) => name.clone(),
            None => crate::image::shown_name(image),
        };
        MountSpec {
            source,
            subtype: options
                .subtype
                .clone()
                .unwrap_or_else(|| DEFAULT_SUBTYPE.into()),
            flags: MountFlags {
                nosuid: !options.suid,
                nodev: !options.dev,
            },
            access: options.access(),
            owner,
        }
    }

    /// The file system type mount(2) is given.
    pub fn fstype(&self) -> String {
        format!("fuse.{}", self.subtype)
    }

    /// Whether the kernel must let users other than the owner reach the server.
    fn allows_others(&self) -> bool {
        self.access.kernel_allows_others(self.owner.0)
    }

    /// The FUSE driver's parameters for a connection on the /dev/fuse descriptor `fd`, in
    /// the order mount(2) takes them: a key and its value, or a bare flag. The kernel
    /// enforces mode bits only with default_permissions, which every mount that others
    /// can use gets.
    pub fn fuse_parameters(&self, fd: RawFd) -> Vec<(&'static str, Option<String>)> {
        let (uid, gid) = self.owner;
        let mut params = vec![
            ("fd", Some(fd.to_string())),
            ("rootmode", Some("40000".into())),
            ("user_id", Some(uid.to_string())),
            ("group_id", Some(gid.to_string())),
        ];
        if self.allows_others() {
            params.push(("default_permissions", None));
            params.push(("allow_other", None));
        }
        params
    }

    /// [`MountSpec::fuse_parameters`] as mount(2)'s data string.
    pub fn mount_data(&self, fd: RawFd) -> String {
        self.fuse_parameters(fd)
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => format!("{key}={value}"),
                None => key.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// fusermount3's `-o` list. allow_root is allow_other to the kernel; the server
    /// refuses everyone else itself ([`crate::fuse::access`]).
    pub fn helper_options(&self) -> String {
        let mut opts = vec!["ro".to_string()];
        opts.push(if self.flags.nosuid { "nosuid" } else { "suid" }.into());
        opts.push(if self.flags.nodev { "nodev" } else { "dev" }.into());
        if self.allows_others() {
            opts.push("default_permissions".into());
            opts.push("allow_other".into());
        }
        opts.push(format!("fsname={}", escape(&self.source)));
        opts.push(format!("subtype={}", escape(&self.subtype)));
        opts.join(",")
    }
}

/// Escape `,` and `\` for fusermount3's option parser.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace(',', "\\,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_follows_the_options() {
        let mut o = MountOptions::default();
        let s = MountSpec::new(Path::new("/i/img.sif"), &o, (1000, 100));
        assert_eq!(s.source, "/i/img.sif");
        assert_eq!(s.fstype(), "fuse.sifuse");
        assert_eq!(
            s.flags,
            MountFlags {
                nosuid: true,
                nodev: true
            }
        );
        assert_eq!((s.access, s.owner), (Access::Owner, (1000, 100)));
        assert_eq!(
            s.mount_data(5),
            "fd=5,rootmode=40000,user_id=1000,group_id=100"
        );
        assert_eq!(
            s.helper_options(),
            "ro,nosuid,nodev,fsname=/i/img.sif,subtype=sifuse"
        );
        o.apply(r"suid,dev,allow_other,fsname=x\,y,subtype=y")
            .unwrap();
        let s = MountSpec::new(Path::new("img"), &o, (0, 0));
        assert_eq!((s.source.as_str(), s.subtype.as_str()), ("x,y", "y"));
        assert!(!s.flags.nosuid && !s.flags.nodev);
        assert_eq!(s.access, Access::Everyone);
        assert!(s
            .mount_data(3)
            .ends_with(",default_permissions,allow_other"));
        assert_eq!(
            s.helper_options(),
            r"ro,suid,dev,default_permissions,allow_other,fsname=x\,y,subtype=y"
        );
        // A relative image path becomes absolute.
        assert!(
            MountSpec::new(Path::new("img"), &MountOptions::default(), (0, 0))
                .source
                .starts_with('/')
        );
    }

    #[test]
    fn allow_root_lets_others_reach_the_server_only_for_a_user_s_mount() {
        let mut o = MountOptions::default();
        o.apply("allow_root").unwrap();
        let root = MountSpec::new(Path::new("/i"), &o, (0, 0));
        assert!(!root.mount_data(3).contains("allow_other"));
        let user = MountSpec::new(Path::new("/i"), &o, (1000, 100));
        assert!(user
            .mount_data(3)
            .ends_with(",default_permissions,allow_other"));
        assert!(user
            .helper_options()
            .contains(",default_permissions,allow_other,"));
    }
}
