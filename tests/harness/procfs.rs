//! `/proc` readers: resident memory, open fds, child processes.

use std::fs;

// ---------------------------------------------------------------------------
// /proc

/// A field of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`); 0 if missing.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

pub fn vm_rss_bytes(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS") * 1024
}

/// Entries of `/proc/PID/fd`.
pub fn open_fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// The files under `dir` that process `pid` holds open after they were
/// unlinked (`/proc/PID/fd` links that end in ` (deleted)`).
pub fn deleted_files_open(pid: u32, dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| {
            target.starts_with(&*dir.to_string_lossy()) && target.ends_with(" (deleted)")
        })
        .collect()
}

/// The files under `dir` that process `pid` has mapped after they were
/// unlinked (`/proc/PID/maps` lines that end in ` (deleted)`), each once.
pub fn deleted_files_mapped(pid: u32, dir: &std::path::Path) -> Vec<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let dir = dir.to_string_lossy();
    let mut files: Vec<String> = maps
        .lines()
        .filter_map(|line| line.find('/').map(|at| &line[at..]))
        .filter(|path| path.starts_with(&*dir) && path.ends_with(" (deleted)"))
        .map(str::to_owned)
        .collect();
    files.sort();
    files.dedup();
    files
}

/// The partial files (`*.partial`) under `dir` that process `pid` holds
/// open, linked or unlinked: their sizes and whether they were unlinked,
/// by inode (a file open twice, the writer's handle and the readers', is
/// one entry).
pub fn partial_files_open(
    pid: u32,
    dir: &std::path::Path,
) -> std::collections::HashMap<u64, (u64, bool)> {
    use std::os::unix::fs::MetadataExt;
    // As the kernel spells the links' targets.
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return std::collections::HashMap::new();
    };
    entries
        .filter_map(|entry| {
            let link = entry.ok()?.path();
            let target = fs::read_link(&link).ok()?;
            let target = target.to_string_lossy();
            if !target.starts_with(&*dir.to_string_lossy()) || !target.contains(".partial") {
                return None;
            }
            // Through the link: the file itself, unlinked or not.
            let metadata = fs::metadata(&link).ok()?;
            Some((
                metadata.ino(),
                (metadata.len(), target.ends_with(" (deleted)")),
            ))
        })
        .collect()
}

/// Whether process `pid` holds an open socket connected to `peer` (an IPv4
/// TCP peer on this host): `/proc/PID/net/tcp`'s entries whose remote end is
/// `peer`, looked up among the socket inodes of `/proc/PID/fd`. A socket the
/// process closed has left its fds, whatever state TCP keeps it in.
pub fn holds_connection_to(pid: u32, peer: std::net::SocketAddrV4) -> bool {
    connections_to(pid, peer) > 0
}

/// How many open sockets of process `pid` are connected to `peer` (as
/// [`holds_connection_to`] finds them).
pub fn connections_to(pid: u32, peer: std::net::SocketAddrV4) -> usize {
    let wanted = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(peer.ip().octets()),
        peer.port()
    );
    let table = fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let inodes: std::collections::HashSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(2) != Some(&wanted.as_str()) {
                return None;
            }
            Some(format!("socket:[{}]", fields.get(9)?))
        })
        .collect();
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| {
            target
                .to_str()
                .is_some_and(|target| inodes.contains(target))
        })
        .count()
}

/// The fields of `/proc/net/tcp`'s entry for the established IPv4 TCP
/// connection from `local` to `peer` on this host, if there is one.
fn tcp_entry(local: std::net::SocketAddrV4, peer: std::net::SocketAddrV4) -> Option<Vec<String>> {
    // The kernel prints the address as the u32 in host byte order.
    let hex = |addr: std::net::SocketAddrV4| {
        format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(addr.ip().octets()),
            addr.port()
        )
    };
    let (local, peer) = (hex(local), hex(peer));
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        // `01`: ESTABLISHED.
        (fields.get(1) == Some(&local)
            && fields.get(2) == Some(&peer)
            && fields.get(3).map(String::as_str) == Some("01"))
        .then_some(fields)
    })
}

/// The bytes of one IPv4 TCP connection on this host that are in the
/// kernel, between the two applications: what `local`'s socket has
/// received and not yet read (`rx_queue` of its `/proc/net/tcp` entry)
/// plus what its peer's socket holds unsent or unacknowledged (the
/// peer's `tx_queue`). For a connection whose reader stopped and whose
/// writer is blocked, that is every byte written and not read. `None`
/// unless both ends are found established.
pub fn bytes_between(local: std::net::SocketAddrV4, peer: std::net::SocketAddrV4) -> Option<u64> {
    let queue = |from, to, received: bool| {
        let fields = tcp_entry(from, to)?;
        let (tx, rx) = fields.get(4)?.split_once(':')?;
        u64::from_str_radix(if received { rx } else { tx }, 16).ok()
    };
    Some(queue(local, peer, true)? + queue(peer, local, false)?)
}

/// The keepalive timer of the IPv4 TCP connection from `local` to `peer`
/// on this host: the time left until its next probe, if the kernel has
/// that timer armed on `local`'s socket (`02` in the `tr` field of its
/// `/proc/net/tcp` entry, `tm->when` in clock ticks, 100 a second); `None`
/// if no keepalive (or another timer, a retransmission) is pending.
pub fn keepalive_timer(
    local: std::net::SocketAddrV4,
    peer: std::net::SocketAddrV4,
) -> Option<std::time::Duration> {
    let fields = tcp_entry(local, peer)?;
    let (timer, when) = fields.get(5)?.split_once(':')?;
    if timer != "02" {
        return None;
    }
    let ticks = u64::from_str_radix(when, 16).ok()?;
    Some(std::time::Duration::from_millis(ticks * 10))
}

/// The keepalive timers of this host's established IPv4 TCP connections
/// to `peer` (from any local address): for each whose socket has that
/// timer armed, the time left until its next probe (as
/// [`keepalive_timer`]).
pub fn keepalive_timers_to(peer: std::net::SocketAddrV4) -> Vec<std::time::Duration> {
    let peer = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(peer.ip().octets()),
        peer.port()
    );
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `01`: ESTABLISHED.
            if fields.get(2) != Some(&peer.as_str()) || fields.get(3) != Some(&"01") {
                return None;
            }
            let (timer, when) = fields.get(5)?.split_once(':')?;
            let ticks = u64::from_str_radix(when, 16).ok()?;
            (timer == "02").then(|| std::time::Duration::from_millis(ticks * 10))
        })
        .collect()
}

/// One line of `/proc/PID/stat`, the parts the tests need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub parent: u32,
    pub command: String,
    /// `R`, `S`, `D`, `Z`, …
    pub state: char,
}

pub fn process_info(pid: u32) -> Option<ProcessInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (command, mut rest) = split_stat(&stat)?;
    let state = rest.next()?.chars().next()?;
    let parent = rest.next()?.parse().ok()?;
    Some(ProcessInfo {
        pid,
        parent,
        command: command.to_owned(),
        state,
    })
}

/// Whether every thread of process `pid` is stopped (`T`): `kill(SIGSTOP)`
/// returns before they are, and a thread still running may answer a
/// request meanwhile.
pub fn threads_stopped(pid: u32) -> bool {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    // A thread's stat is also at /proc/TID/stat.
    entries.flatten().all(|task| {
        task.file_name()
            .to_str()
            .and_then(|tid| tid.parse().ok())
            .and_then(process_info)
            .is_some_and(|thread| thread.state == 'T')
    })
}

/// A `stat` line of `/proc` (`pid (comm) state ppid …`) as its `comm` and
/// the fields after it, from `state` (field 3) on. `comm` may hold spaces
/// and parentheses.
fn split_stat(stat: &str) -> Option<(&str, std::str::SplitWhitespace<'_>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some((&stat[open + 1..close], stat[close + 1..].split_whitespace()))
}

/// Every process whose parent is `parent` (scans `/proc/*/stat`).
pub fn child_processes(parent: u32) -> Vec<ProcessInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(process_info)
        .filter(|info| info.parent == parent)
        .collect()
}

/// Children of `parent` that are zombies or named `git`.
pub fn zombie_or_git_children(parent: u32) -> Vec<ProcessInfo> {
    child_processes(parent)
        .into_iter()
        .filter(|info| {
            info.state == 'Z' || info.command == "git" || info.command.starts_with("git-")
        })
        .collect()
}

/// Whether a process with this id exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    process_info(pid).is_some_and(|info| info.state != 'Z')
}

/// One thread of a process: its name and nice value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadNice {
    pub tid: u32,
    pub name: String,
    pub nice: i32,
}

/// The threads of `pid` (`/proc/{pid}/task/*/stat`) with their nice values.
pub fn thread_nice_values(pid: u32) -> Vec<ThreadNice> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            let (name, mut rest) = split_stat(&stat)?;
            // From state, field 3, to nice, field 19.
            let nice = rest.nth(16)?.parse().ok()?;
            Some(ThreadNice {
                tid,
                name: name.to_owned(),
                nice,
            })
        })
        .collect()
}

/// CPU time (user and system, in clock ticks of 10 ms) that the threads of
/// `pid` named `name` (as `/proc` shows it: 15 bytes at most) have used,
/// its main thread left out.
pub fn thread_cpu_ticks(pid: u32, name: &str) -> u64 {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            let (comm, mut rest) = split_stat(&stat)?;
            if tid == pid || comm != name {
                return None;
            }
            // utime and stime, fields 14 and 15 (state is field 3).
            let user: u64 = rest.nth(11)?.parse().ok()?;
            let system: u64 = rest.next()?.parse().ok()?;
            Some(user + system)
        })
        .sum()
}

/// CPU time (user and system, in clock ticks of 10 ms) that process `pid`
/// has used, all its threads together.
pub fn process_cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, mut rest)) = split_stat(&stat) else {
        return 0;
    };
    let user: u64 = rest
        .nth(11)
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    let system: u64 = rest
        .next()
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    user + system
}

/// The nice value of process `pid` (its main thread).
pub fn process_nice(pid: u32) -> Option<i32> {
    thread_nice_values(pid)
        .into_iter()
        .find(|thread| thread.tid == pid)
        .map(|thread| thread.nice)
}
