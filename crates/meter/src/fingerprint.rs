//! The machine and build a run ran on.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The machine and build of a run, stored in every run record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// CPU model name (`/proc/cpuinfo`), or `unknown`.
    pub cpu_model: String,
    /// Logical CPUs available to this process.
    pub cpu_cores: usize,
    /// Threads the run used for compute.
    pub threads_used: usize,
    /// GPU model, when the run used one and it could be identified.
    pub gpu_name: Option<String>,
    /// NVIDIA driver version, when present.
    pub gpu_driver: Option<String>,
    /// ftbench version.
    pub ftbench_version: String,
    /// Git commit of the source tree the binary ran from (`FTBENCH_GIT_COMMIT` if set,
    /// otherwise read from the `.git` folder above the working directory).
    pub git_commit: Option<String>,
    /// Operating system and kernel release, e.g. `linux 6.8.0`.
    pub os: String,
}

impl Fingerprint {
    /// Fingerprints this machine. `device_name` is the run's device (`cpu`, `cuda:0`, ...);
    /// the GPU is looked up only for a CUDA device.
    pub fn detect(threads_used: usize, device_name: &str) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let (gpu_name, gpu_driver) = if device_name.to_lowercase().contains("cuda") {
            detect_gpu()
        } else {
            (None, None)
        };
        Fingerprint {
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
            cpu_cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            threads_used,
            gpu_name,
            gpu_driver,
            ftbench_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: std::env::var("FTBENCH_GIT_COMMIT")
                .ok()
                .filter(|s| !s.is_empty())
                .or_else(|| std::env::current_dir().ok().and_then(|d| git_commit(&d))),
            os: os_string(),
        }
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

fn os_string() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(r) => format!("{} {}", std::env::consts::OS, r.trim()),
        Err(_) => std::env::consts::OS.to_string(),
    }
}

#[cfg(feature = "nvml")]
fn detect_gpu() -> (Option<String>, Option<String>) {
    match nvml_wrapper::Nvml::init() {
        Ok(nvml) => {
            let name = nvml.device_by_index(0).and_then(|d| d.name()).ok();
            let driver = nvml.sys_driver_version().ok();
            if name.is_some() {
                return (name, driver);
            }
            let (n, d) = detect_gpu_procfs();
            (n, driver.or(d))
        }
        Err(_) => detect_gpu_procfs(),
    }
}

#[cfg(not(feature = "nvml"))]
fn detect_gpu() -> (Option<String>, Option<String>) {
    detect_gpu_procfs()
}

/// GPU model and driver from the NVIDIA kernel module's files under `/proc/driver/nvidia`.
fn detect_gpu_procfs() -> (Option<String>, Option<String>) {
    let driver = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|t| nvidia_driver_version(&t));
    let name = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .and_then(|e| std::fs::read_to_string(e.path().join("information")).ok())
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
        });
    (name, driver)
}

/// The version from a line like `NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  ...`.
fn nvidia_driver_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version"))?;
    line.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .map(str::to_string)
}

/// The commit checked out in the git repository containing `start`, read from the
/// `.git` files (no `git` binary needed). Handles worktrees (`.git` as a file), detached
/// heads, loose and packed refs.
pub fn git_commit(start: &Path) -> Option<String> {
    let git_dir = find_git_dir(start)?;
    let head = std::fs::read_to_string(git_dir.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:").map(str::trim) else {
        return is_hash(head).then(|| head.to_string());
    };
    // Loose refs live in the worktree's git dir or, for a linked worktree, the common dir.
    let common = std::fs::read_to_string(git_dir.join("commondir"))
        .ok()
        .map(|c| git_dir.join(c.trim()))
        .unwrap_or_else(|| git_dir.clone());
    for dir in [&git_dir, &common] {
        if let Ok(h) = std::fs::read_to_string(dir.join(reference)) {
            let h = h.trim();
            if is_hash(h) {
                return Some(h.to_string());
            }
        }
    }
    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
    packed.lines().find_map(|l| {
        let (hash, name) = l.split_once(' ')?;
        (name.trim() == reference && is_hash(hash)).then(|| hash.to_string())
    })
}

fn find_git_dir(start: &Path) -> Option<PathBuf> {
    let mut dir = Some(start);
    while let Some(d) = dir {
        let candidate = d.join(".git");
        if candidate.is_dir() {
            return Some(candidate);
        }
        if candidate.is_file() {
            let text = std::fs::read_to_string(&candidate).ok()?;
            let target = text.trim().strip_prefix("gitdir:")?.trim();
            return Some(d.join(target));
        }
        dir = d.parent();
    }
    None
}

fn is_hash(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn git_commit_from_loose_packed_and_detached() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let git = root.join(".git");
        std::fs::create_dir_all(git.join("refs/heads")).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(
            git.join("packed-refs"),
            format!("# pack-refs\n{HASH} refs/heads/main\n"),
        )
        .unwrap();
        assert_eq!(git_commit(&root.join("a/b")).as_deref(), Some(HASH));
        let loose = "fedcba9876543210fedcba9876543210fedcba98";
        std::fs::write(git.join("refs/heads/main"), format!("{loose}\n")).unwrap();
        assert_eq!(git_commit(root).as_deref(), Some(loose));
        std::fs::write(git.join("HEAD"), format!("{HASH}\n")).unwrap();
        assert_eq!(git_commit(root).as_deref(), Some(HASH));
    }

    #[test]
    fn parses_cpu_and_driver() {
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n").as_deref(),
            Some("Intel(R) Xeon(R)")
        );
        let v = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n";
        assert_eq!(nvidia_driver_version(v).as_deref(), Some("550.54.15"));
    }

    #[test]
    fn detect_on_this_machine() {
        let f = Fingerprint::detect(2, "cpu");
        assert_eq!(f.threads_used, 2);
        assert!(f.cpu_cores >= 1);
        assert_eq!(f.gpu_name, None);
        assert!(!f.ftbench_version.is_empty());
    }
}
