//! Readers for the /proc files the drivers report from: a process's resident
//! memory and CPU time, and the kernel's slab. Parsers are separate from the
//! reads so they can be tested on fixed text.

use std::fs;
use std::io;

/// Linux reports `utime`/`stime` in USER_HZ ticks, 100 per second on every
/// mainstream architecture (the ABI fixes it, whatever CONFIG_HZ is).
const USER_HZ: u64 = 100;

/// Resident set size of a process (`VmRSS` of /proc/PID/status), in bytes.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    kb_field(&text, "VmRSS:")
        .map(|kb| kb * 1024)
        .ok_or_else(|| bad_data(format!("/proc/{pid}/status has no VmRSS")))
}

/// Kernel slab memory (`Slab` of /proc/meminfo: reclaimable and not), in bytes.
pub fn slab_bytes() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo")?;
    kb_field(&text, "Slab:")
        .map(|kb| kb * 1024)
        .ok_or_else(|| bad_data("/proc/meminfo has no Slab".to_string()))
}

/// This process's soft limit on open files (`Max open files` of /proc/self/limits).
pub fn open_files_max() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/self/limits")?;
    limits_soft(&text, "Max open files")
        .ok_or_else(|| bad_data("/proc/self/limits has no open-files limit".to_string()))
}

/// The soft value of a /proc/PID/limits row (`u64::MAX` for "unlimited").
pub fn limits_soft(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(name))?;
    match line[name.len()..].split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        value => value.parse().ok(),
    }
}

/// CPU time (user + system) used so far by all threads of a process, in ns.
///
/// Sums the nanosecond run times of /proc/PID/task/*/schedstat; where that is
/// not available, falls back to the tick-resolution `utime + stime` of
/// /proc/PID/stat. Threads that already exited are missing from the sum, which
/// is fine for the long-lived threads of a server or a driver.
pub fn cpu_ns(pid: u32) -> io::Result<u64> {
    match schedstat_ns(pid) {
        Ok(ns) => Ok(ns),
        Err(_) => {
            let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
            stat_cpu_ticks(&text)
                .map(|ticks| ticks * (1_000_000_000 / USER_HZ))
                .ok_or_else(|| bad_data(format!("cannot parse /proc/{pid}/stat")))
        }
    }
}

fn schedstat_ns(pid: u32) -> io::Result<u64> {
    let mut total_ns = 0u64;
    let mut tasks = 0usize;
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between the listing and the read: skip it.
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let first = text.split_whitespace().next();
        let ns = first
            .and_then(|field| field.parse::<u64>().ok())
            .ok_or_else(|| bad_data(format!("cannot parse {}", path.display())))?;
        total_ns += ns;
        tasks += 1;
    }
    if tasks == 0 {
        return Err(bad_data(format!("/proc/{pid}/task lists no thread")));
    }
    Ok(total_ns)
}

/// `utime + stime` (fields 14 and 15) of a /proc/PID/stat line, in ticks.
/// The command name (field 2) may hold spaces and parentheses, so fields are
/// counted from after its last ')'.
pub fn stat_cpu_ticks(text: &str) -> Option<u64> {
    let after_comm = &text[text.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    // after_comm starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value of a `Name:   123 kB` line.
pub fn kb_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(name))?;
    let mut parts = line[name.len()..].split_whitespace();
    let value = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

fn bad_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kb_fields() {
        let status = "Name:\tiris\nVmPeak:\t  9000 kB\nVmRSS:\t    5632 kB\nThreads:\t3\n";
        assert_eq!(kb_field(status, "VmRSS:"), Some(5632));
        assert_eq!(kb_field(status, "VmSwap:"), None);
        let meminfo = "MemTotal:  8000000 kB\nSlab:              52484 kB\n";
        assert_eq!(kb_field(meminfo, "Slab:"), Some(52484));
    }

    #[test]
    fn parses_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            20000                20000                files     \n\
                      Max locked memory         unlimited            unlimited            bytes     \n";
        assert_eq!(limits_soft(limits, "Max open files"), Some(20000));
        assert_eq!(limits_soft(limits, "Max locked memory"), Some(u64::MAX));
        assert!(open_files_max().unwrap() > 0);
    }

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let stat = "4242 (iris (core) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some(325));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(slab_bytes().unwrap() > 0);
        let before = cpu_ns(pid).unwrap();
        // Spin for 50 ms, then sleep: a running thread's run time is only
        // brought up to date at a tick or a context switch.
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let spent_ns = cpu_ns(pid).unwrap() - before;
        assert!(
            spent_ns >= 20_000_000,
            "50 ms of spinning counted as {spent_ns} ns"
        );
    }
}
