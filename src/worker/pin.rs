//! `server.pin_workers`: worker i runs on the i-th CPU this process may use (so under
//! `taskset -c 4-7` worker 0 runs on CPU 4), which keeps its caches and its sockets'
//! softirq work on one core, as NGINX's `worker_cpu_affinity auto` does. Linux only.

/// The CPU for each of `workers` workers, or why there is none.
pub fn plan(workers: usize) -> Result<Vec<usize>, String> {
    #[cfg(target_os = "linux")]
    {
        let allowed = rustix::thread::sched_getaffinity(None)
            .map_err(|error| format!("cannot read this process's CPU set: {error}"))?;
        let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&cpu| allowed.is_set(cpu))
            .collect();
        if cpus.is_empty() {
            return Err("this process may run on no CPU".into());
        }
        if workers > cpus.len() {
            tracing::warn!(
                workers,
                cpus = cpus.len(),
                "pin_workers: more workers than CPUs; some CPUs run two workers"
            );
        }
        Ok((0..workers).map(|i| cpus[i % cpus.len()]).collect())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = workers;
        Err("pinning workers is supported on Linux only".into())
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        rustix::thread::sched_setaffinity(None, &set).map_err(std::io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        Err(std::io::Error::other("pinning is supported on Linux only"))
    }
}
