//! Loads: which tensors (the selection), planned how, onto which device. CPU and device
//! loads run the same plan through [`crate::exec`]; meta loads read nothing.

use crate::checkpoint::Checkpoint;
use crate::convert::{converted, is_conversion_target};
use crate::error::{Error, Result};
use crate::options::LoadOptions;
use crate::plan::ReadPlan;
use crate::tensor::{StateDict, Storage, Tensor};
use std::sync::Arc;
use weightlift_device::{CopyEngine, CpuTarget, Device, StagedTarget};
use weightlift_format::Dtype;

impl Checkpoint {
    /// Loads the selected tensors (all by default) onto the options' device.
    ///
    /// Either every selected tensor is returned, complete, or an error: nothing is returned
    /// partially loaded.
    pub fn load(&self, options: &LoadOptions) -> Result<StateDict> {
        match options.device {
            Device::Cuda(ordinal) => self.load_cuda(ordinal, options),
            Device::Meta => {
                let (selected, convert_fn) = self.selection(options)?;
                Ok(self.meta_tensors(&selected, convert_fn))
            }
            Device::Cpu => {
                let (selected, convert_fn) = self.selection(options)?;
                let plan = self.plan(selected, options, None, convert_fn);
                let target = CpuTarget {
                    huge_pages: options.huge_pages,
                };
                let memories = self.run(&plan, &target, options)?;
                let tensors = self.tensors_in(&plan, memories, |memory| Storage::Host {
                    memory: Arc::new(memory.into()),
                    offset: 0,
                });
                Ok(StateDict::new(tensors))
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn load_cuda(&self, ordinal: usize, options: &LoadOptions) -> Result<StateDict> {
        let target = StagedTarget::cuda(ordinal, options.streams, options.staging)?;
        self.load_staged(&target, options)
    }

    #[cfg(not(feature = "cuda"))]
    fn load_cuda(&self, ordinal: usize, _: &LoadOptions) -> Result<StateDict> {
        Err(weightlift_device::cuda_not_built(ordinal).into())
    }

    /// The read plan of the selected tensors; `max_dst` caps a request's destination span.
    pub(crate) fn plan(
        &self,
        selected: Vec<Vec<u32>>,
        options: &LoadOptions,
        max_dst: Option<u64>,
        convert_fn: impl Fn(Dtype) -> Dtype,
    ) -> ReadPlan {
        let headers: Vec<_> = self.shards().iter().map(|s| s.header()).collect();
        ReadPlan::build(
            &headers,
            selected,
            options.request_size,
            max_dst,
            convert_fn,
        )
    }

    /// The tensors of an executed plan: `shared` turns each shard's allocation into a
    /// storage its tensors share, each at its slot's offset.
    pub(crate) fn tensors_in<M>(
        &self,
        plan: &ReadPlan,
        memories: Vec<M>,
        shared: impl Fn(M) -> Storage,
    ) -> Vec<Tensor> {
        let mut tensors = Vec::with_capacity(plan.shards.iter().map(|s| s.tensors.len()).sum());
        for (sp, memory) in plan.shards.iter().zip(memories) {
            let base = shared(memory);
            let infos = self.shards()[sp.shard].header().tensors();
            for (slot, &t) in sp.tensors.iter().enumerate() {
                tensors.push(Tensor::from_info(
                    &infos[t as usize],
                    sp.out_dtypes[slot],
                    base.at(sp.layout.offset(slot)),
                ));
            }
        }
        tensors
    }

    /// The tensors a load selects (positions per shard, in file order) and the dtype each
    /// becomes.
    pub(crate) fn selection(
        &self,
        options: &LoadOptions,
    ) -> Result<(Vec<Vec<u32>>, impl Fn(Dtype) -> Dtype + use<>)> {
        let to = options.convert_to;
        if let Some(to) = to.filter(|&d| !is_conversion_target(d)) {
            return Err(Error::InvalidOption(format!(
                "cannot convert to {to}: conversion targets are F16, BF16 and F32"
            )));
        }
        let selected: Vec<Vec<u32>> = self
            .shards()
            .iter()
            .map(|s| {
                s.header()
                    .tensors()
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| options.filter.matches(&t.name))
                    .map(|(i, _)| i as u32)
                    .collect()
            })
            .collect();
        let convert_fn = move |d: Dtype| to.map_or(d, |to| converted(d, to));
        Ok((selected, convert_fn))
    }

    /// Loads the selected tensors into device memory through `target`'s pinned staging
    /// pool: what `load` does for `Device::Cuda`, open to any [`CopyEngine`] (the tests
    /// run it on a fake device). One device allocation per shard; each request is read
    /// into a staging buffer (converted there if asked) and copied asynchronously while the
    /// next requests are read. The device is the target's; `options.device` is not
    /// consulted.
    pub fn load_staged<E: CopyEngine>(
        &self,
        target: &StagedTarget<E>,
        options: &LoadOptions,
    ) -> Result<StateDict> {
        let (selected, convert_fn) = self.selection(options)?;
        let plan = self.plan(
            selected,
            options,
            weightlift_device::Target::max_region(target),
            convert_fn,
        );
        let memories = self.run(&plan, target, options)?;
        let tensors = self.tensors_in(&plan, memories, |memory| Storage::Device {
            memory: Arc::new(memory),
            offset: 0,
        });
        Ok(StateDict::new(tensors).with_staging(target.stats()))
    }

    fn meta_tensors(
        &self,
        selected: &[Vec<u32>],
        convert_fn: impl Fn(Dtype) -> Dtype,
    ) -> StateDict {
        let mut tensors = Vec::with_capacity(selected.iter().map(Vec::len).sum());
        for (shard, picks) in self.shards().iter().zip(selected) {
            for &i in picks {
                let info = &shard.header().tensors()[i as usize];
                tensors.push(Tensor::from_info(
                    info,
                    convert_fn(info.dtype),
                    Storage::Meta,
                ));
            }
        }
        StateDict::new(tensors)
    }
}
