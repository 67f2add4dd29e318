//! Other processes as the benches measure them: pinning to cores with `taskset`, CPU
//! time from `/proc/<pid>/stat`, and the release `signet-ca` binary run on its own;
//! and `per_op`, the time of one operation in this process.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{cluster::free_port, http_get, workspace};

/// Microseconds per operation of `f`, run for about half a second.
pub fn per_op(mut f: impl FnMut()) -> f64 {
    f();
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < Duration::from_millis(500) || n < 20 {
        f();
        n += 1;
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

/// Pins every thread of process `pid` to the cores in `cores` (taskset's list form,
/// "0" or "0,1").
pub fn pin(pid: u32, cores: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-pc", cores, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset could not pin pid {pid} to cores {cores}");
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses: state is the first,
    // utime the twelfth, stime the thirteenth.
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    Duration::from_secs_f64(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The release `signet-ca` binary (`profile` "release", or "profiling" for perf), or
/// exit 2 with what to build.
pub fn ca_binary(profile: &str) -> PathBuf {
    let binary = workspace().join("target").join(profile).join("signet-ca");
    if !binary.exists() {
        eprintln!(
            "{} is missing: cargo build --profile {profile} -p signet-ca first",
            binary.display()
        );
        std::process::exit(2);
    }
    binary
}

/// A child process killed when dropped.
pub struct Killed(pub Child);

impl Killed {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a child's output to the end on a thread of its own and drops it, as a
/// container runtime reads a container's log pipe.
pub fn drain(out: impl std::io::Read + Send + 'static) {
    std::thread::spawn(move || {
        let mut out = out;
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
}

/// `signet-ca serve` as its own process, pinned with `taskset` to `cores`, on
/// loopback ports of its own, its log read and dropped; killed when dropped.
pub struct CaProcess {
    process: Killed,
    /// Its gRPC (CreateCertificate) address.
    pub grpc: SocketAddr,
    /// Its HTTP (metrics, health) address.
    pub http: SocketAddr,
}

impl CaProcess {
    /// Starts `binary serve <args>` and waits until `/readyz` says ready (panics if
    /// it exits first).
    pub async fn start(binary: &Path, args: &[String], cores: &str) -> Self {
        let addr = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
        let (grpc, http) = (addr(), addr());
        let mut child = Command::new("taskset")
            .args(["-c", cores])
            .arg(binary)
            .arg("serve")
            .args(args)
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--http-addr", &http.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The audit log goes to a pipe that is read, as a container runtime reads it.
        drain(child.stderr.take().unwrap());
        let mut process = Killed(child);
        while http_get(http, "/readyz").await.ok().map(|(code, _)| code) != Some(200) {
            if let Some(status) = process.0.try_wait().unwrap() {
                panic!("signet-ca exited before it was ready: {status}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            process,
            grpc,
            http,
        }
    }

    /// Its pid (taskset execs the binary in place).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}
