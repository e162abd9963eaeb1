//! What the node has: CPUs, memory and GPUs. GPUs come from a
//! [`GpuInventory`]; this build has the no-GPU inventory, NVML arrives with
//! the containers-and-GPUs work behind the same trait.

use layer_protocol::runner::{Capacity, GpuInfo};

/// A source of the node's GPUs.
pub trait GpuInventory: Send + Sync + 'static {
    /// The GPUs present now.
    fn gpus(&self) -> Vec<GpuInfo>;
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
    fn describe(&self) -> String {
        "no GPU inventory".into()
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
