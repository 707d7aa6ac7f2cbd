//! CPU time and memory of the mesh's processes, read from `/proc` (Linux).
//! A store server that forks per connection (PostgreSQL) is counted with
//! its children.

use std::collections::HashMap;

/// CPU time of `pid`, and with `tree` of every process below it, in
/// microseconds.
#[must_use]
pub fn cpu_micros(pid: u32, tree: bool) -> Option<u64> {
    let table = processes();
    let mut total = 0;
    let mut stack = vec![pid];
    let mut found = false;
    while let Some(p) = stack.pop() {
        if let Some(stat) = table.get(&p) {
            found = true;
            total += if tree { stat.ticks } else { stat.own_ticks };
            if tree {
                stack.extend(table.values().filter(|s| s.parent == p).map(|s| s.pid));
            }
        }
    }
    found.then(|| total * 1_000_000 / ticks_per_second())
}

/// Resident memory of `pid` alone, in KiB.
#[must_use]
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

struct Stat {
    pid: u32,
    parent: u32,
    /// utime + stime + the reaped children's, in clock ticks.
    ticks: u64,
    /// utime + stime alone.
    own_ticks: u64,
}

fn processes() -> HashMap<u32, Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name is in parentheses and may hold spaces.
            let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
            let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            // After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
            let own_ticks = number(11)? + number(12)?;
            Some((
                pid,
                Stat {
                    pid,
                    parent: u32::try_from(number(1)?).ok()?,
                    ticks: own_ticks + number(13)? + number(14)?,
                    own_ticks,
                },
            ))
        })
        .collect()
}

fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|ticks| u64::try_from(ticks).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(30) {
            std::hint::black_box(0u64.wrapping_add(1));
        }
        let own = cpu_micros(me, false).unwrap();
        assert!(own > 0);
        // Read after `own`, and counting more processes: never less.
        assert!(cpu_micros(me, true).unwrap() >= own);
        assert!(rss_kib(me).unwrap() > 100);
        assert!(cpu_micros(u32::MAX, true).is_none());
    }
}
