//! The agent's `unsafe` code, all of it: thin safe wrappers over a few
//! system calls that neither std nor aya expose.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

/// The effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `mount -t fstype fstype target`.
pub fn mount_pseudo_fs(fstype: &str, target: &Path) -> io::Result<()> {
    let source = CString::new(fstype)?;
    let target = CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises the soft limit of open files to the hard limit; returns the new
/// soft limit. The agent holds a descriptor per distinct mapped binary.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to fill / read.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// Creates (and closes) a one-entry BPF array map: proves the bpf() syscall
/// is there and allowed.
pub fn probe_bpf_syscall() -> io::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // union bpf_attr, map-create part: map_type, key_size, value_size,
    // max_entries, then fields left zero.
    let mut attr = [0u32; 32];
    attr[0] = BPF_MAP_TYPE_ARRAY;
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: attr is a valid, large enough, zero-initialised bpf_attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor we own.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

/// Opens (and closes) a `cpu-clock` perf event on `cpu` for all processes.
pub fn probe_perf_cpu_clock(cpu: u32) -> io::Result<()> {
    const PERF_TYPE_SOFTWARE: u32 = 1;
    // struct perf_event_attr, first version (64 bytes): type, size, config
    // (PERF_COUNT_SW_CPU_CLOCK = 0), sample period, ..., flags (disabled).
    let mut attr = [0u64; 8];
    attr[0] = u64::from(PERF_TYPE_SOFTWARE) | (64u64 << 32);
    attr[2] = 10_000_000;
    attr[5] = 1; // disabled
    // SAFETY: attr is a valid perf_event_attr of the size it declares.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1i32,
            cpu as i32,
            -1i32,
            0u64,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor we own.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

/// `ioctl(FIONREAD)`: bytes waiting to be read on the socket `fd`.
pub fn fionread(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points to
    // a local that outlives the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(n).map_err(|_| io::Error::other("FIONREAD gave a negative count"))
}

/// Waits until `fd` is readable or `timeout` passes; true when readable.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
    ready(ret)
}

/// A `poll`/`epoll_wait` result: true when something is ready; a signal's
/// interruption counts as a timeout.
fn ready(ret: libc::c_int) -> io::Result<bool> {
    match ret {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            }
        }
    }
}

/// Sleeps until a descriptor's wait queue is woken — a notification, not
/// the readable level: an edge-triggered epoll — or a timeout passes. For a
/// BPF ring buffer whose producers skip most wake-ups, this sleeps through
/// records written without one.
#[derive(Debug)]
pub struct EdgeWait {
    epoll: OwnedFd,
}

impl EdgeWait {
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: no pointer arguments.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: valid descriptors and one valid event.
        let ret = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut event,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { epoll })
    }

    /// Waits up to `timeout`; true when woken by a notification.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: room for one event.
        let ret = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut event, 1, ms) };
        ready(ret)
    }
}

/// An anonymous in-memory file (`memfd_create`), closed on exec.
pub fn memfd(name: &str) -> io::Result<std::fs::File> {
    let name = CString::new(name)?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A shared, writable mapping of a BPF array map created with
/// `BPF_F_MMAPABLE`: user space writes values with plain stores, which the
/// BPF programs see (no syscall per element).
pub struct SharedArray<T: aya::Pod> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain memory owned by this value; `&mut self` is
// needed to write it.
unsafe impl<T: aya::Pod> Send for SharedArray<T> {}

impl<T: aya::Pod> SharedArray<T> {
    /// Maps `len` values of the array map behind `fd`.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .filter(|&b| b > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty or huge array"))?;
        // SAFETY: a new shared mapping of the map's memory; the kernel checks
        // the length against the map and that it was created mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<T>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len, bytes })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `values` from index `start`. Panics if out of bounds (callers
    /// allocate ranges within `len`).
    pub fn write(&mut self, start: usize, values: &[T]) {
        assert!(start + values.len() <= self.len, "write past the array");
        // SAFETY: in bounds (checked above) of a live mapping of T values;
        // T is Pod so any bytes are valid. BPF programs may read concurrently:
        // callers only write ranges no process entry names yet.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.as_ptr().add(start),
                values.len(),
            )
        };
    }

    /// Reads the value at `index`.
    pub fn get(&self, index: usize) -> Option<T> {
        // SAFETY: in bounds of a live mapping; T is Pod.
        (index < self.len).then(|| unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(index)) })
    }
}

impl<T: aya::Pod> Drop for SharedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
