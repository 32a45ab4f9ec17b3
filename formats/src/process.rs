//! Memory figures of a process from Linux's `/proc/<pid>/status`, for the benches' reports
//! (`llava-data bench`, `llava-trainer bench` and `loader-bench`).

/// A KiB figure (`VmRSS:`, `VmHWM:`, …) of this process (`pid` None) or of process `pid`; None
/// where there is no such file or line (not Linux, a process that ended).
pub fn status_kib(pid: Option<u32>, key: &str) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak resident set size so far (`VmHWM`) of this process (`pid` None) or of `pid`, in MiB.
pub fn peak_rss_mib(pid: Option<u32>) -> Option<f64> {
    Some(status_kib(pid, "VmHWM:")? as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_set_at_most_its_peak() {
        let rss = status_kib(None, "VmRSS:").expect("VmRSS on Linux");
        let peak = status_kib(Some(std::process::id()), "VmHWM:").expect("VmHWM on Linux");
        assert!(rss > 0 && rss <= peak, "VmRSS {rss} KiB, VmHWM {peak} KiB");
        assert_eq!(status_kib(None, "NoSuchKey:"), None);
    }
}
