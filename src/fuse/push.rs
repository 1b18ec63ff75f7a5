//! Pushing small files into the kernel's page cache before they are read.
//!
//! mksquashfs packs the small files of a directory together into fragment blocks, in
//! directory order, and what reads a tree (tar, cp, an interpreter importing a package)
//! reads a directory's files one after another. Every read of a small file that reaches the
//! server is a round trip, mostly spent waking threads: in a cold `tar` of a Python-like
//! tree both cores sat idle 40% of the time. When a read brings in a fragment block, the
//! files that follow in the inode table and lie wholly in that block are already
//! decompressed, so a worker copies them into the page cache (FUSE_NOTIFY_STORE), and
//! reading them never asks the server. A walk that reads no file pushes nothing. The
//! archive finds those files (a bounded scan of the inodes that follow); the kernel refuses
//! a push to a node it does not hold, which fuser ignores.
//!
//! The worker is never a request thread: a store waits for the page locks that a read in
//! flight holds, and only a request thread can answer that read. Jobs that find the queue
//! full are dropped; those files are read the usual way. Pushing the same bytes a read
//! would bring is always correct, so races with the reader need no care.

use std::collections::HashSet;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

use fuser::{INodeNo, Notifier};

use crate::archive::{Archive, Inode, InodeRef};

use super::nodes::NodeTable;

/// Jobs waiting for the worker, at most.
const QUEUE: usize = 32;
/// Pushes remembered as done; past this the memory starts over, and at worst a few files
/// are pushed twice.
const REMEMBERED: usize = 4096;

/// Push the files after `after` in the inode table that lie wholly in fragment block
/// `fragment` (the kernel is reading `after` itself).
struct Job {
    after: InodeRef,
    fragment: u32,
}

/// What the worker needs, shared with the request threads.
struct Shared {
    archive: Arc<Archive>,
    nodes: Arc<NodeTable>,
    notifier: OnceLock<Notifier>,
}

/// The pusher of one mount.
pub struct Pusher {
    shared: Arc<Shared>,
    /// The pushes done, by fragment block and the file whose read started them. A block
    /// is pushed again when a file in it that was not pushed is read: the kernel refuses
    /// pushes to files it has not looked up yet, and a fragment block often holds the
    /// first files of the next directory too, which a reader lists only later.
    pushed: Mutex<HashSet<(u32, InodeRef)>>,
    /// Started at the first job, from a request thread, so that the worker inherits its
    /// blocked exit signals and is not lost in the daemon's fork.
    queue: OnceLock<Option<SyncSender<Job>>>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher")
            .field("connected", &self.shared.notifier.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Pusher {
    pub fn new(archive: Arc<Archive>, nodes: Arc<NodeTable>) -> Self {
        Pusher {
            shared: Arc::new(Shared {
                archive,
                nodes,
                notifier: OnceLock::new(),
            }),
            pushed: Mutex::new(HashSet::new()),
            queue: OnceLock::new(),
        }
    }

    /// Push through `notifier` from now on; until then (and in tests) nothing is pushed.
    pub fn connect(&self, notifier: Notifier) {
        let _ = self.shared.notifier.set(notifier);
    }

    /// The kernel read `inode`: queue the files that share its fragment block.
    pub fn after_read(&self, inode: &Inode) {
        if self.shared.notifier.get().is_none() {
            return;
        }
        let Some(fragment) = inode.as_file().and_then(Archive::whole_in_fragment) else {
            return;
        };
        {
            let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
            if pushed.len() >= REMEMBERED {
                pushed.clear();
            }
            if !pushed.insert((fragment, inode.iref)) {
                return;
            }
        }
        if let Some(queue) = self.queue() {
            // A full queue drops the job: the files are read the usual way.
            let _ = queue.try_send(Job {
                after: inode.iref,
                fragment,
            });
        }
    }

    fn queue(&self) -> Option<&SyncSender<Job>> {
        self.queue
            .get_or_init(|| {
                let (tx, rx) = sync_channel::<Job>(QUEUE);
                let shared = self.shared.clone();
                std::thread::Builder::new()
                    .name("sifuse-push".into())
                    .spawn(move || work(&shared, &rx))
                    .map_err(|e| tracing::warn!("cannot start the push thread: {e}"))
                    .ok()
                    .map(|_| tx)
            })
            .as_ref()
    }
}

fn work(shared: &Shared, rx: &Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        // A hostile image must not end the worker: a failed or panicking job pushes less.
        let run = || push(shared, &job);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("push of fragment {}: {e}", job.fragment),
            Err(_) => tracing::warn!("push of fragment {} panicked", job.fragment),
        }
    }
}

fn push(shared: &Shared, job: &Job) -> crate::Result<()> {
    let Some(notifier) = shared.notifier.get() else {
        return Ok(());
    };
    // The block stays in the cache among the last few fragment blocks (see
    // archive::file::FRAGMENT_BYTES_KEPT): the next directory's files may share it.
    shared
        .archive
        .files_in_fragment_after(job.after, job.fragment, |inode, bytes| {
            let node = INodeNo(shared.nodes.node_id(inode.number));
            // fuser ignores the kernel's refusal of a node it does not hold; any other
            // refusal (the mount is going away) ends the job.
            match notifier.store(node, 0, bytes) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("push of inode {}: {e}", inode.number);
                    false
                }
            }
        })?;
    Ok(())
}
