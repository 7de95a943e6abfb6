//! Pinned BPF links: a cgroup program attached through a link pinned under bpffs, or the link a
//! previous agent pinned adopted instead (so capture never lapses across a restart), and the
//! netns links' pins listed and replaced when defunct.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::{CgroupSockAddr, SockOps};
use aya::Ebpf;

use super::{attach, program, sys, EbpfError};

/// The cgroup program kinds, which aya gives the same methods without a shared trait.
pub(super) trait CgroupProgram {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn program_fd(&self) -> Result<BorrowedFd<'_>, aya::programs::ProgramError>;
    /// Attaches through a BPF link (the kernel requires flags = 0 for links and always allows
    /// several programs per cgroup) and hands the link over for pinning.
    fn attach_link(&mut self, name: &'static str, cgroup: &File) -> Result<FdLink, EbpfError>;
}

macro_rules! cgroup_program {
    ($ty:ty) => {
        impl CgroupProgram for $ty {
            fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
            fn program_fd(&self) -> Result<BorrowedFd<'_>, aya::programs::ProgramError> {
                Ok(self.fd()?.as_fd())
            }
            fn attach_link(
                &mut self,
                name: &'static str,
                cgroup: &File,
            ) -> Result<FdLink, EbpfError> {
                let id = self
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(|e| EbpfError::program(name, e))?;
                let link = self
                    .take_link(id)
                    .map_err(|e| EbpfError::program(name, e))?;
                // Only a BPF link can be pinned; aya falls back to legacy attachment before 5.7.
                link.try_into()
                    .map_err(|_| EbpfError::LegacyAttach { name })
            }
        }
    };
}
cgroup_program!(CgroupSockAddr);
cgroup_program!(SockOps);

/// The cgroup the programs attach to, and where their links are pinned.
pub(super) struct AttachPoint<'a> {
    pub cgroup: &'a File,
    /// The cgroup's id, part of each link's pin name.
    pub id: u64,
    pub links: &'a Path,
}

/// Loads `name` and attaches it to the cgroup, or adopts the link a previous agent pinned there.
/// Links of the program pinned for another cgroup are unpinned (so detached) only after this one
/// is attached: during the change both run, and no socket goes uncaptured in between.
pub(super) fn attach_to_cgroup<T: CgroupProgram>(
    bpf: &mut Ebpf,
    name: &'static str,
    at: &AttachPoint<'_>,
) -> Result<(), EbpfError>
where
    for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog: &mut T = program(bpf, name)?;
    prog.load_program()
        .map_err(|e| EbpfError::program(name, e))?;
    let current = attach::link_pin_name(name, at.id);
    let pin = at.links.join(&current);
    if !adopt_link(
        &pin,
        prog.program_fd().map_err(|e| EbpfError::program(name, e))?,
    )? {
        let link = prog.attach_link(name, at.cgroup)?;
        pin_link(link, &pin)?;
    }
    for other in list_pins(at.links) {
        if attach::is_other_link_of(&other, name, &current) {
            let path = at.links.join(&other);
            tracing::info!(pin = %path.display(), "unpinning a link attached to another cgroup");
            std::fs::remove_file(&path).map_err(|source| EbpfError::Link { path, source })?;
        }
    }
    Ok(())
}

pub(super) fn list_pins(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// If a link is pinned at `pin`, points it at `prog` and returns true.
pub(super) fn adopt_link(pin: &Path, prog: BorrowedFd<'_>) -> Result<bool, EbpfError> {
    let link: OwnedFd = match sys::obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(EbpfError::Link {
                path: pin.to_path_buf(),
                source,
            })
        }
    };
    match sys::link_update(link.as_fd(), prog) {
        Ok(()) => Ok(true),
        // A defunct link (its netns or cgroup is gone) cannot be updated: replace it.
        Err(e)
            if e.raw_os_error() == Some(libc::ENOLINK)
                || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            tracing::info!(pin = %pin.display(), error = %e, "pinned link is defunct; attaching afresh");
            std::fs::remove_file(pin).map_err(|source| EbpfError::Link {
                path: pin.to_path_buf(),
                source,
            })?;
            Ok(false)
        }
        Err(source) => Err(EbpfError::Link {
            path: pin.to_path_buf(),
            source,
        }),
    }
}

pub(super) fn pin_link(link: FdLink, pin: &Path) -> Result<(), EbpfError> {
    link.pin(pin).map(drop).map_err(|e| EbpfError::Link {
        path: pin.to_path_buf(),
        source: io::Error::other(e),
    })
}
