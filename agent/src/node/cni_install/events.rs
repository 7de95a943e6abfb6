//! The watch's inotify side: the conf dir's and the bin dir's events that call for a pass of
//! [`super::watch`], read through tokio's [`AsyncFd`] (no thread of its own).

use std::io;
use std::os::fd::{AsFd as _, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::{is_config_name, InstallError, PLUGIN_TYPE};

/// The next event calling for a pass; never, without inotify.
pub(super) async fn next_event(events: &mut Option<DirEvents>) -> Result<(), InstallError> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// What a writer of the conf dir (or the bin dir) does: creates, writes, renames in or out, deletes a file; and
/// the dir itself going away (the watch then goes with it and is armed again).
fn dir_events() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// An inotify fd as tokio's [`AsyncFd`] wants it.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl InotifyFd {
    /// Registers the fd with the runtime, for reading.
    // tokio 1.54 deprecates the safe constructors for the `unsafe` `register`, whose contract is
    // that the fd stays open and the same while registered. `InotifyFd` holds it as the
    // `OwnedFd` inside `Inotify`, which is neither closed nor replaced before the `AsyncFd` is
    // dropped, so the safe (deprecated) constructor is sound here and no `unsafe` is needed.
    #[allow(deprecated)]
    fn register(inotify: Inotify) -> io::Result<AsyncFd<Self>> {
        AsyncFd::with_interest(InotifyFd(inotify), tokio::io::Interest::READABLE)
    }
}

/// The conf dir's and the bin dir's inotify watches, each armed while its dir exists.
pub(super) struct DirEvents {
    fd: AsyncFd<InotifyFd>,
    dir: PathBuf,
    pub(super) wd: Option<WatchDescriptor>,
    /// The bin dir: `ambit-cni` deleted or replaced there calls for a pass, which puts it back.
    bin_dir: PathBuf,
    pub(super) bin_wd: Option<WatchDescriptor>,
    /// The last arming error, logged once.
    arm_error: Option<String>,
}

impl DirEvents {
    pub(super) fn new(dir: &Path, bin_dir: &Path) -> Result<Self, InstallError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| InstallError::InotifyInit(e.into()))?;
        let mut events = DirEvents {
            fd: InotifyFd::register(inotify).map_err(InstallError::InotifyInit)?,
            dir: dir.to_path_buf(),
            wd: None,
            bin_dir: bin_dir.to_path_buf(),
            bin_wd: None,
            arm_error: None,
        };
        events.arm();
        Ok(events)
    }

    /// Whether both dirs are watched now.
    pub(super) fn armed(&self) -> bool {
        self.wd.is_some() && self.bin_wd.is_some()
    }

    /// Watches each dir unless already watched; a dir that does not exist yet is tried again on
    /// the next call.
    pub(super) fn arm(&mut self) {
        for bin in [false, true] {
            let (dir, wd) = if bin {
                (&self.bin_dir, &mut self.bin_wd)
            } else {
                (&self.dir, &mut self.wd)
            };
            if wd.is_some() {
                continue;
            }
            match self.fd.get_ref().0.add_watch(dir, dir_events()) {
                Ok(new) => {
                    *wd = Some(new);
                    self.arm_error = None;
                }
                // The pass says that the dir is missing.
                Err(Errno::ENOENT) => {}
                Err(e) => {
                    let msg = format!("{}: {e}", dir.display());
                    if self.arm_error.as_ref() != Some(&msg) {
                        warn!(error = %msg, "cannot watch a CNI dir; polling it");
                        self.arm_error = Some(msg);
                    }
                }
            }
        }
    }

    /// Waits for events calling for a pass, and drains all that are queued (one pass for a
    /// burst). Cancel-safe: events not yet read stay queued.
    pub(super) async fn next(&mut self) -> Result<(), InstallError> {
        let err = |dir: &Path, source| InstallError::InotifyRead {
            dir: dir.to_path_buf(),
            source,
        };
        loop {
            let mut batch = Vec::new();
            {
                let mut guard = self.fd.readable().await.map_err(|e| err(&self.dir, e))?;
                loop {
                    match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                        Ok(Ok(events)) => batch.extend(events),
                        Ok(Err(e)) => return Err(err(&self.dir, e)),
                        // Drained; readiness is cleared.
                        Err(_would_block) => break,
                    }
                }
            }
            let mut pass = false;
            for event in batch {
                pass |= self.handle(&event);
            }
            if pass {
                return Ok(());
            }
        }
    }

    /// Whether `event` calls for a pass; notes the watch going away.
    pub(super) fn handle(&mut self, event: &InotifyEvent) -> bool {
        // Events were lost: only a full pass is sure to see what changed.
        if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            return true;
        }
        let bin = Some(event.wd) == self.bin_wd;
        if !bin && Some(event.wd) != self.wd {
            return false; // of a watch already dropped
        }
        if event.mask.intersects(
            AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED,
        ) {
            // A moved dir keeps its watch: drop it, to watch what is at the path now. The kernel
            // has dropped a deleted dir's watch already, so removing it fails: nothing to do.
            let _ = self.fd.get_ref().0.rm_watch(event.wd);
            *(if bin { &mut self.bin_wd } else { &mut self.wd }) = None;
            return true;
        }
        // Only the files the runtime may read (as [`primary_file`] picks them) and our binary,
        // not temp files: our own write (its temp file ends `.ambit-tmp.<pid>`) makes one event,
        // its rename onto the target, and so one more pass that finds nothing to do.
        event.name.as_deref().is_some_and(|name| {
            if bin {
                name == std::ffi::OsStr::new(PLUGIN_TYPE)
            } else {
                is_config_name(Path::new(name))
            }
        })
    }
}
