//! The one DLPack exporter: a pointer, a shape, a dtype and a device, with an owner that
//! keeps the memory alive until the consumer lets go. Tensors and whole device allocations
//! are exported through it.

use dlpark::ffi::{DLDataType, DLDevice};
use dlpark::metadata::Dynamic;
use dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::ffi::c_void;
use weightlift::{Device, Dtype};

/// What to export: `owner` keeps the `len`-checked memory at `data` alive.
pub(crate) struct Export<O> {
    /// Dropped when the consumer calls the deleter.
    pub(crate) owner: O,
    /// Address of the first byte (host or device).
    pub(crate) data: u64,
    /// Dimensions, compact strides.
    pub(crate) shape: Vec<i64>,
    pub(crate) dtype: DLDataType,
    pub(crate) device: DLDevice,
}

/// The flags of every export: writable, not a copy.
pub(crate) fn flags() -> DlpackFlags {
    DlpackFlags::empty()
}

impl<O: Send + 'static> Export<O> {
    /// The DLPack descriptor (legacy or versioned, as `M` says).
    ///
    /// # Safety
    ///
    /// `data` must point to memory of exactly `shape`'s elements of `dtype` on `device`
    /// (compact strides), kept alive by `owner`, with every write to it complete (device
    /// copies finished) and no Rust reference writing to it while the consumer holds it.
    pub(crate) unsafe fn managed<M: ManagedTensorBase>(self) -> PyResult<Managed<M>> {
        let prepared = Dynamic::compact(self.shape)
            .prepare_as::<M>()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let mut init = prepared.initialize(Box::new(self.owner));
        init.set_data(self.data as *mut c_void);
        init.set_dtype(self.dtype);
        init.set_device(self.device);
        // SAFETY: the caller's contract (this function's) is exactly `finish`'s: the pointer,
        // shape, dtype and device describe live memory the boxed owner keeps alive until the
        // deleter runs.
        Ok(unsafe { init.finish() })
    }
}

/// DLPack's device for a weightlift device.
pub(crate) fn dl_device(device: Device) -> DLDevice {
    match device {
        Device::Cuda(n) => DLDevice::cuda(n as i32),
        _ => DLDevice::CPU,
    }
}

/// DLPack's type for a dtype, where it has one.
pub(crate) fn dl_dtype(dtype: Dtype) -> Option<DLDataType> {
    Some(match dtype {
        Dtype::BOOL => DLDataType::BOOL,
        Dtype::U8 => DLDataType::U8,
        Dtype::I8 => DLDataType::I8,
        Dtype::U16 => DLDataType::U16,
        Dtype::I16 => DLDataType::I16,
        Dtype::U32 => DLDataType::U32,
        Dtype::I32 => DLDataType::I32,
        Dtype::U64 => DLDataType::U64,
        Dtype::I64 => DLDataType::I64,
        Dtype::F16 => DLDataType::F16,
        Dtype::BF16 => DLDataType::BF16,
        Dtype::F32 => DLDataType::F32,
        Dtype::F64 => DLDataType::F64,
        Dtype::C64 => DLDataType::C64,
        Dtype::F8_E4M3 => DLDataType::F8E4M3FN,
        Dtype::F8_E5M2 => DLDataType::F8E5M2,
        Dtype::F8_E4M3FNUZ => DLDataType::F8E4M3FNUZ,
        Dtype::F8_E5M2FNUZ => DLDataType::F8E5M2FNUZ,
        Dtype::F8_E8M0 => DLDataType::F8E8M0FNU,
        _ => return None,
    })
}
