//! Device selection: `cpu`, `cuda`, `cuda:N`, `metal` or `auto` (the best one present), as
//! given to `--device` and the `[model] device` config key.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// A device as the user names it, before it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when this build has CUDA and a GPU answers, else Metal likewise, else
    /// the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Device {
            spec: s.to_string(),
            msg: "expected cpu, cuda, cuda:N, metal or auto".into(),
        };
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "metal" => Ok(DeviceSpec::Metal),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal => write!(f, "metal"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Opens the device. A device this build cannot drive names the cargo feature to enable;
    /// one the build knows but that does not answer (no GPU, no driver) gives the backend's
    /// reason.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => open_cuda(n).map_err(|msg| Error::Device {
                spec: self.to_string(),
                msg,
            }),
            DeviceSpec::Metal => open_metal().map_err(|msg| Error::Device {
                spec: self.to_string(),
                msg,
            }),
            DeviceSpec::Auto => Ok(open_cuda(0)
                .or_else(|_| open_metal())
                .unwrap_or(Device::Cpu)),
        }
    }

    /// The backends compiled into this build, e.g. `["cpu", "cuda"]`.
    pub fn compiled() -> Vec<&'static str> {
        let mut v = vec!["cpu"];
        if cfg!(feature = "cuda") {
            v.push("cuda");
        }
        if cfg!(feature = "metal") {
            v.push("metal");
        }
        v
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> std::result::Result<Device, String> {
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open the GPU: {}", first_line(&e)))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> std::result::Result<Device, String> {
    Err("this build has no CUDA support; rebuild with `--features cuda`".into())
}

#[cfg(feature = "metal")]
fn open_metal() -> std::result::Result<Device, String> {
    Device::new_metal(0).map_err(|e| format!("cannot open the GPU: {}", first_line(&e)))
}

#[cfg(not(feature = "metal"))]
fn open_metal() -> std::result::Result<Device, String> {
    Err("this build has no Metal support; rebuild with `--features metal` (macOS)".into())
}

#[cfg(any(feature = "cuda", feature = "metal"))]
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// The device's short name as written in run records: `cpu`, `cuda:0`, `metal`.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal);
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(
                e.contains("expected cpu, cuda, cuda:N, metal or auto"),
                "{e}"
            );
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn cpu_opens_and_auto_falls_back() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        // without a GPU (or without the features) auto is the cpu
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_it() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert_eq!(
            e,
            "device `cuda:0`: this build has no CUDA support; rebuild with `--features cuda`"
        );
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_the_feature_names_it() {
        let e = DeviceSpec::Metal.open().unwrap_err().to_string();
        assert!(e.contains("rebuild with `--features metal`"), "{e}");
    }
}
