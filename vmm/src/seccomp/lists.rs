//! The allow-lists: which system calls each kind of thread may make, and
//! why. This file is the one place they are written down.
//!
//! Filters stack: a thread keeps the filter of the thread that started it
//! and adds its own, and a call must pass both. So a thread that starts
//! others (the control thread starts vCPUs; a vCPU starts a device's
//! worker when the guest activates the device) must allow what its
//! children need too: the lists below are built from groups, and
//! [`for_kind`] unions the groups a kind and its children use. The unit
//! tests check that every child's list is contained in its parent's.
//!
//! The lists allow system calls by number only; their arguments are not
//! checked (an `ioctl` is any ioctl). Narrowing `ioctl`, `socket` and
//! `prctl` by argument is the next step (see the README's Security section).

use super::ThreadKind;

/// A system call and the reason a thread kind needs it.
pub(super) type Entry = (&'static str, &'static str);

/// What every Rust thread of abide needs to run at all.
const BASE: &[Entry] = &[
    ("read", "eventfds, sockets, pipes, tap and stdin reads"),
    (
        "write",
        "eventfds, stderr messages, serial output (the trap handler's message too)",
    ),
    (
        "futex",
        "mutexes, channels, condition variables, joining threads",
    ),
    ("mmap", "heap allocation (malloc arenas, large buffers)"),
    (
        "munmap",
        "heap release; a thread's alternate signal stack at its end",
    ),
    ("mremap", "growing large heap buffers"),
    (
        "madvise",
        "malloc trimming; glibc frees an ended thread's stack",
    ),
    ("mprotect", "malloc arenas; thread stack guard pages"),
    ("brk", "the main heap"),
    (
        "rt_sigreturn",
        "returning from the vCPU kick and SIGSYS handlers",
    ),
    (
        "rt_sigprocmask",
        "glibc blocks signals around thread exit and abort",
    ),
    (
        "sigaltstack",
        "std's alternate signal stack, removed at thread end",
    ),
    ("exit", "a thread ends"),
    (
        "exit_group",
        "the process ends (also the SIGSYS trap handler's exit)",
    ),
    ("close", "dropping descriptors"),
    ("clock_gettime", "time, when the vDSO is not used"),
    ("clock_nanosleep", "sleeps (polling loops, backoff)"),
    ("nanosleep", "sleeps"),
    ("sched_yield", "spin-lock backoff in std and glibc"),
    ("getrandom", "std's hash-map keys; virtio-rng's entropy"),
    ("gettid", "abort() raising SIGABRT on itself"),
    ("getpid", "abort() raising SIGABRT on itself"),
    ("tgkill", "abort(); kicking a vCPU thread out of KVM_RUN"),
];

/// What a thread needs to start another thread (std::thread::spawn). The
/// child runs glibc's start-up under its parent's filter.
const SPAWN: &[Entry] = &[
    ("clone", "starting a thread (older glibc)"),
    ("clone3", "starting a thread"),
    ("set_robust_list", "glibc's set-up of a new thread"),
    ("rseq", "glibc's set-up of a new thread"),
    (
        "sched_getaffinity",
        "std reads a new thread's stack bounds through glibc",
    ),
    (
        "prctl",
        "thread names; PR_SET_NO_NEW_PRIVS before a thread's own filter",
    ),
    ("seccomp", "a new thread installs its own filter"),
];

/// A device worker's event loop (event-manager over epoll).
const WORKER: &[Entry] = &[
    ("epoll_wait", "the worker's event loop"),
    ("epoll_pwait", "the worker's event loop (newer glibc)"),
    (
        "epoll_ctl",
        "adding and removing the device's event sources",
    ),
];

/// virtio-blk's worker: reads and writes the disk image.
const BLK: &[Entry] = &[
    ("pread64", "reading the image"),
    ("pwrite64", "writing the image"),
    ("preadv", "reading the image into several guest buffers"),
    ("pwritev", "writing several guest buffers to the image"),
    ("preadv2", "vectored reads (newer glibc)"),
    ("pwritev2", "vectored writes (newer glibc)"),
    ("fsync", "VIRTIO_BLK_T_FLUSH"),
    ("fdatasync", "VIRTIO_BLK_T_FLUSH"),
    ("fallocate", "discard and write-zeroes requests"),
    ("lseek", "finding the image's size"),
    ("fstat", "finding the image's size"),
];

/// virtio-net's worker: frames to and from the tap.
const NET: &[Entry] = &[
    ("readv", "receiving a frame from the tap"),
    ("writev", "sending a frame to the tap"),
];

/// Building a device's worker (when the guest activates the device, or a
/// paused device resumes): its eventfds and epoll instance.
const WORKER_SETUP: &[Entry] = &[
    ("eventfd2", "a worker's stop event"),
    ("epoll_create1", "a worker's event loop"),
    (
        "fcntl",
        "F_DUPFD_CLOEXEC: eventfd clones shared with the worker",
    ),
];

/// Checking a VM configuration or the host (vm.create's validation, the
/// capabilities, a migration's compatibility check): reading
/// /proc/meminfo, /proc/cpuinfo and /sys/module, and probing /dev/kvm.
const PROBE: &[Entry] = &[
    (
        "openat",
        "/proc/meminfo, /proc/cpuinfo, /dev/kvm; paths given in a request",
    ),
    ("statx", "file types and sizes"),
    ("newfstatat", "file types and sizes"),
    ("fstat", "file sizes"),
    ("lseek", "reading files"),
    (
        "ioctl",
        "/dev/kvm's supported CPUID and capabilities; FIONBIO (set_nonblocking)",
    ),
];

/// A vCPU thread's own needs (device emulation runs here too).
const VCPU: &[Entry] = &[
    ("ioctl", "KVM_RUN and the vCPU's state; device emulation's KVM calls (irqfd, ioeventfd, MSI routes) and tap offloads"),
];

/// The API thread: a Unix-socket HTTP server.
const API: &[Entry] = &[
    ("accept4", "taking a client connection"),
    ("accept", "taking a client connection"),
    (
        "poll",
        "waiting on the listener, clients and the stop eventfd",
    ),
    (
        "ppoll",
        "waiting on the listener, clients and the stop eventfd",
    ),
    ("recvfrom", "reading a request"),
    ("sendto", "writing a reply"),
    ("recvmsg", "reading a request"),
    ("sendmsg", "writing a reply"),
    ("writev", "writing a reply"),
    ("shutdown", "closing a client"),
    ("fcntl", "non-blocking client sockets"),
    ("setsockopt", "client socket timeouts"),
    ("getsockopt", "socket errors"),
    (
        "eventfd2",
        "wake-ups for the control thread and event-stream clients",
    ),
];

/// The outgoing migration thread: sends the guest over a socket while it
/// runs, pausing the vCPUs for the last round.
const MIGRATION: &[Entry] = &[
    ("socket", "connecting to the destination"),
    ("connect", "connecting to the destination"),
    ("setsockopt", "TCP_NODELAY, timeouts"),
    ("getsockopt", "connection errors"),
    ("fcntl", "socket flags"),
    ("sendto", "the stream"),
    ("recvfrom", "the destination's replies"),
    ("sendmsg", "the stream"),
    ("recvmsg", "the destination's replies"),
    ("writev", "the stream"),
    ("poll", "waiting for the socket with a timeout"),
    ("shutdown", "ending the stream"),
    ("ioctl", "KVM dirty logs and the VM's and vCPUs' state"),
    ("fsync", "flushing disks before the guest moves"),
    ("fdatasync", "flushing disks before the guest moves"),
];

/// The memory loader of a restored VM (a snapshot with `memory.chunks`): reads
/// each chunk from the snapshot file, verifies it, and copies it into
/// guest RAM through the userfaultfd.
const MEMORY: &[Entry] = &[
    (
        "pread64",
        "reading a chunk of guest memory from the snapshot file",
    ),
    (
        "poll",
        "waiting for page faults on guest RAM and for its stop event",
    ),
    (
        "ppoll",
        "waiting for page faults on guest RAM and for its stop event",
    ),
    (
        "ioctl",
        "UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE: installing verified chunks",
    ),
];

/// Restoring a VM whose memory is verified chunk by chunk: the control
/// thread creates the userfaultfd (its loader thread then has MEMORY).
const RESTORE: &[Entry] = &[(
    "userfaultfd",
    "a restored VM's memory is filled as it is first touched, chunk by verified chunk",
)];

/// The control (main) thread: builds and restores VMs, takes snapshots,
/// receives migrations, carries out the API's requests. It does the most
/// and is the broadest list; what it does not allow, no thread can do.
const CONTROL: &[Entry] = &[
    (
        "open",
        "images, snapshots, kernels, ROMs, /dev/kvm, /dev/net/tun",
    ),
    (
        "openat",
        "images, snapshots, kernels, ROMs, /dev/kvm, /dev/net/tun",
    ),
    ("fstat", "file sizes"),
    ("newfstatat", "file sizes and types"),
    ("statx", "file sizes and types"),
    ("stat", "file types"),
    ("lstat", "file types"),
    ("access", "checking a path before using it"),
    ("lseek", "reading and writing snapshot files"),
    ("pread64", "reading snapshot files"),
    ("pwrite64", "writing snapshot files"),
    ("readv", "reading snapshot files and sockets"),
    ("writev", "writing snapshot files and sockets"),
    ("ftruncate", "sizing the guest memory file and snapshots"),
    ("fallocate", "sizing snapshot files"),
    (
        "fsync",
        "a snapshot file is durable before it is reported written",
    ),
    (
        "fdatasync",
        "a snapshot file is durable before it is reported written",
    ),
    (
        "rename",
        "a snapshot appears under its name only when complete",
    ),
    (
        "renameat",
        "a snapshot appears under its name only when complete",
    ),
    (
        "renameat2",
        "a snapshot appears under its name only when complete",
    ),
    ("unlink", "removing a partial snapshot or a stale socket"),
    ("unlinkat", "removing a partial snapshot or a stale socket"),
    ("readlink", "resolving paths"),
    ("getcwd", "making paths absolute"),
    ("getdents64", "listing directories"),
    ("fcntl", "descriptor flags"),
    ("dup", "sharing descriptors between devices"),
    ("dup3", "sharing descriptors between devices"),
    ("pipe2", "internal wake-ups"),
    ("memfd_create", "the guest memory file"),
    ("eventfd2", "irqfds, ioeventfds, stop and wake events"),
    (
        "epoll_create1",
        "the workers' and INTx resampler's event loops",
    ),
    ("epoll_ctl", "event loops"),
    ("epoll_wait", "event loops"),
    ("epoll_pwait", "event loops"),
    (
        "poll",
        "waiting on the VM's exit, the API's requests and migrations",
    ),
    (
        "ppoll",
        "waiting on the VM's exit, the API's requests and migrations",
    ),
    ("socket", "migration sockets; the tap's ioctl socket"),
    ("socketpair", "internal channels"),
    ("bind", "migration listeners"),
    ("listen", "migration listeners"),
    ("accept4", "an incoming migration"),
    ("accept", "an incoming migration"),
    ("connect", "migration"),
    ("getsockname", "the address a migration listener got"),
    ("getpeername", "migration peers"),
    ("setsockopt", "socket options"),
    ("getsockopt", "socket errors"),
    ("sendto", "migration stream"),
    ("recvfrom", "migration stream"),
    ("sendmsg", "migration stream"),
    ("recvmsg", "migration stream"),
    ("shutdown", "ending a migration stream"),
    (
        "ioctl",
        "KVM (VM, vCPUs, irqfds, memory slots, dirty logs), taps, the terminal",
    ),
    ("rt_sigaction", "the vCPU kick handler"),
    ("kill", "signalling"),
    ("mincore", "finding resident guest pages"),
    ("msync", "flushing mapped files"),
    ("uname", "host facts"),
    ("sysinfo", "host facts"),
    ("getuid", "who abide runs as"),
    ("geteuid", "who abide runs as"),
    ("getgid", "who abide runs as"),
    ("getegid", "who abide runs as"),
];

/// Present on every list when abide drops to `--user`/`--group`: glibc
/// makes every running thread repeat the set*id calls (its setxid signal).
pub(super) const SETID: &[Entry] = &[
    (
        "setresuid",
        "--user: glibc applies the drop to every thread",
    ),
    (
        "setresgid",
        "--group: glibc applies the drop to every thread",
    ),
    (
        "setgroups",
        "--user: glibc applies the drop to every thread",
    ),
];

/// The list for a thread kind: its groups, and those of the threads it
/// starts.
pub(super) fn for_kind(kind: ThreadKind) -> Vec<&'static [Entry]> {
    use ThreadKind::*;
    match kind {
        // Builds everything and starts every other kind of thread: what a
        // received VM's builder does, and restoring memory chunk by chunk.
        Control => {
            let mut l = for_kind(Incoming);
            l.extend([MEMORY, RESTORE]);
            l
        }
        // Builds a received VM (no snapshot file, so no memory loader).
        Incoming => vec![
            BASE,
            SPAWN,
            WORKER,
            WORKER_SETUP,
            BLK,
            NET,
            VCPU,
            API,
            PROBE,
            MIGRATION,
            CONTROL,
        ],
        // Starts device workers when the guest activates a device.
        Vcpu => vec![BASE, SPAWN, WORKER, WORKER_SETUP, BLK, NET, VCPU],
        Api => vec![BASE, API, PROBE],
        Blk => vec![BASE, WORKER, BLK],
        Net => vec![BASE, WORKER, NET],
        Rng => vec![BASE, WORKER],
        // Pausing the vCPUs and saving their state; may restart workers
        // when the migration fails and the guest runs on.
        Migration => vec![
            BASE,
            SPAWN,
            WORKER,
            WORKER_SETUP,
            BLK,
            NET,
            VCPU,
            PROBE,
            MIGRATION,
        ],
        Console => vec![BASE],
        Intx => vec![BASE, WORKER],
        Announce => vec![BASE, NET],
        Memory => vec![BASE, MEMORY],
    }
}
