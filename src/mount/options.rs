//! Mount options, given as long flags or squashfuse-style as `-o a,b=c`: one typed set,
//! checked as a whole before anything is mounted.

use std::path::PathBuf;
use std::time::Duration;

use crate::fuse::owners::{IdRange, IdView, Owners};
use crate::source::remote::{parse_size, CacheSettings};

/// Default block cache budget, in MiB.
pub const DEFAULT_CACHE_MIB: u64 = 64;

/// A mount option that cannot be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, OptionError> {
    Err(OptionError(msg.into()))
}

/// Who may use the mount besides the user who mounted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Access {
    /// Only the mounting user.
    #[default]
    Owner,
    /// The mounting user and root (`allow_root`).
    OwnerAndRoot,
    /// Everyone (`allow_other`).
    Everyone,
}

impl Access {
    /// Whether the kernel must let users besides the mount's owner (`owner_uid`) reach
    /// the server at all (FUSE's allow_other): for everyone, and for root when the owner
    /// is someone else. A mount root owns needs no such thing under allow_root: without
    /// allow_other the kernel itself lets in only processes of the owner's ids (its
    /// fuse_allow_current_process), whatever it has cached.
    pub fn kernel_allows_others(self, owner_uid: u32) -> bool {
        match self {
            Access::Owner => false,
            Access::OwnerAndRoot => owner_uid != 0,
            Access::Everyone => true,
        }
    }
}

/// Everything `sifuse mount` can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Byte offset of the SquashFS image inside the file.
    pub offset: Option<u64>,
    /// SIF partition, by id or name.
    pub partition: Option<String>,
    /// Directory inside the image to serve as the root.
    pub subdir: Option<String>,
    /// Every entry shows this owner.
    pub uid: Option<u32>,
    /// Every entry shows this group.
    pub gid: Option<u32>,
    /// Owner ranges to shift, as a user namespace map.
    pub uidmap: Vec<IdRange>,
    /// Group ranges to shift, as a user namespace map.
    pub gidmap: Vec<IdRange>,
    pub allow_other: bool,
    pub allow_root: bool,
    /// Honour set-user-id and set-group-id bits (nosuid otherwise).
    pub suid: bool,
    /// Honour device files (nodev otherwise).
    pub dev: bool,
    /// Unmount after this many idle seconds with nothing open; 0 never.
    pub timeout: u64,
    /// FIFO that receives `s` once the mount is live, `f` if mounting failed.
    pub notify_pipe: Option<PathBuf>,
    /// Memory budget in MiB: an upper bound, not a reservation.
    pub cache_size_mib: u64,
    /// Seconds without a request after which the server gives memory back; 0 never.
    pub idle_release: u64,
    /// Request threads; the default depends on the CPUs.
    pub threads: Option<usize>,
    /// Stay attached to the terminal instead of becoming a daemon.
    pub foreground: bool,
    /// Log every request (implies foreground).
    pub debug: bool,
    /// The mount's source as mountinfo shows it (default: the image path).
    pub fsname: Option<String>,
    /// The file system subtype: mountinfo shows `fuse.SUBTYPE` (default: sifuse).
    pub subtype: Option<String>,
    /// For an image named by a URL: the node-local chunk cache.
    pub chunk_cache: CacheSettings,
    /// For an oras:// image: the docker-style config holding registry credentials.
    pub registry_auth: Option<PathBuf>,
    /// For an oras:// image: reach the registry over plain HTTP.
    pub no_https: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            offset: None,
            partition: None,
            subdir: None,
            uid: None,
            gid: None,
            uidmap: Vec::new(),
            gidmap: Vec::new(),
            allow_other: false,
            allow_root: false,
            suid: false,
            dev: false,
            timeout: 0,
            notify_pipe: None,
            cache_size_mib: DEFAULT_CACHE_MIB,
            idle_release: crate::fuse::release::DEFAULT_IDLE_RELEASE.as_secs(),
            threads: None,
            foreground: false,
            debug: false,
            fsname: None,
            subtype: None,
            chunk_cache: CacheSettings::default(),
            registry_auth: None,
            no_https: false,
        }
    }
}

/// Split a `-o` list at commas; a backslash makes the next character literal, so values
/// can hold commas (`subdir=a\,b`).
fn split_list(list: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = list.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => items.last_mut().expect("non-empty").extend(chars.next()),
            ',' => items.push(String::new()),
            c => items.last_mut().expect("non-empty").push(c),
        }
    }
    items.retain(|i| !i.is_empty());
    items
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, OptionError> {
    value.parse().or_else(|_| {
        err(format!(
            "mount option {name}={value}: '{value}' is not a valid number"
        ))
    })
}

impl MountOptions {
    /// Apply a comma-separated `-o` list; later options override earlier ones.
    pub fn apply(&mut self, list: &str) -> Result<(), OptionError> {
        for item in split_list(list) {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (item.as_str(), None),
            };
            self.apply_one(name, value)?;
        }
        Ok(())
    }

    fn apply_one(&mut self, name: &str, value: Option<&str>) -> Result<(), OptionError> {
        let flag = |set: &mut bool, on: bool| -> Result<(), OptionError> {
            if value.is_some() {
                return err(format!("mount option {name} takes no value"));
            }
            *set = on;
            Ok(())
        };
        let mut ignored = false;
        match name {
            "allow_other" => return flag(&mut self.allow_other, true),
            "allow_root" => return flag(&mut self.allow_root, true),
            "suid" => return flag(&mut self.suid, true),
            "nosuid" => return flag(&mut self.suid, false),
            "dev" => return flag(&mut self.dev, true),
            "nodev" => return flag(&mut self.dev, false),
            "debug" => {
                flag(&mut self.debug, true)?;
                self.foreground = true;
                return Ok(());
            }
            // Always so: ro, default_permissions with allow_other, mounting over a
            // non-empty directory, one /dev/fuse clone per request thread.
            "ro" | "default_permissions" | "nonempty" | "clone_fd" => {
                return flag(&mut ignored, true)
            }
            "no_disk_cache" => {
                let mut on = false;
                flag(&mut on, true)?;
                self.chunk_cache.disk = !on;
                return Ok(());
            }
            "no_https" => return flag(&mut self.no_https, true),
            "rw" => return err("sifuse mounts are always read-only: drop the rw option"),
            _ => {}
        }
        let Some(value) = value else {
            return err(match name {
                "offset" | "subdir" | "partition" | "uid" | "gid" | "uidmap" | "gidmap"
                | "timeout" | "notify_pipe" | "cache_size" | "idle_release" | "threads"
                | "max_threads" | "max_idle_threads" | "fsname" | "subtype" | "cache_dir"
                | "cache_max" | "registry_auth" => {
                    format!("mount option {name} needs a value: {name}=...")
                }
                _ => format!("unknown mount option '{name}'"),
            });
        };
        match name {
            "offset" => self.offset = Some(number(name, value)?),
            "subdir" => self.subdir = Some(value.to_string()),
            "partition" => self.partition = Some(value.to_string()),
            "uid" => self.uid = Some(number(name, value)?),
            "gid" => self.gid = Some(number(name, value)?),
            "uidmap" => self.uidmap.push(
                value
                    .parse()
                    .map_err(|e| OptionError(format!("uidmap: {e}")))?,
            ),
            "gidmap" => self.gidmap.push(
                value
                    .parse()
                    .map_err(|e| OptionError(format!("gidmap: {e}")))?,
            ),
            "timeout" => self.timeout = number(name, value)?,
            "notify_pipe" => self.notify_pipe = Some(PathBuf::from(value)),
            "cache_size" => self.cache_size_mib = number(name, value)?,
            "idle_release" => self.idle_release = number(name, value)?,
            "threads" | "max_threads" => self.threads = Some(number(name, value)?),
            // libfuse's thread pool knob; sifuse keeps a fixed set of request threads.
            "max_idle_threads" => {
                number::<u64>(name, value)?;
            }
            "fsname" => self.fsname = Some(value.to_string()),
            "subtype" => self.subtype = Some(value.to_string()),
            "cache_dir" => self.chunk_cache.dir = Some(PathBuf::from(value)),
            "registry_auth" => self.registry_auth = Some(PathBuf::from(value)),
            "cache_max" => {
                self.chunk_cache.max_bytes = parse_size(value)
                    .map_err(|e| OptionError(format!("mount option cache_max: {e}")))?
            }
            _ => return err(format!("unknown mount option '{name}'")),
        }
        Ok(())
    }

    /// Refuse combinations that cannot work.
    pub fn validate(&self) -> Result<(), OptionError> {
        if self.offset.is_some() && self.partition.is_some() {
            return err("offset and partition cannot be combined: a partition has its own offset");
        }
        if self.allow_other && self.allow_root {
            return err("allow_other and allow_root cannot be combined");
        }
        if self.threads == Some(0) {
            return err("threads must be at least 1");
        }
        if self.cache_size_mib == 0 {
            return err("cache_size must be at least 1 (MiB)");
        }
        if self.cache_size_mib > u64::MAX >> 20 {
            return err(format!(
                "cache_size={} MiB is too large",
                self.cache_size_mib
            ));
        }
        for (what, value) in [("fsname", &self.fsname), ("subtype", &self.subtype)] {
            if value.as_deref().is_some_and(str::is_empty) {
                return err(format!("{what} cannot be empty"));
            }
        }
        self.owners().map(|_| ())
    }

    /// The owner and group views the options ask for.
    pub fn owners(&self) -> Result<Owners, OptionError> {
        let view = |what: &str, fixed: Option<u32>, map: &[IdRange]| match (fixed, map.is_empty()) {
            (Some(_), false) => err(format!("{what} and {what}map cannot be combined")),
            (Some(id), true) => Ok(IdView::Fixed(id)),
            (None, true) => Ok(IdView::AsStored),
            (None, false) => {
                IdView::mapped(map.to_vec()).map_err(|e| OptionError(format!("{what}map: {e}")))
            }
        };
        Ok(Owners {
            uid: view("uid", self.uid, &self.uidmap)?,
            gid: view("gid", self.gid, &self.gidmap)?,
        })
    }

    /// Who may use the mount.
    pub fn access(&self) -> Access {
        if self.allow_other {
            Access::Everyone
        } else if self.allow_root {
            Access::OwnerAndRoot
        } else {
            Access::Owner
        }
    }

    /// How long the server waits, idle, before it gives memory back, if it ever does.
    pub fn idle_release(&self) -> Option<Duration> {
        (self.idle_release > 0).then(|| Duration::from_secs(self.idle_release))
    }

    /// The idle timeout, if any.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.timeout > 0).then(|| Duration::from_secs(self.timeout))
    }

    /// The block cache budget in bytes.
    pub fn cache_bytes(&self) -> u64 {
        self.cache_size_mib << 20
    }

    /// Request threads: as asked, else one per CPU, at least 2 (so one slow read does not
    /// hold up every other request) and at most 16.
    pub fn thread_count(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(2, 16)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parsed(list: &str) -> MountOptions {
        let mut o = MountOptions::default();
        o.apply(list).unwrap_or_else(|e| panic!("{list}: {e}"));
        o
    }

    fn refused(list: &str) -> String {
        let mut o = MountOptions::default();
        match o.apply(list).and_then(|()| o.validate()) {
            Ok(()) => panic!("{list} should be refused"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn defaults_are_safe() {
        let o = MountOptions::default();
        assert!(!o.suid && !o.dev && !o.allow_other && !o.allow_root && !o.foreground);
        assert_eq!(o.cache_bytes(), 64 << 20);
        assert_eq!(o.idle_timeout(), None);
        assert_eq!(o.access(), Access::Owner);
        assert!(o.thread_count() >= 2);
        assert_eq!(o.owners().unwrap(), Owners::default());
    }

    #[test]
    fn squashfuse_style_lists() {
        let o = parsed("ro,allow_other,offset=4096,uid=1000,gid=100,timeout=30,notify_pipe=/tmp/p,cache_size=128,threads=4,idle_release=5");
        assert_eq!(o.idle_release(), Some(Duration::from_secs(5)));
        assert_eq!(parsed("idle_release=0").idle_release(), None);
        assert_eq!(
            MountOptions::default().idle_release(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(o.offset, Some(4096));
        assert!(o.allow_other);
        assert_eq!(o.access(), Access::Everyone);
        assert_eq!((o.uid, o.gid), (Some(1000), Some(100)));
        assert_eq!(o.idle_timeout(), Some(Duration::from_secs(30)));
        assert_eq!(o.notify_pipe, Some(PathBuf::from("/tmp/p")));
        assert_eq!(o.cache_bytes(), 128 << 20);
        assert_eq!(o.thread_count(), 4);
        assert_eq!(
            o.owners().unwrap(),
            Owners {
                uid: IdView::Fixed(1000),
                gid: IdView::Fixed(100)
            }
        );
    }

    #[test]
    fn flags_toggle_and_later_options_win() {
        let o = parsed("suid,dev,nosuid");
        assert!(!o.suid && o.dev);
        assert_eq!(parsed("uid=1,uid=2").uid, Some(2));
        let d = parsed("debug");
        assert!(d.debug && d.foreground);
        assert_eq!(parsed("max_threads=3,max_idle_threads=10").threads, Some(3));
        assert_eq!(parsed("allow_root").access(), Access::OwnerAndRoot);
        assert_eq!(parsed("").offset, None);
    }

    #[test]
    fn the_kernel_lets_others_in_only_where_it_must() {
        assert!(!Access::Owner.kernel_allows_others(1000));
        assert!(Access::Everyone.kernel_allows_others(0));
        // allow_root: root's own mount needs nobody else; a user's must let root in.
        assert!(!Access::OwnerAndRoot.kernel_allows_others(0));
        assert!(Access::OwnerAndRoot.kernel_allows_others(1000));
    }

    #[test]
    fn remote_image_options() {
        let o =
            parsed("cache_dir=/c,cache_max=2G,no_disk_cache,registry_auth=/a/config.json,no_https");
        assert_eq!(o.chunk_cache.dir.as_deref(), Some(Path::new("/c")));
        assert_eq!(o.chunk_cache.max_bytes, 2 << 30);
        assert!(!o.chunk_cache.disk);
        assert_eq!(
            o.registry_auth.as_deref(),
            Some(Path::new("/a/config.json"))
        );
        assert!(o.no_https);
        let d = MountOptions::default();
        assert!(d.chunk_cache.disk && d.registry_auth.is_none() && !d.no_https);
        let mut o = MountOptions::default();
        assert!(
            o.apply("registry_auth").is_err(),
            "registry_auth needs a value"
        );
    }

    #[test]
    fn escaped_commas_stay_in_values() {
        let o = parsed(r"subdir=a\,b,partition=p\\q,fsname=x y");
        assert_eq!(o.subdir.as_deref(), Some("a,b"));
        assert_eq!(o.partition.as_deref(), Some(r"p\q"));
        assert_eq!(o.fsname.as_deref(), Some("x y"));
    }

    #[test]
    fn maps_repeat() {
        let o = parsed("uidmap=0:1000:1,uidmap=1:100000:65536,gidmap=0:1000:1");
        let owners = o.owners().unwrap();
        assert_eq!(owners.uid.show(0), 1000);
        assert_eq!(owners.uid.show(5), 100004);
        assert_eq!(owners.gid.show(5), crate::fuse::owners::OVERFLOW_ID);
    }

    #[test]
    fn bad_options_are_refused_with_reasons() {
        assert!(refused("rw").contains("read-only"));
        assert!(refused("bogus").contains("unknown mount option 'bogus'"));
        assert!(refused("bogus=1").contains("unknown mount option 'bogus'"));
        assert!(refused("offset").contains("needs a value"));
        assert!(refused("offset=abc").contains("not a valid number"));
        assert!(refused("uid=-1").contains("not a valid number"));
        assert!(refused("allow_other=1").contains("takes no value"));
        assert!(refused("offset=1,partition=2").contains("cannot be combined"));
        assert!(refused("allow_other,allow_root").contains("cannot be combined"));
        assert!(refused("uid=0,uidmap=0:1:1").contains("cannot be combined"));
        assert!(refused("gidmap=0:1:10,gidmap=5:100:1").contains("overlap"));
        assert!(refused("uidmap=0:1").contains("INSIDE:OUTSIDE:COUNT"));
        assert!(refused("threads=0").contains("at least 1"));
        assert!(refused("cache_size=0").contains("at least 1"));
        assert!(refused("subtype=").contains("cannot be empty"));
    }
}
