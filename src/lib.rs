//! natsl: hand-written CUDA kernels for NAtS-L hybrid attention.
//!
//! The data path of every call: validate the tensors ([`tensor`]), pick a
//! [`KernelSpec`], get its image from the [`Runtime`] (embedded, cached on disk,
//! or JIT-compiled through NVRTC), launch on the runtime's stream.
//!
//! - [`ops::router`]: the router (mean-pool, score, argmax / top-k, compact lists).
//! - [`layer`]: the NAtS-L layer as one call (router, both branches overlapped, merge).
//! - [`reference`]: the f64 CPU oracle of SPEC.md that every kernel is checked against.

pub mod batch;
pub mod bench;
pub mod error;
pub mod faults;
pub mod jit;
pub mod layer;
pub mod ops;
pub mod params;
pub mod reference;
pub mod runtime;
pub mod tensor;
pub mod tma;
pub mod testing;
pub mod tune;
pub mod workspace;

pub use batch::{Batch, SeqLayout, CHUNK};
pub use error::{Error, Result};
pub use faults::DeviceFaults;
pub use natsl_codegen::{Arch, KernelSpec};
pub use runtime::{Runtime, WarmupProgress};
pub use tensor::{DType, TensorMut, TensorRef};
pub use workspace::Scratch;
