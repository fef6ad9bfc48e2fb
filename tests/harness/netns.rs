//! Hosts in network namespaces, for the fleet test (`tests/fleet.rs`).
//!
//! - [`Network`]: namespaces joined by veth pairs on a bridge that itself
//!   lives in a namespace (the "switch"), so the test subnet exists only
//!   inside them and nothing reaches the machine's own interfaces. Dropping
//!   it deletes every namespace (which deletes their links and the
//!   iptables rules inside them); [`Network::remove_stale`] removes the
//!   namespaces an interrupted run left behind.
//! - [`enter`]: moves the calling thread into a namespace (`setns(2)`, per
//!   thread), so the test's own sockets (clients, scrapes, Prometheus API
//!   calls) are made from a host of the fleet.
//! - [`NsProcess`]: a program started with `ip netns exec` (which execs it:
//!   the pid is the program's own, so signals reach it directly), with its
//!   output in a log file, stopped on drop.
//! - [`TmpfsMount`]: a small tmpfs, unmounted on drop.
//! - [`Relay`]: a throttling TCP relay, the substitute for `tc netem` where
//!   the kernel has no netem module.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;

use crate::wait_until;

/// Runs a command; `Err` with its output unless it exits 0.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("{program}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        ))
    }
}

/// Runs a command and panics with its output unless it exits 0.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|error| panic!("{error}"))
}

/// `ip netns exec {ns} {args…}`.
pub fn ns_run(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Why namespaces cannot be used here (`None`: they can): not root, or
/// `ip netns add` fails.
pub fn unavailable_reason(prefix: &str) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".to_owned());
    }
    let probe = format!("{prefix}-probe");
    let _ = run("ip", &["netns", "del", &probe]);
    if let Err(error) = run("ip", &["netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace: {error}"));
    }
    let _ = run("ip", &["netns", "del", &probe]);
    None
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter(ns: &str) {
    let file = fs::File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|error| panic!("open the namespace {ns}: {error}"));
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|error| panic!("setns into {ns}: {error}"));
}

/// Spawns a thread (small stack) that enters `ns` and runs `work`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_owned();
    std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(move || {
            enter(&ns);
            work()
        })
        .expect("spawn a thread")
}

// ---------------------------------------------------------------------------
// The network

/// Namespaces `{prefix}-{host}` on one /24, bridged in `{prefix}-switch`.
pub struct Network {
    prefix: String,
    namespaces: Vec<String>,
}

impl Network {
    /// Deletes every namespace whose name starts with `{prefix}-`.
    pub fn remove_stale(prefix: &str) {
        let listing = run("ip", &["netns", "list"]).unwrap_or_default();
        for line in listing.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{prefix}-")) {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }

    /// Creates the switch and one namespace per `(host, address)`, each
    /// with `eth0` at `address/24` and `lo` up.
    pub fn create(prefix: &str, hosts: &[(&str, &str)]) -> Network {
        Network::remove_stale(prefix);
        let switch = format!("{prefix}-switch");
        let bridge = format!("{prefix}-br0");
        let mut network = Network {
            prefix: prefix.to_owned(),
            namespaces: vec![switch.clone()],
        };
        run_ok("ip", &["netns", "add", &switch]);
        run_ok(
            "ip",
            &["-n", &switch, "link", "add", &bridge, "type", "bridge"],
        );
        run_ok("ip", &["-n", &switch, "link", "set", &bridge, "up"]);
        for (host, address) in hosts {
            let ns = network.ns(host);
            run_ok("ip", &["netns", "add", &ns]);
            network.namespaces.push(ns.clone());
            let port = network.switch_port(host);
            run_ok(
                "ip",
                &[
                    "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            );
            run_ok(
                "ip",
                &["-n", &switch, "link", "set", &port, "master", &bridge, "up"],
            );
            run_ok(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{address}/24"),
                    "dev",
                    "eth0",
                ],
            );
            run_ok("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            run_ok("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        network
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// The host's veth end on the bridge (`{prefix}-{host}`, at most 15
    /// bytes, the kernel's limit for a link name).
    fn switch_port(&self, host: &str) -> String {
        let mut name = format!("{}-{host}", self.prefix);
        name.truncate(15);
        name
    }

    /// Drops every packet to and from `host` (iptables in its namespace).
    pub fn blackhole(&self, host: &str) {
        let ns = self.ns(host);
        ns_run(
            &ns,
            &["iptables", "-I", "INPUT", "-i", "eth0", "-j", "DROP"],
        )
        .unwrap_or_else(|error| panic!("{error}"));
        ns_run(
            &ns,
            &["iptables", "-I", "OUTPUT", "-o", "eth0", "-j", "DROP"],
        )
        .unwrap_or_else(|error| panic!("{error}"));
    }

    /// Lifts [`Network::blackhole`].
    pub fn restore(&self, host: &str) {
        let ns = self.ns(host);
        let _ = ns_run(
            &ns,
            &["iptables", "-D", "INPUT", "-i", "eth0", "-j", "DROP"],
        );
        let _ = ns_run(
            &ns,
            &["iptables", "-D", "OUTPUT", "-o", "eth0", "-j", "DROP"],
        );
    }

    /// Whether `tc qdisc … netem` works in `host`'s namespace (it needs the
    /// kernel's sch_netem module).
    pub fn netem_available(&self, host: &str) -> bool {
        let ns = self.ns(host);
        let added = ns_run(
            &ns,
            &[
                "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms",
            ],
        )
        .is_ok();
        if added {
            let _ = ns_run(&ns, &["tc", "qdisc", "del", "dev", "eth0", "root"]);
        }
        added
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(error) = run("ip", &["netns", "del", ns]) {
                eprintln!("cannot delete namespace {ns}: {error}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Processes in a namespace

/// How long a process gets to exit after SIGTERM in `Drop` before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A program running in a namespace (`ip netns exec ns program …`).
pub struct NsProcess {
    pub name: String,
    child: Child,
    exit: Option<ExitStatus>,
    pub pid: u32,
    pub log_path: PathBuf,
}

impl NsProcess {
    /// Starts `program args` in `ns` with a clean environment (`PATH`, and
    /// `HOME` = `home`), stdout and stderr appended to `log_path`.
    pub fn spawn(
        ns: &str,
        name: &str,
        program: &Path,
        args: &[OsString],
        home: &Path,
        log_path: &Path,
    ) -> NsProcess {
        fs::create_dir_all(home).expect("create the process's home");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .expect("open the log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", home)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .current_dir(home)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", program.display()));
        NsProcess {
            name: name.to_owned(),
            pid: child.id(),
            child,
            exit: None,
            log_path: log_path.to_path_buf(),
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).expect("pid fits i32"));
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// Sends SIGSTOP and waits (up to 5 s) until every thread of the
    /// process is stopped: `kill` returns before the threads stop, and a
    /// thread that is running meanwhile may still answer a request.
    /// Returns whether they all stopped.
    pub fn suspend(&self) -> bool {
        self.signal(Signal::SIGSTOP);
        crate::service::wait_until(Duration::from_secs(5), || {
            crate::procfs::threads_stopped(self.pid)
        })
    }

    /// True until the process has exited (and then it is reaped).
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exit = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Waits up to `timeout` for the exit; its status if it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || !self.is_running());
        self.exit
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exit = Some(status);
            }
        }
    }

    /// SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM, then
    /// SIGKILL after [`STOP_TIMEOUT`].
    pub fn stop(&mut self) {
        if !self.is_running() {
            return;
        }
        self.signal(Signal::SIGCONT);
        self.signal(Signal::SIGTERM);
        if self.wait_exit(STOP_TIMEOUT).is_none() {
            eprintln!(
                "{} (pid {}) ignored SIGTERM; killing it",
                self.name, self.pid
            );
            self.kill();
        }
    }

    /// Resident set size, peak resident set size (bytes).
    pub fn memory(&self) -> (u64, u64) {
        (
            crate::proc_status_kib(self.pid, "VmRSS") * 1024,
            crate::proc_status_kib(self.pid, "VmHWM") * 1024,
        )
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// tmpfs

/// A tmpfs mounted at a directory (created), unmounted on drop.
pub struct TmpfsMount {
    pub path: PathBuf,
}

impl TmpfsMount {
    pub fn mount(path: &Path, size: &str) -> TmpfsMount {
        TmpfsMount::mount_with(path, &format!("size={size}"))
    }

    /// One with room for at most `inodes` files and directories.
    pub fn mount_with_inodes(path: &Path, size: &str, inodes: u64) -> TmpfsMount {
        TmpfsMount::mount_with(path, &format!("size={size},nr_inodes={inodes}"))
    }

    fn mount_with(path: &Path, options: &str) -> TmpfsMount {
        fs::create_dir_all(path).expect("create the mount point");
        let target = path.to_str().expect("a UTF-8 path");
        run_ok(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("{options},mode=0700"),
                "gitball-fleet",
                target,
            ],
        );
        TmpfsMount {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let target = self.path.to_string_lossy().into_owned();
        if let Err(error) = run("umount", &[&target]) {
            eprintln!("umount {target}: {error}; retrying lazily");
            let _ = run("umount", &["-l", &target]);
        }
    }
}

// ---------------------------------------------------------------------------
// A slow, stalling link

/// How the [`Relay`] slows the bytes it carries.
#[derive(Clone, Copy, Debug)]
pub struct Throttle {
    /// Bytes per second, each direction, per connection.
    pub bytes_per_second: u64,
    /// Every this many bytes, the link stalls for `stall` (as a lost
    /// segment's retransmission would).
    pub stall_every_bytes: u64,
    pub stall: Duration,
}

/// A TCP relay in a namespace: accepts on `listen`, connects to `target`,
/// and copies both ways at most `bytes_per_second`, stalling now and then.
/// Stopped (listener and connections closed) on drop.
pub struct Relay {
    pub listen: SocketAddr,
    stop: Arc<AtomicBool>,
    pub relayed_bytes: Arc<AtomicU64>,
    accept_thread: Option<std::thread::JoinHandle<()>>,
}

/// Size of the relay's copy chunks (small, so the pace is smooth).
const RELAY_CHUNK_BYTES: usize = 16 * 1024;

impl Relay {
    pub fn start(ns: &str, listen: SocketAddr, target: SocketAddr, throttle: Throttle) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let relayed_bytes = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let accept_thread = {
            let stop = stop.clone();
            let relayed_bytes = relayed_bytes.clone();
            let ns = ns.to_owned();
            std::thread::spawn(move || {
                enter(&ns);
                let listener = TcpListener::bind(listen).expect("bind the relay");
                listener
                    .set_nonblocking(true)
                    .expect("a non-blocking listener");
                ready_tx.send(()).expect("report the relay ready");
                // Bounded by `stop`: the owner sets it on drop.
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let ns = ns.clone();
                            let stop = stop.clone();
                            let relayed_bytes = relayed_bytes.clone();
                            std::thread::spawn(move || {
                                enter(&ns);
                                relay_connection(client, target, throttle, &stop, &relayed_bytes);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the relay starts");
        Relay {
            listen,
            stop,
            relayed_bytes,
            accept_thread: Some(accept_thread),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

fn relay_connection(
    client: TcpStream,
    target: SocketAddr,
    throttle: Throttle,
    stop: &Arc<AtomicBool>,
    relayed: &Arc<AtomicU64>,
) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
        return;
    };
    let (Ok(client_read), Ok(server_read)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = {
        let stop = stop.clone();
        let relayed = relayed.clone();
        std::thread::spawn(move || copy_throttled(client_read, server, throttle, &stop, &relayed))
    };
    copy_throttled(server_read, client, throttle, stop, relayed);
    let _ = up.join();
}

/// Copies `from` to `to` at the throttle's pace until EOF, an error or
/// `stop`; then shuts `to`'s write side (an upstream EOF becomes the
/// client's EOF) or, on an error, both sides.
fn copy_throttled(
    mut from: TcpStream,
    mut to: TcpStream,
    throttle: Throttle,
    stop: &AtomicBool,
    relayed: &AtomicU64,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buffer = vec![0u8; RELAY_CHUNK_BYTES];
    let mut since_stall: u64 = 0;
    let per_chunk =
        Duration::from_secs_f64(RELAY_CHUNK_BYTES as f64 / throttle.bytes_per_second as f64);
    loop {
        if stop.load(Ordering::Relaxed) {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        let n = match from.read(&mut buffer) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        };
        if to.write_all(&buffer[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
        relayed.fetch_add(n as u64, Ordering::Relaxed);
        since_stall += n as u64;
        // Pace: a full chunk takes `per_chunk`; a short read proportionally less.
        std::thread::sleep(per_chunk.mul_f64(n as f64 / RELAY_CHUNK_BYTES as f64));
        if since_stall >= throttle.stall_every_bytes {
            since_stall = 0;
            std::thread::sleep(throttle.stall);
        }
    }
}
