//! The few raw calls the loader needs that its crates do not expose: syscalls aya 0.14 lacks, and
//! one allocator call that undoes what aya's loading leaves behind. The only `unsafe` in userspace
//! lives here.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `bpf(BPF_LINK_UPDATE)`: swap the program behind an existing (pinned) link, so a restarted
/// agent serves through the links it adopts instead of attaching duplicates.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        ..Default::default()
    };
    const BPF_LINK_UPDATE: libc::c_long = 29;
    // SAFETY: attr is a valid, initialised bpf_attr prefix for BPF_LINK_UPDATE of the given size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>() as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM)` (hash maps, 5.14+): read and remove in one syscall, safe to
/// call from many threads on one fd, which is what the accept path needs.
pub fn map_lookup_and_delete<K, V: Default>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = V::default();
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        pad: 0,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        flags: 0,
    };
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    // SAFETY: key and value point at live objects of the map's key and value sizes (the caller uses
    // the ambit-common types the map was created with).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>() as u32,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(err);
    }
    Ok(Some(value))
}

/// `getsockopt(SO_NETNS_COOKIE)`: the same cookie `bpf_get_netns_cookie` returns in the programs.
pub fn netns_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid out-pointer and length for a u64 option.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `bpf(BPF_OBJ_GET)`: open a pinned object (aya keeps the fd of a `PinnedLink` private, and link
/// update needs it).
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: attr points at a NUL-terminated path that outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjAttr,
            std::mem::size_of::<ObjAttr>() as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret as i32) })
}

/// Returns the pages the allocator holds freed to the kernel now, rather than over its decay time
/// (jemalloc's `dirty_decay_ms`, 10 s). aya's loader parses the kernel's whole BTF
/// (`/sys/kernel/btf/vmlinux`, always, in `EbpfLoader::new`) into about 24 MB that it frees once
/// the programs are loaded; without this the agent's RSS carries them through its first 10–20 s,
/// which is when it enrols its pods and takes their first load (the l7 bench's first run read
/// 45–60 MB, against 35 MB settled). Only for the agent binary, whose allocator is jemalloc
/// (`main.rs`); with another allocator jemalloc holds nothing and there is nothing to return.
pub fn return_freed_pages() -> io::Result<()> {
    // `arena.<i>.purge` for MALLCTL_ARENAS_ALL (4096): every arena.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: a NUL-terminated name of a control that reads and writes nothing (null, 0).
    let ret = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}
