//! Who the server answers: every request from a caller the mount does not admit is
//! refused with EACCES before it is answered (the check sits in the dispatch, `admit!`).
//!
//! This matters where the kernel lets more callers through than the mount admits: under
//! `allow_root` with an owner who is not root, the kernel must let everyone reach the
//! server (FUSE's allow_other) so that root can, and only the server can tell root and the
//! owner from the rest. The server sees a caller only if the kernel asks it, so such a
//! mount also keeps no attributes in the kernel (see `ArchiveFs::revalidate_every_access`):
//! with default_permissions every path walk then asks for the attributes of each
//! directory it passes, with the caller's ids, and the first refusal ends the walk.
//!
//! As in libfuse, what the kernel sends on behalf of a file already open (reads, directory
//! reads, releases) or on no one's behalf (forgets, interrupts) is not checked: opening
//! it was.

/// The callers a mount admits, by the user id the kernel gives each request (the
/// caller's file system uid, as seen from the mount's user namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callers {
    /// Everyone (allow_other).
    Anyone,
    /// The owner only.
    Owner(u32),
    /// The owner and root (allow_root).
    OwnerAndRoot(u32),
}

impl Callers {
    /// Whether a request from `uid` is answered.
    pub fn admits(self, uid: u32) -> bool {
        match self {
            Callers::Anyone => true,
            Callers::Owner(owner) => uid == owner,
            Callers::OwnerAndRoot(owner) => uid == owner || uid == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_admitted_by_uid() {
        assert!(Callers::Anyone.admits(65534));
        assert!(Callers::Owner(1000).admits(1000));
        assert!(!Callers::Owner(1000).admits(0));
        let allow_root = Callers::OwnerAndRoot(1000);
        assert!(allow_root.admits(1000) && allow_root.admits(0));
        assert!(!allow_root.admits(65534) && !allow_root.admits(1001));
        assert!(Callers::OwnerAndRoot(0).admits(0));
        assert!(!Callers::OwnerAndRoot(0).admits(1000));
    }
}
