//! `KernelSpec`: everything that is fixed at compile time for one kernel image.

use std::fmt;

/// The operation a translation unit implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Router: mean-pool + score kernel, then the select/compact kernel.
    Router,
    /// Gated DeltaNet chunk scan over a packed prefill batch.
    GdnPrefill,
    /// Gated DeltaNet single step (plus up to 8 speculative tokens) on a state pool.
    GdnDecode,
    /// Block-sparse flash softmax over routed chunks, prefill.
    SparsePrefill,
    /// Block-sparse flash softmax over paged KV, decode (split-KV).
    SparseDecode,
    /// The output epilogue: RMSNorm of both branches, 2-way softmax weights, SiLU gate.
    Merge,
}

impl Op {
    pub const ALL: [Op; 6] = [Op::Router, Op::GdnPrefill, Op::GdnDecode, Op::SparsePrefill, Op::SparseDecode, Op::Merge];

    /// Short name used in symbols and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Op::Router => "router",
            Op::GdnPrefill => "gdn_prefill",
            Op::GdnDecode => "gdn_decode",
            Op::SparsePrefill => "sparse_prefill",
            Op::SparseDecode => "sparse_decode",
            Op::Merge => "merge",
        }
    }
}

/// Activation dtype (q, k, v, x, outputs). Accumulation is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bf16,
    F16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
    /// The C++ storage type in cuda/common/dtype.cuh.
    pub fn cuda_type(self) -> &'static str {
        match self {
            DType::Bf16 => "natsl::bf16",
            DType::F16 => "natsl::f16",
        }
    }
}

/// Target architecture of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// Ampere-class path: mma.sync, cp.async. Also runs on Hopper.
    Sm80,
    /// Hopper path: may use wgmma, TMA, setmaxnreg (needs the `a` target).
    Sm90a,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm80",
            Arch::Sm90a => "sm90a",
        }
    }
    /// The `-arch` value for NVRTC / nvcc.
    pub fn nvrtc_arch(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90a => "sm_90a",
        }
    }
    /// The best path for a device of compute capability (major, minor).
    pub fn for_capability(major: i32, minor: i32) -> Option<Arch> {
        match (major, minor) {
            (9, 0) => Some(Arch::Sm90a),
            (m, _) if m >= 8 => Some(Arch::Sm80),
            _ => None,
        }
    }
}

/// Head dimensions. For the router, `dk` is unused (0) and `dv` is unused (0);
/// for the merge, `dk` is 0 and `dv` is the softmax head dim dvs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeadDims {
    pub dk: u32,
    pub dv: u32,
}

/// Tile configuration: CTA tile rows/columns, warps, pipeline stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tile {
    pub block_m: u32,
    pub block_n: u32,
    pub warps: u32,
    pub stages: u32,
}

impl Tile {
    pub const fn new(block_m: u32, block_n: u32, warps: u32, stages: u32) -> Tile {
        Tile { block_m, block_n, warps, stages }
    }
    pub fn threads(self) -> u32 {
        self.warps * 32
    }
}

/// Routing sparsity class: what the kernel knows at compile time about which chunks it visits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sparsity {
    /// No routing (plain GDN, dense causal softmax), or the router's argmax policy.
    Dense,
    /// Routed: labels / compact ATTN lists read at run time.
    Routed,
    /// Router top-k with k fixed at compile time.
    TopK(u32),
    /// Router top-k with k given at run time (a count or a keep fraction).
    TopKRuntime,
}

impl Sparsity {
    pub fn name(self) -> String {
        match self {
            Sparsity::Dense => "dense".into(),
            Sparsity::Routed => "routed".into(),
            Sparsity::TopK(k) => format!("top{k}"),
            Sparsity::TopKRuntime => "topk".into(),
        }
    }
}

/// One specialisation: turns into exactly one CUDA translation unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelSpec {
    pub op: Op,
    pub dtype: DType,
    pub dims: HeadDims,
    pub chunk: u32,
    pub tile: Tile,
    pub sparsity: Sparsity,
    pub arch: Arch,
}

impl KernelSpec {
    /// Stable, readable symbol prefix: every entry point of the unit starts with it.
    pub fn symbol(&self) -> String {
        let t = self.tile;
        let dims = if self.dims.dk == 0 && self.dims.dv == 0 {
            String::new()
        } else if self.dims.dk == 0 {
            format!("_dv{}", self.dims.dv)
        } else {
            format!("_dk{}_dv{}", self.dims.dk, self.dims.dv)
        };
        format!(
            "natsl_{}_{}{}_c{}_m{}n{}w{}s{}_{}_{}",
            self.op.name(),
            self.dtype.name(),
            dims,
            self.chunk,
            t.block_m,
            t.block_n,
            t.warps,
            t.stages,
            self.sparsity.name(),
            self.arch.name()
        )
    }
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.symbol())
    }
}
