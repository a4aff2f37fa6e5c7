//! Safe entry points, one module per kernel family: validate -> spec -> launch.

pub mod gdn;
pub mod router;
pub mod sparse;

use crate::params::*;
use cudarc::driver::DeviceRepr;

// SAFETY: the params structs are plain C data (integers, floats, device
// pointers), laid out by bindgen exactly as the kernels read them.
unsafe impl DeviceRepr for NatslRouterParams {}
