//! GPU binding: whole GPUs, each bound to at most one worker at a time.
//!
//! A worker that needs GPUs takes them with [`Gpus::bind`] before it
//! starts; the [`GpuBinding`] travels with the worker and gives them back
//! when dropped, which the drivers do only once the process has exited or
//! the container is removed. [`Gpus::sample`] reads each GPU's load for the
//! heartbeat; a GPU that answers with an error is cordoned: it takes no new
//! worker until the runner restarts, and the binding of the worker on it is
//! marked lost, so the batch it runs is handed back as a free retry.

use std::sync::{Arc, Mutex};

use layer_protocol::runner::{GpuInfo, GpuStatus};
use tokio_util::sync::CancellationToken;

use crate::inventory::{GpuInventory, GpuSample};

struct Slot {
    info: GpuInfo,
    holder: Option<Holder>,
    cordoned: Option<String>,
    sample: GpuSample,
}

/// The worker a GPU is bound to.
struct Holder {
    worker: String,
    udf_id: String,
    /// The binding's token: a cordon cancels it.
    lost: CancellationToken,
}

/// The node's GPUs and who holds them.
#[derive(Clone)]
pub struct Gpus {
    slots: Arc<Mutex<Vec<Slot>>>,
    inventory: Arc<dyn GpuInventory>,
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpus").field("inventory", &self.inventory.describe()).finish()
    }
}

/// Why GPUs could not be bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unbound {
    /// The runner has too few usable GPUs, whatever is released.
    Never(String),
    /// Enough exist, but other workers hold them now.
    NotNow(String),
}

impl std::fmt::Display for Unbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unbound::Never(m) | Unbound::NotNow(m) => f.write_str(m),
        }
    }
}

/// GPUs bound to one worker; given back on drop.
#[derive(Debug, Default)]
pub struct GpuBinding {
    uuids: Vec<String>,
    gpus: Option<Gpus>,
    lost: CancellationToken,
}

impl GpuBinding {
    /// The bound GPUs' UUIDs, in index order.
    pub fn uuids(&self) -> &[String] {
        &self.uuids
    }

    /// Cancelled once one of the bound GPUs is cordoned.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Why the binding was lost: the cordoned GPU and its error.
    pub fn lost_reason(&self) -> Option<String> {
        let gpus = self.gpus.as_ref()?;
        let slots = gpus.lock();
        slots.iter().filter(|s| self.uuids.contains(&s.info.uuid)).find_map(|s| {
            s.cordoned
                .as_ref()
                .map(|e| format!("GPU {} ({}) was cordoned after an error: {e}", s.info.index, s.info.uuid))
        })
    }
}

impl Drop for GpuBinding {
    fn drop(&mut self) {
        if let Some(gpus) = self.gpus.take() {
            let mut slots = gpus.lock();
            for s in slots.iter_mut().filter(|s| self.uuids.contains(&s.info.uuid)) {
                s.holder = None;
            }
        }
    }
}

impl Gpus {
    pub fn new(inventory: Arc<dyn GpuInventory>) -> Gpus {
        let slots = inventory
            .gpus()
            .into_iter()
            .map(|info| Slot { info, holder: None, cordoned: None, sample: GpuSample::default() })
            .collect();
        Gpus { slots: Arc::new(Mutex::new(slots)), inventory }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// GPUs that can take work: present and not cordoned.
    pub fn usable(&self) -> usize {
        self.lock().iter().filter(|s| s.cordoned.is_none()).count()
    }

    /// Binds `count` free GPUs to `worker` of `udf_id` (the lowest indexes
    /// first), or says why not. `count` 0 binds nothing.
    pub fn bind(&self, count: u32, worker: &str, udf_id: &str) -> Result<GpuBinding, Unbound> {
        if count == 0 {
            return Ok(GpuBinding::default());
        }
        let mut slots = self.lock();
        let usable = slots.iter().filter(|s| s.cordoned.is_none()).count();
        if usable < count as usize {
            return Err(Unbound::Never(format!("the Function needs {count} GPUs and this runner has {usable} usable")));
        }
        let free: Vec<usize> =
            (0..slots.len()).filter(|&i| slots[i].cordoned.is_none() && slots[i].holder.is_none()).collect();
        if free.len() < count as usize {
            let bound = usable - free.len();
            return Err(Unbound::NotNow(format!("{bound} of this runner's {usable} GPUs are bound to other workers")));
        }
        let lost = CancellationToken::new();
        let mut uuids = Vec::new();
        for &i in free.iter().take(count as usize) {
            let s = &mut slots[i];
            s.holder = Some(Holder { worker: worker.to_string(), udf_id: udf_id.to_string(), lost: lost.clone() });
            uuids.push(s.info.uuid.clone());
        }
        Ok(GpuBinding { uuids, gpus: Some(self.clone()), lost })
    }

    /// Reads each GPU's load; cordons a GPU whose reading fails. Blocking
    /// (NVML calls): run it off the async threads.
    pub fn sample(&self) {
        let uuids: Vec<String> =
            self.lock().iter().filter(|s| s.cordoned.is_none()).map(|s| s.info.uuid.clone()).collect();
        for uuid in uuids {
            match self.inventory.sample(&uuid) {
                Ok(sample) => {
                    if let Some(s) = self.lock().iter_mut().find(|s| s.info.uuid == uuid) {
                        s.sample = sample;
                    }
                }
                Err(e) => self.cordon(&uuid, &e),
            }
        }
    }

    /// Takes a GPU out of service: no new worker gets it, and the worker
    /// bound to it loses its binding.
    pub fn cordon(&self, uuid: &str, error: &str) {
        let mut slots = self.lock();
        let Some(s) = slots.iter_mut().find(|s| s.info.uuid == uuid) else { return };
        if s.cordoned.is_some() {
            return;
        }
        tracing::error!(gpu = s.info.index, uuid = %uuid, error = %error,
            worker = ?s.holder.as_ref().map(|h| &h.worker), "GPU cordoned: it takes no more work until the runner restarts");
        s.cordoned = Some(error.to_string());
        if let Some(h) = &s.holder {
            h.lost.cancel();
        }
    }

    /// The GPUs as the heartbeat reports them.
    pub fn statuses(&self) -> Vec<GpuStatus> {
        self.lock()
            .iter()
            .map(|s| GpuStatus {
                uuid: s.info.uuid.clone(),
                state: if s.cordoned.is_some() {
                    "cordoned"
                } else if s.holder.is_some() {
                    "bound"
                } else {
                    "free"
                }
                .into(),
                worker: s.holder.as_ref().map(|h| h.worker.clone()),
                udf_id: s.holder.as_ref().map(|h| h.udf_id.clone()),
                utilization_percent: s.sample.utilization_percent,
                memory_used_bytes: s.sample.memory_used_bytes,
                memory_total_bytes: s.info.memory_bytes,
                error: s.cordoned.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::SimulatedGpus;

    #[test]
    fn gpus_are_bound_exclusively_released_on_drop_and_cordoned_on_error() {
        let sim = Arc::new(SimulatedGpus::new(2));
        let gpus = Gpus::new(sim.clone());
        let a = gpus.bind(1, "a", "fa").unwrap();
        let b = gpus.bind(1, "b", "fb").unwrap();
        assert_ne!(a.uuids(), b.uuids(), "two workers never share a GPU");
        let e = gpus.bind(1, "c", "fc").unwrap_err();
        assert_eq!(e, Unbound::NotNow("2 of this runner's 2 GPUs are bound to other workers".into()));
        let e = gpus.bind(3, "d", "fd").unwrap_err();
        assert_eq!(e, Unbound::Never("the Function needs 3 GPUs and this runner has 2 usable".into()));
        assert!(gpus.bind(0, "cpu", "fe").unwrap().uuids().is_empty());
        let held = a.uuids().to_vec();
        drop(a);
        let c = gpus.bind(1, "c", "fc").unwrap();
        assert_eq!(c.uuids(), held, "a released GPU is bound again");
        let states: Vec<_> = gpus.statuses().into_iter().map(|s| (s.state, s.worker)).collect();
        assert!(states.iter().all(|(s, _)| s == "bound"), "{states:?}");

        // A GPU that answers with an error is cordoned; its worker's
        // binding is lost; nothing new is bound to it.
        sim.fail(&c.uuids()[0], "GPU is lost");
        gpus.sample();
        assert!(c.lost().is_cancelled(), "the binding on the cordoned GPU is lost");
        assert!(c.lost_reason().unwrap().contains("GPU is lost"));
        assert!(!b.lost().is_cancelled(), "the other GPU's worker keeps its binding");
        drop(c);
        assert_eq!(gpus.usable(), 1);
        drop(b);
        let again = gpus.bind(1, "d", "fd").unwrap();
        assert_ne!(again.uuids(), held.as_slice(), "the cordoned GPU is never bound again");
        let cordoned = gpus.statuses().into_iter().find(|s| s.uuid == held[0]).unwrap();
        assert_eq!(cordoned.state, "cordoned");
        assert_eq!(cordoned.error.as_deref(), Some("GPU is lost"));
    }
}
