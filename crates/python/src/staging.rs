//! Pinned staging pools for placement loads into CUDA memory (`load_into` with CUDA
//! destinations): page-locked buffers cost a driver call and pin host memory, so the loads
//! that run at the same time, and those run while a [`PyStaging`] is held (transformers'
//! loading holds one for a whole `from_pretrained`), share one pool per GPU; the pool is
//! freed when the last of them is done.

use pyo3::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use weightlift::{CudaEngine, Device, Error, StagedTarget, StagingOptions};

type Target = StagedTarget<CudaEngine>;

static POOLS: Mutex<Option<HashMap<usize, Weak<Target>>>> = Mutex::new(None);

/// Copy streams per GPU.
const STREAMS: usize = 2;
/// Bytes per staging buffer: a coalesced read (half of one where a conversion widens).
const BUFFER: usize = 16 << 20;

/// The staging pool of GPU `ordinal`, shared with whoever holds it now, or a new one: a
/// buffer per reading thread (4 to 16), so that no reader waits for another's copy.
pub(crate) fn cuda(ordinal: usize) -> Result<Arc<Target>, Error> {
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let pools = pools.get_or_insert_with(HashMap::new);
    if let Some(target) = pools.get(&ordinal).and_then(Weak::upgrade) {
        return Ok(target);
    }
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let staging = StagingOptions::new(threads.clamp(4, 16), BUFFER);
    let target = Arc::new(StagedTarget::cuda(ordinal, STREAMS, staging)?);
    pools.insert(ordinal, Arc::downgrade(&target));
    Ok(target)
}

/// Holds GPU `device`'s staging pool (see the module): placement loads into that GPU made
/// while it lives share the pool rather than allocating their own.
#[pyclass(name = "Staging", module = "weightlift._native", frozen)]
pub(crate) struct PyStaging {
    _target: Arc<Target>,
}

#[pymethods]
impl PyStaging {
    #[new]
    fn new(py: Python<'_>, device: &str) -> PyResult<PyStaging> {
        let ordinal = match device.parse::<Device>() {
            Ok(Device::Cuda(n)) => n,
            _ => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "staging pools are for CUDA devices, not {device:?}"
                )));
            }
        };
        let target = py.detach(|| cuda(ordinal)).map_err(crate::errors::py_err)?;
        Ok(PyStaging { _target: target })
    }
}
