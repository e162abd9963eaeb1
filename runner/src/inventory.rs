//! What the node has: CPUs, memory and GPUs. GPUs come from a
//! [`GpuInventory`]: [`NvmlGpus`] reads NVIDIA GPUs through NVML, loaded at
//! run time; [`NoGpus`] is a node without them; [`SimulatedGpus`] stands in
//! for GPUs where none can exist (tests, demos on a laptop).

use std::collections::HashMap;
use std::sync::Mutex;

use layer_protocol::runner::{Capacity, GpuInfo};
use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

/// One GPU's load, read now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuSample {
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
}

/// A source of the node's GPUs.
pub trait GpuInventory: Send + Sync + 'static {
    /// The GPUs present.
    fn gpus(&self) -> Vec<GpuInfo>;
    /// A GPU's utilisation and memory in use. An error means the GPU
    /// answered in a way that makes it unusable (lost, needs a reset,
    /// unknown failure): the runner cordons it. A figure the driver does not
    /// support is `None`, not an error.
    fn sample(&self, uuid: &str) -> Result<GpuSample, String>;
    /// A name for logs.
    fn describe(&self) -> String;
}

/// A node without GPUs.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoGpus;

impl GpuInventory for NoGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        Vec::new()
    }
    fn sample(&self, uuid: &str) -> Result<GpuSample, String> {
        Err(format!("no GPU {uuid} on this node"))
    }
    fn describe(&self) -> String {
        "no GPU inventory".into()
    }
}

/// NVIDIA GPUs read through NVML (`libnvidia-ml.so.1`, opened at run time).
pub struct NvmlGpus {
    nvml: Nvml,
    gpus: Vec<GpuInfo>,
    driver: String,
}

/// Whether an NVML error means the GPU itself is in trouble, rather than a
/// figure this driver or GPU does not offer.
fn is_gpu_fault(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::GpuLost
            | NvmlError::ResetRequired
            | NvmlError::CorruptedInfoROM
            | NvmlError::IrqIssue
            | NvmlError::Timeout
            | NvmlError::Unknown
    )
}

impl NvmlGpus {
    /// Opens NVML and lists the GPUs. Fails where there is no NVIDIA
    /// driver, or NVML cannot talk to it.
    pub fn open() -> Result<NvmlGpus, String> {
        let nvml = Nvml::builder()
            .lib_path(std::ffi::OsStr::new("libnvidia-ml.so.1"))
            .init()
            .or_else(|_| Nvml::init())
            .map_err(|e| format!("NVML is not available: {e}"))?;
        let driver = nvml.sys_driver_version().unwrap_or_else(|_| "unknown".into());
        let count = nvml.device_count().map_err(|e| format!("NVML cannot count the GPUs: {e}"))?;
        let mut gpus = Vec::new();
        for index in 0..count {
            let d = nvml.device_by_index(index).map_err(|e| format!("NVML cannot open GPU {index}: {e}"))?;
            gpus.push(GpuInfo {
                index,
                uuid: d.uuid().map_err(|e| format!("NVML cannot read GPU {index}'s UUID: {e}"))?,
                name: d.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                memory_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
            });
        }
        Ok(NvmlGpus { nvml, gpus, driver })
    }
}

impl GpuInventory for NvmlGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.clone()
    }

    fn sample(&self, uuid: &str) -> Result<GpuSample, String> {
        let d = self.nvml.device_by_uuid(uuid).map_err(|e| format!("NVML cannot open GPU {uuid}: {e}"))?;
        let mut sample = GpuSample::default();
        match d.utilization_rates() {
            Ok(u) => sample.utilization_percent = Some(u.gpu),
            Err(e) if is_gpu_fault(&e) => return Err(format!("NVML: {e}")),
            Err(_) => {}
        }
        match d.memory_info() {
            Ok(m) => sample.memory_used_bytes = Some(m.used),
            Err(e) if is_gpu_fault(&e) => return Err(format!("NVML: {e}")),
            Err(_) => {}
        }
        Ok(sample)
    }

    fn describe(&self) -> String {
        format!("NVML, driver {}", self.driver)
    }
}

/// The node's GPUs: NVML's where it answers, else none, said once in the
/// log. CPU work runs either way.
pub fn detect() -> std::sync::Arc<dyn GpuInventory> {
    match NvmlGpus::open() {
        Ok(n) => {
            for g in &n.gpus {
                tracing::info!(index = g.index, uuid = %g.uuid, name = %g.name, memory_bytes = g.memory_bytes, "GPU found");
            }
            std::sync::Arc::new(n)
        }
        Err(e) => {
            tracing::info!(reason = %e, "no NVIDIA GPUs: this runner reports zero GPUs and runs CPU work only");
            std::sync::Arc::new(NoGpus)
        }
    }
}

/// GPUs that exist only in name, for tests and demos where no GPU can
/// exist. Workers bound to one see its UUID in `CUDA_VISIBLE_DEVICES` like
/// on a real node; [`SimulatedGpus::fail`] makes a GPU answer with errors.
#[derive(Debug, Default)]
pub struct SimulatedGpus {
    gpus: Vec<GpuInfo>,
    failing: Mutex<HashMap<String, String>>,
}

impl SimulatedGpus {
    /// `count` GPUs named `GPU-simulated-<n>` of 16 GiB each.
    pub fn new(count: u32) -> SimulatedGpus {
        let gpus = (0..count)
            .map(|index| GpuInfo {
                index,
                uuid: format!("GPU-simulated-{index}"),
                name: "Simulated GPU".into(),
                memory_bytes: 16 << 30,
            })
            .collect();
        SimulatedGpus { gpus, failing: Mutex::default() }
    }

    /// From now on, sampling `uuid` fails with `error`.
    pub fn fail(&self, uuid: &str, error: &str) {
        self.failing.lock().unwrap_or_else(|e| e.into_inner()).insert(uuid.to_string(), error.to_string());
    }
}

impl GpuInventory for SimulatedGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.clone()
    }
    fn sample(&self, uuid: &str) -> Result<GpuSample, String> {
        if let Some(e) = self.failing.lock().unwrap_or_else(|e| e.into_inner()).get(uuid) {
            return Err(e.clone());
        }
        if !self.gpus.iter().any(|g| g.uuid == uuid) {
            return Err(format!("no GPU {uuid} on this node"));
        }
        Ok(GpuSample { utilization_percent: Some(0), memory_used_bytes: Some(0) })
    }
    fn describe(&self) -> String {
        format!("{} simulated GPUs", self.gpus.len())
    }
}

/// Total memory from `/proc/meminfo`, 0 where it cannot be read.
pub fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The node's capacity; `slots` is how many batches it runs at once.
pub fn capacity(slots: Option<u32>, gpus: &dyn GpuInventory) -> Capacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Capacity { cpus, memory_bytes: memory_bytes(), slots: slots.unwrap_or(cpus.max(2)), gpus: gpus.gpus() }
}
