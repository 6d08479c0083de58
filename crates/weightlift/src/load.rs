//! Loads: which tensors (the selection), planned how, onto which device. CPU and device
//! loads run the same plan through [`crate::exec`]; meta loads read nothing.

use crate::budget::MemoryBudget;
use crate::checkpoint::Checkpoint;
use crate::convert::{converted, is_conversion_target};
use crate::error::{Error, Result};
use crate::exec::Exec;
use crate::mapping::Use;
use crate::memory::HostMemory;
use crate::options::LoadOptions;
use crate::plan::{Pick, ReadPlan};
use crate::pool::thread_pool;
use crate::progress::ProgressSink;
use crate::tensor::{FileReport, Placement, StateDict, Storage, Tensor};
use std::sync::Arc;
use weightlift_device::{CopyEngine, CpuTarget, Device, StagedTarget};
use weightlift_format::Dtype;
use weightlift_storage::human;

/// An owned CPU load of `plan` must fit `budget`: refused before anything is allocated.
fn check_fits(plan: &ReadPlan, budget: &MemoryBudget) -> Result<()> {
    let needed: u64 = plan.shards.iter().map(|sp| sp.layout.total()).sum();
    if needed > budget.bytes() {
        return Err(Error::DoesNotFit {
            needed,
            budget: budget.describe(),
        });
    }
    Ok(())
}

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
            Device::Cpu => self.load_cpu(options),
        }
    }

    /// A CPU load: shards that map (the checkpoint's [`crate::Mapping`], asked through the one
    /// policy) are mapped and populated, the others read into owned memory; the tensors come
    /// back in shard order either way.
    fn load_cpu(&self, options: &LoadOptions) -> Result<StateDict> {
        let (selected, convert_fn) = self.selection(options)?;
        let mut owned = vec![Vec::new(); selected.len()];
        let mut mapped = vec![Vec::new(); selected.len()];
        let mut reasons = vec![String::new(); selected.len()];
        for (i, picks) in selected.into_iter().enumerate() {
            if picks.is_empty() {
                continue;
            }
            let shard = &self.shards()[i];
            let converts = picks.iter().any(|p| {
                let dtype = shard.header().tensors()[p.tensor as usize].dtype;
                convert_fn(dtype) != dtype
            });
            let sliced = picks.iter().any(|p| p.slice.is_some());
            let (map, reason) = shard.maps(self.mapping(), Use::Load { converts, sliced })?;
            reasons[i] = reason;
            if map {
                mapped[i] = picks;
            } else {
                owned[i] = picks;
            }
        }
        let owned_plan = self.plan(owned, options, None, &convert_fn);
        let mapped_plan = self.plan(mapped, options, None, |d| d);
        let budget = options.budget_in(self);
        check_fits(&owned_plan, &budget)?;
        // Mapped tensors are page-cache pages, which the kernel can take back and fault in
        // again: what does not fit in the window is left to fault in on first touch, rather
        // than populated now and evicted before anyone reads it.
        let populate = mapped_plan.prefix_within(budget.window());
        let populated = populate.iter().map(|r| r.len).sum::<u64>();
        let progress = self.progress_sink(options, owned_plan.bytes + populated);
        let pool = self.pool(options)?;
        let exec = |plan| Exec {
            shards: self.shards(),
            plan,
            pool: &pool,
            progress: &progress,
            cancel: options.cancel.as_deref(),
        };
        let mut groups: Vec<(usize, Vec<Tensor>)> = Vec::new();
        let mut files = Vec::new();
        if !owned_plan.shards.is_empty() {
            let target = CpuTarget {
                huge_pages: options.huge_pages,
            };
            let run = exec(&owned_plan);
            let memories = run.fill(&target, 0..owned_plan.requests.len())?;
            if options.drop_cache {
                run.drop_cache();
            }
            groups.extend(
                self.shard_tensors(&owned_plan, memories, |memory| Storage::Host {
                    memory: Arc::new(HostMemory::owned(memory)),
                    offset: 0,
                }),
            );
            files.extend(self.reports(&owned_plan, Placement::Owned, &reasons));
        }
        if !mapped_plan.shards.is_empty() {
            let maps = mapped_plan
                .shards
                .iter()
                // SAFETY: only shards the policy mapped are in this plan, and it maps only
                // under a `Mapping` made by its unsafe constructors, whose contract the
                // caller took on when opening the checkpoint.
                .map(|sp| unsafe { self.shards()[sp.shard].mapping() })
                .collect::<Result<Vec<_>>>()?;
            exec(&mapped_plan).populate(&maps, populate)?;
            let mut per_shard = vec![0u64; self.shards().len()];
            for r in populate {
                per_shard[mapped_plan.shards[r.shard_plan as usize].shard] += r.len;
            }
            if populated < mapped_plan.bytes {
                for sp in &mapped_plan.shards {
                    reasons[sp.shard].push_str(&format!(
                        "; {} of {} populated up front, the rest is read on first touch \
                         (the mapped tensors need more than the prefetch window of {})",
                        human(per_shard[sp.shard]),
                        human(sp.bytes),
                        human(budget.window())
                    ));
                }
            }
            for (sp, map) in mapped_plan.shards.iter().zip(maps) {
                let header = self.shards()[sp.shard].header();
                let base = Storage::Host {
                    memory: map,
                    offset: 0,
                };
                let tensors = sp
                    .tensors
                    .iter()
                    .map(|&t| {
                        let info = &header.tensors()[t as usize];
                        let at = header.data_start() + info.data_offsets.0;
                        Tensor::from_info(info, info.dtype, None, base.at(at))
                    })
                    .collect();
                groups.push((sp.shard, tensors));
            }
            files.extend(
                self.reports(&mapped_plan, Placement::Mapped, &reasons)
                    .map(|f| FileReport {
                        bytes_read: per_shard[f.shard],
                        ..f
                    }),
            );
        }
        groups.sort_by_key(|g| g.0);
        let tensors = groups.into_iter().flat_map(|g| g.1).collect();
        Ok(StateDict::new(tensors).with_files(files))
    }

    /// Checks, before anything is allocated, that an owned CPU load fits the budget.
    pub(crate) fn check_fits_cpu(&self, plan: &ReadPlan, options: &LoadOptions) -> Result<()> {
        check_fits(plan, &options.budget_in(self))
    }

    /// The loader threads of a load.
    pub(crate) fn pool(&self, options: &LoadOptions) -> Result<rayon::ThreadPool> {
        let threads = options.threads.unwrap_or_else(|| self.default_threads());
        thread_pool(threads, "weightlift")
    }

    /// Runs `f` with an execution of `plan` on the load's threads, reporting the plan's
    /// bytes as its progress and stopping at the load's cancel flag.
    pub(crate) fn with_exec<R>(
        &self,
        plan: &ReadPlan,
        options: &LoadOptions,
        f: impl FnOnce(&Exec<'_>) -> Result<R>,
    ) -> Result<R> {
        let progress = self.progress_sink(options, plan.bytes);
        let pool = self.pool(options)?;
        f(&Exec {
            shards: self.shards(),
            plan,
            pool: &pool,
            progress: &progress,
            cancel: options.cancel.as_deref(),
        })
    }

    /// Where a load of `bytes` bytes reports its progress.
    pub(crate) fn progress_sink(&self, options: &LoadOptions, bytes: u64) -> ProgressSink {
        ProgressSink::new(self.shards().len(), bytes, options.progress.clone())
    }

    /// One report per shard of `plan`.
    fn reports<'a>(
        &'a self,
        plan: &'a ReadPlan,
        placement: Placement,
        reasons: &'a [String],
    ) -> impl Iterator<Item = FileReport> + 'a {
        plan.shards.iter().map(move |sp| FileReport {
            shard: sp.shard,
            location: self.shards()[sp.shard].location().clone(),
            placement,
            reason: reasons
                .get(sp.shard)
                .filter(|r| !r.is_empty())
                .cloned()
                .unwrap_or_else(|| self.shards()[sp.shard].backend_reason().to_string()),
            bytes_read: if placement == Placement::Meta {
                0
            } else {
                sp.read_bytes
            },
        })
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
        selected: Vec<Vec<Pick>>,
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
            options.max_gap,
            convert_fn,
        )
    }

    /// The tensors of an executed plan, per shard: `shared` turns each shard's allocation
    /// into a storage its tensors share, each at its slot's offset.
    pub(crate) fn shard_tensors<M>(
        &self,
        plan: &ReadPlan,
        memories: Vec<M>,
        shared: impl Fn(M) -> Storage,
    ) -> Vec<(usize, Vec<Tensor>)> {
        let mut out = Vec::with_capacity(plan.shards.len());
        for (sp, memory) in plan.shards.iter().zip(memories) {
            let base = shared(memory);
            let infos = self.shards()[sp.shard].header().tensors();
            let tensors = sp
                .tensors
                .iter()
                .enumerate()
                .map(|(slot, &t)| {
                    Tensor::from_info(
                        &infos[t as usize],
                        sp.out_dtypes[slot],
                        sp.shapes[slot].clone(),
                        base.at(sp.layout.offset(slot)),
                    )
                })
                .collect();
            out.push((sp.shard, tensors));
        }
        out
    }

    /// The tensors a load selects (per shard, in file order, each whole or the block the
    /// options' `slices` asks for) and the dtype each becomes.
    pub(crate) fn selection(
        &self,
        options: &LoadOptions,
    ) -> Result<(Vec<Vec<Pick>>, impl Fn(Dtype) -> Dtype + use<>)> {
        let to = options.convert_to;
        if let Some(to) = to.filter(|&d| !is_conversion_target(d)) {
            return Err(Error::InvalidOption(format!(
                "cannot convert to {to}: conversion targets are F16, BF16 and F32"
            )));
        }
        let mut selected: Vec<Vec<Pick>> = Vec::with_capacity(self.shards().len());
        for s in self.shards() {
            let mut picks = Vec::new();
            for (i, t) in s.header().tensors().iter().enumerate() {
                if !options.filter.matches(&t.name) {
                    continue;
                }
                let block = options.slices.as_ref().and_then(|f| f(&t.name, &t.shape));
                let slice = match block {
                    None => None,
                    Some(ranges) => Some(
                        crate::slice::plan(&t.shape, &ranges, t.dtype.bits() as u64).map_err(
                            |reason| Error::InvalidSlice {
                                tensor: t.name.clone(),
                                reason,
                            },
                        )?,
                    ),
                };
                picks.push(Pick {
                    tensor: i as u32,
                    slice,
                });
            }
            selected.push(picks);
        }
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
        let memories = self.with_exec(&plan, options, |run| {
            run.fill(target, 0..plan.requests.len())
        })?;
        let tensors = self
            .shard_tensors(&plan, memories, |memory| Storage::Device {
                memory: Arc::new(memory),
                offset: 0,
            })
            .into_iter()
            .flat_map(|g| g.1)
            .collect();
        let files = self.reports(&plan, Placement::Device, &[]).collect();
        Ok(StateDict::new(tensors)
            .with_staging(target.stats())
            .with_files(files))
    }

    fn meta_tensors(
        &self,
        selected: &[Vec<Pick>],
        convert_fn: impl Fn(Dtype) -> Dtype,
    ) -> StateDict {
        let mut tensors = Vec::with_capacity(selected.iter().map(Vec::len).sum());
        let mut files = Vec::new();
        for (s, (shard, picks)) in self.shards().iter().zip(selected).enumerate() {
            if !picks.is_empty() {
                files.push(FileReport {
                    shard: s,
                    location: shard.location().clone(),
                    placement: Placement::Meta,
                    reason: "meta: shapes only, nothing read".into(),
                    bytes_read: 0,
                });
            }
            for pick in picks {
                let info = &shard.header().tensors()[pick.tensor as usize];
                tensors.push(Tensor::from_info(
                    info,
                    convert_fn(info.dtype),
                    pick.slice.as_ref().map(|s| s.shape.clone()),
                    Storage::Meta,
                ));
            }
        }
        StateDict::new(tensors).with_files(files)
    }
}
