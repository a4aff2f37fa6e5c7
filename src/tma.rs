//! TMA tensor maps (sm_90a): the host half of the kernels' bulk tensor loads
//! (`tma_load_3d` in cuda/common/sm90.cuh).

use crate::error::{Error, Result};
use crate::params::NatslTensorMap;
use crate::tensor::{DType, TensorRef};
use cudarc::driver::sys;

/// A map of nothing, for kernels that take the params struct but load no tensor by TMA.
pub const NONE: NatslTensorMap = NatslTensorMap { opaque: [0; 16] };

/// The tensor map of a `[T, H, D]` activation view (last dim contiguous, validated by
/// the caller) as the 3-D tensor (D, H, T), boxes of 64 elements x 1 head x `box_rows`
/// tokens with 128-byte swizzle (the sw128 panel layout of cuda/common/wgmma.cuh),
/// zero fill past T.
pub fn encode_thd(arg: &'static str, t: &TensorRef, box_rows: u32) -> Result<NatslTensorMap> {
    let (tok, heads, d) = (t.dim(0), t.dim(1), t.dim(2));
    let ty = match t.dtype() {
        DType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        other => return Err(Error::invalid(arg, format!("no TMA map for dtype {other:?}"))),
    };
    let es = t.dtype().size() as u64;
    // The stride of a dimension of extent 1 is never followed; give the driver a legal one.
    let stride_h = if heads > 1 { t.stride(1) as u64 * es } else { (d as u64 * es).next_multiple_of(16) };
    let stride_t = if tok > 1 { t.stride(0) as u64 * es } else { (heads as u64 * stride_h).max(16) };
    let dims = [d as u64, heads as u64, tok as u64];
    let strides = [stride_h, stride_t];
    let boxes = [64u32, 1, box_rows];
    let elem = [1u32; 3];
    let mut map = sys::CUtensorMap_st { opaque: [0; 16] };
    // SAFETY: every pointer argument points at a live local array of the length the
    // driver reads for rank 3 (dims 3, strides 2, boxes 3, element strides 3); the map
    // is written, never read, by the driver. The global address is only encoded, not accessed.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            ty,
            3,
            t.ptr() as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::invalid(arg, format!("no TMA tensor map for shape {:?}, strides {:?}: {r:?}", t.shape(), t.strides())));
    }
    Ok(NatslTensorMap { opaque: map.opaque })
}
