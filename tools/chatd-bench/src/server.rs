//! The server processes `--server-pid` names: their memory and CPU time
//! from /proc, and the check, before the run, that each is alive and
//! listens on an address the clients connect to (else the figures would be
//! another process's).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Resident memory and CPU time of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub rss_bytes: u64,
    pub cpu: Duration,
}

fn usage_of(pid: &str) -> Option<Usage> {
    // VmRSS is in KiB whatever the page size (statm counts pages).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let rss_kib: u64 = rss_line.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Usage {
        rss_bytes: rss_kib * 1024,
        // USER_HZ is 100 on Linux.
        cpu: Duration::from_millis(ticks * 10),
    })
}

/// The generator's own usage.
pub fn own_usage() -> Usage {
    usage_of("self").unwrap_or_default()
}

/// The server processes of `--server-pid`, read from /proc.
pub struct ServerProcesses {
    /// Their pids, as /proc path components; empty without `--server-pid`.
    pids: Vec<String>,
}

impl ServerProcesses {
    pub fn new(pids: &[u32]) -> ServerProcesses {
        ServerProcesses {
            pids: pids.iter().map(u32::to_string).collect(),
        }
    }

    /// Summed over every server process; none if any cannot be read (a sum
    /// over part of them would be wrong), or without `--server-pid`.
    pub fn usage(&self) -> Option<Usage> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().try_fold(Usage::default(), |sum, pid| {
            let one = usage_of(pid)?;
            Some(Usage {
                rss_bytes: sum.rss_bytes + one.rss_bytes,
                cpu: sum.cpu + one.cpu,
            })
        })
    }
}

/// How long a server named by `--server-pid` may take to listen, so that
/// `chatd & chatd-bench --server-pid $!` works without a sleep between.
pub const LISTEN_WAIT: Duration = Duration::from_secs(5);

/// Checks that every one of `pids` is a live process that listens on one
/// of `addrs` (its own socket, found through its descriptors), waiting up
/// to `wait` for it to start listening. `Err` is the one-line reason the
/// run must not start: a pid that does not exist, exits, or never listens
/// there (another server holds the port, or the pid is a wrapper's).
/// `Ok` carries warnings for the pids that could not be checked (another
/// user's process: its descriptors are not ours to list).
pub fn check_listening(
    pids: &[u32],
    addrs: &[SocketAddr],
    wait: Duration,
) -> Result<Vec<String>, String> {
    let start = Instant::now();
    let shown: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
    let shown = shown.join(",");
    let mut warnings = Vec::new();
    for &pid in pids {
        if !std::fs::exists(format!("/proc/{pid}")).unwrap_or(false) {
            return Err(format!("--server-pid {pid}: no such process"));
        }
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|comm| comm.trim().to_string())
            .unwrap_or_default();
        loop {
            match listens_on(pid, addrs) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    warnings.push(format!(
                        "cannot check that --server-pid {pid} ({name}) listens on {shown} \
                         ({e}); its figures are trusted as the server's"
                    ));
                    break;
                }
            }
            if !is_alive(pid) {
                return Err(format!(
                    "--server-pid {pid} ({name}) exited without listening on {shown}: \
                     is another server already on that port?"
                ));
            }
            if start.elapsed() >= wait {
                return Err(format!(
                    "--server-pid {pid} ({name}) does not listen on {shown} (waited {} s): \
                     another process may hold the port, or {pid} is not the server itself",
                    wait.as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(warnings)
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// Whether one of `pid`'s own sockets listens on one of `addrs`.
fn listens_on(pid: u32, addrs: &[SocketAddr]) -> std::io::Result<bool> {
    let mut sockets = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue; // closed meanwhile
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|inode| inode.parse::<u64>().ok())
        {
            sockets.insert(inode);
        }
    }
    for table in ["tcp", "tcp6"] {
        // Every socket of the process's network namespace: the inodes say
        // which are its own. No tcp6 without IPv6.
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        let found = listeners(&text).into_iter().any(|(local, inode)| {
            sockets.contains(&inode) && addrs.iter().any(|addr| serves(local, *addr))
        });
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The listening sockets of a /proc/net/tcp or tcp6 table: local address
/// and inode.
fn listeners(table: &str) -> Vec<(SocketAddr, u64)> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                return None;
            }
            let local = parse_proc_addr(fields.get(1)?)?;
            let inode = fields.get(9)?.parse().ok()?;
            Some((local, inode))
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the address
/// in words of 32 bits as the kernel holds them, printed in hex; the port
/// in hex.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in 0..ip.len() / 8 {
        let word = u32::from_str_radix(ip.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match (ip.len(), bytes.len()) {
        (8, 4) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        (32, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether a socket listening on `local` takes connections to `addr`: the
/// same port, and the same address or any (`0.0.0.0`, `::`).
fn serves(local: SocketAddr, addr: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    local.port() == addr.port()
        && (local.ip().is_unspecified() || canonical(local.ip()) == canonical(addr.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_sockets_of_proc_net_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0000000000000000 100 0 0 10 0
";
        let want: Vec<(SocketAddr, u64)> = vec![
            ("127.0.0.1:8080".parse().unwrap(), 4242),
            ("0.0.0.0:80".parse().unwrap(), 17),
        ];
        assert_eq!(listeners(tcp), want, "the established socket is left out");
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listeners(tcp6), vec![("[::1]:8081".parse().unwrap(), 99)]);
        assert_eq!(parse_proc_addr("0100007F"), None);
        assert_eq!(parse_proc_addr("0100007:1F90"), None);
    }

    #[test]
    fn a_listener_serves_its_port_on_its_address_or_any() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        for (local, serves_it) in [
            ("127.0.0.1:8080", true),
            ("0.0.0.0:8080", true),
            ("[::]:8080", true),
            ("[::ffff:127.0.0.1]:8080", true),
            ("127.0.0.1:8081", false),
            ("127.0.0.2:8080", false),
            ("[::1]:8080", false),
        ] {
            let local: SocketAddr = local.parse().unwrap();
            assert_eq!(serves(local, addr), serves_it, "{local}");
        }
    }
}
