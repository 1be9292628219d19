//! The few raw system calls aya 0.14 does not expose: reading a socket's
//! netns cookie, and opening, inspecting, updating and force-detaching pinned
//! BPF links. aya's `FdLink` keeps its fd private, and adopting links left by
//! an earlier ztunnel needs all four operations on them.
//!
//! Every `unsafe` block of the crate lives here, each with its own `SAFETY:`.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io, mem,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

// `enum bpf_cmd` values from <linux/bpf.h>; they are kernel ABI.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

// `enum bpf_link_type` values.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_NETNS: u32 = 5;

/// `SO_NETNS_COOKIE` (asm-generic value, used by every architecture that
/// runs Ambit).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The part of `union bpf_attr` used by `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The part of `union bpf_attr` used by `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The part of `union bpf_attr` used by `BPF_LINK_UPDATE`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The part of `union bpf_attr` used by `BPF_LINK_DETACH`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// The head of `struct bpf_link_info`: common fields, then the per-type
/// union (8-byte aligned, at offset 16). The kernel fills at most
/// `info_len` bytes, so a prefix of the struct is a valid buffer.
#[repr(C)]
#[derive(Default)]
struct LinkInfoRaw {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// `cgroup.cgroup_id` (u64), or `netns.netns_ino` (u32) followed by
    /// `netns.attach_type` (u32).
    union_head: [u8; 8],
    _union_rest: [u64; 5],
}

/// What a link is attached to, as far as this crate cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkTarget {
    /// A cgroup link; `cgroup_id` is the cgroup directory's inode number
    /// (0 once the cgroup is gone).
    Cgroup { cgroup_id: u64 },
    /// A netns link; `netns_ino` is the namespace's inode number (0 once the
    /// namespace is gone and the link defunct).
    Netns { netns_ino: u32 },
    /// Any other link type.
    Other { link_type: u32 },
}

/// Kernel facts about one link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkInfo {
    pub(crate) id: u32,
    pub(crate) prog_id: u32,
    pub(crate) target: LinkTarget,
}

fn bpf(cmd: libc::c_long, attr: *const libc::c_void, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points to a live, initialised `#[repr(C)]` prefix of
    // `union bpf_attr` of `size` bytes (every caller passes `&value` and
    // `size_of_val(&value)`); the kernel zero-fills the rest of the union.
    // The bpf syscall does not retain the pointer after returning.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the BPF object pinned at `path` (`BPF_OBJ_GET`).
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(
        BPF_OBJ_GET,
        (&raw const attr).cast(),
        mem::size_of_val(&attr),
    )?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("BPF_OBJ_GET returned a bad fd"))?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Type, id and target of a link (`BPF_OBJ_GET_INFO_BY_FD`).
pub(crate) fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = LinkInfoRaw::default();
    let attr = InfoByFdAttr {
        bpf_fd: fd_u32(link)?,
        info_len: u32::try_from(mem::size_of::<LinkInfoRaw>()).unwrap_or(u32::MAX),
        info: (&raw mut info) as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw const attr).cast(),
        mem::size_of_val(&attr),
    )?;
    let target = match info.link_type {
        BPF_LINK_TYPE_CGROUP => LinkTarget::Cgroup {
            cgroup_id: u64::from_ne_bytes(info.union_head),
        },
        BPF_LINK_TYPE_NETNS => {
            let [a, b, c, d, ..] = info.union_head;
            LinkTarget::Netns {
                netns_ino: u32::from_ne_bytes([a, b, c, d]),
            }
        }
        link_type => LinkTarget::Other { link_type },
    };
    Ok(LinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        target,
    })
}

/// Atomically replaces the program a link runs (`BPF_LINK_UPDATE`): an
/// adopted link never goes through a moment with nothing attached.
pub(crate) fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: fd_u32(link)?,
        new_prog_fd: fd_u32(new_prog)?,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(
        BPF_LINK_UPDATE,
        (&raw const attr).cast(),
        mem::size_of_val(&attr),
    )
    .map(drop)
}

/// Detaches a link now, even if other fds or pins still refer to it
/// (`BPF_LINK_DETACH`). Closing our fd alone would leave it attached while
/// anyone else (bpftool, an old ztunnel) holds it.
pub(crate) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkDetachAttr {
        link_fd: fd_u32(link)?,
    };
    bpf(
        BPF_LINK_DETACH,
        (&raw const attr).cast(),
        mem::size_of_val(&attr),
    )
    .map(drop)
}

/// `getsockopt(SOL_SOCKET, SO_NETNS_COOKIE)`.
pub(crate) fn netns_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(mem::size_of::<u64>()).unwrap_or(8);
    // SAFETY: `cookie` and `len` are live locals; the kernel writes at most
    // `len` (8) bytes into `cookie` and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    if usize::try_from(len).ok() != Some(mem::size_of::<u64>()) {
        return Err(io::Error::other(format!(
            "SO_NETNS_COOKIE returned {len} bytes, expected 8"
        )));
    }
    Ok(cookie)
}

fn fd_u32(fd: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative file descriptor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        assert_eq!(mem::size_of::<ObjGetAttr>(), 16);
        assert_eq!(mem::size_of::<InfoByFdAttr>(), 16);
        assert_eq!(mem::size_of::<LinkUpdateAttr>(), 16);
        assert_eq!(mem::offset_of!(LinkInfoRaw, union_head), 16);
    }

    #[test]
    fn netns_cookie_of_a_fresh_socket() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let a = netns_cookie(std::os::fd::AsFd::as_fd(&sock)).expect("cookie");
        let sock2 = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = netns_cookie(std::os::fd::AsFd::as_fd(&sock2)).expect("cookie");
        assert_eq!(a, b, "two sockets in one netns share its cookie");
        assert_ne!(a, 0);
    }
}
