//! Resident memory of this process, from `/proc/self/status` (Linux only).

/// Peak resident set size of this process in bytes (`VmHWM`), or `None` where
/// `/proc/self/status` is not available (non-Linux systems).
pub fn peak_rss_bytes() -> Option<u64> {
    status_field("VmHWM")
}

/// Current resident set size of this process in bytes (`VmRSS`), or `None` where
/// `/proc/self/status` is not available.
pub fn current_rss_bytes() -> Option<u64> {
    status_field("VmRSS")
}

fn status_field(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_field(&text, key)
}

/// Reads a `Key:   1234 kB` line of a `/proc/<pid>/status` text and returns bytes.
pub(crate) fn parse_status_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        let unit = parts.next().unwrap_or("B");
        let factor = match unit {
            "kB" | "KB" | "kb" => 1024,
            "mB" | "MB" => 1024 * 1024,
            "B" => 1,
            _ => return None,
        };
        Some(value * factor)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kibibytes() {
        let text = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    2012 kB\nVmRSS:\t  1500 kB\n";
        // 2012 kB = 2012 * 1024 = 2_060_288 bytes
        assert_eq!(parse_status_field(text, "VmHWM"), Some(2_060_288));
        assert_eq!(parse_status_field(text, "VmRSS"), Some(1_536_000));
        assert_eq!(parse_status_field(text, "VmSwap"), None);
    }

    #[test]
    fn reads_own_process_on_linux() {
        if cfg!(target_os = "linux") {
            // Current first: memory may grow between the two reads, and the peak never
            // falls below an earlier current value.
            let cur = current_rss_bytes().expect("VmRSS on linux");
            let peak = peak_rss_bytes().expect("VmHWM on linux");
            assert!(peak >= cur && cur > 0);
        }
    }
}
