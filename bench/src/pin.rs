//! Splitting the machine's cores between the server under test and the load generator, as
//! scenario e is specified ("server on one core, a Rust load generator on the other"): the
//! server on the first CPU this process may run on, the load generator on the others.
//!
//! Why: unpinned, the two processes share every core, so how much of the machine the server
//! gets in a 5-second step is the kernel scheduler's choice from one run to the next
//! (BENCHMARKS.md, "Issue 13, tenth round": the baseline's own knee moved between 1,680 and
//! 2,880 updates/s per writer). Pinned, each gets a core of its own and a step measures the
//! server against one core. The load generator pins itself before its runtime starts (its
//! threads inherit the mask, and tokio sizes its workers by it); a server it starts is
//! pinned in the child between fork and exec.

use std::process::Command;

/// Which CPUs the server and the load generator run on.
#[derive(Clone, Debug)]
pub struct Split {
    pub server: Vec<usize>,
    pub loadgen: Vec<usize>,
}

impl Split {
    /// The first allowed CPU for the server, the rest for the load generator; `None` with
    /// fewer than two (nothing to split).
    pub fn of_allowed() -> std::io::Result<Option<Self>> {
        let cpus = allowed_cpus()?;
        Ok(match cpus.split_first() {
            Some((first, rest)) if !rest.is_empty() => Some(Self {
                server: vec![*first],
                loadgen: rest.to_vec(),
            }),
            _ => None,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "server pinned to CPU {}, load generator to CPU {}",
            list(&self.server),
            list(&self.loadgen)
        )
    }
}

fn list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn set_of(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set (CPU_ZERO).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET bounds-checks `cpu` against the set's size itself.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set
}

/// The CPUs this process may run on.
fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: as in `set_of`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, which outlives the call.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let capacity = 8 * std::mem::size_of_val(&set);
    // SAFETY: CPU_ISSET bounds-checks its index; `set` is initialised above.
    Ok((0..capacity)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread (and the threads it starts afterwards) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    let set = set_of(cpus);
    // SAFETY: the pointer and size describe `set`, which outlives the call.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd`'s process run on `cpus` only (set in the child before exec: the server's
/// threads all inherit it, and its runtime sizes itself by it).
pub fn pin_child(cmd: &mut Command, cpus: &[usize]) {
    use std::os::unix::process::CommandExt;
    let set = set_of(cpus);
    // SAFETY: the hook only makes one system call (async-signal-safe), on a set built
    // before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_pinned_to_one_allowed_cpu_is_allowed_that_cpu_only() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        let last = *allowed.last().unwrap();
        std::thread::spawn(move || {
            pin_current_thread(&[last]).unwrap();
            assert_eq!(allowed_cpus().unwrap(), vec![last]);
        })
        .join()
        .unwrap();
        // The test's own thread kept its mask.
        assert_eq!(allowed_cpus().unwrap(), allowed);
    }
}
