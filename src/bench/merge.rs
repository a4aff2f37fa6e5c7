//! Merge epilogue timings: TB/s over the bytes that must move (o_gdn, o_att, z read,
//! out written, the logits; the gammas are L2-resident), next to a device-to-device
//! copy of as many bytes timed the same way. Inputs rotate over enough buffer sets to
//! exceed the 60 MB L2. Used by `cargo bench --bench merge` and `natsl bench merge`.
//! Panics on a device error (a benchmark tool, not API).

use super::{fill, time_it, Record};
use crate::ops::merge::{self, MergeInputs};
use crate::testing::TestElem;
use crate::{Runtime, TensorMut, TensorRef};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};

/// (T, Ha, dvs, f16): natsl-340M's 12 softmax heads of 128 at 4k / 32k / 128k, and the other dvs.
pub const SHAPES: &[(usize, usize, usize, bool)] = &[(4096, 12, 128, false), (32768, 12, 128, false), (131072, 12, 128, false), (32768, 12, 128, true), (32768, 24, 64, false), (32768, 6, 256, false)];

struct Set<T> {
    g: CudaSlice<T>,
    a: CudaSlice<T>,
    z: CudaSlice<T>,
    w: CudaSlice<f32>,
}

fn shape_name(t: usize, ha: usize, dvs: usize) -> String {
    format!("T={t} Ha={ha} dvs={dvs}")
}

/// Every shape whose name (`T=.. Ha=.. dvs=..`, plus ` f16` where it is) contains a filter (all if none).
pub fn run(rt: &Runtime, filters: &[String]) -> Vec<Record> {
    let mut out = Vec::new();
    for &(t, ha, dvs, half) in SHAPES {
        let name = format!("{}{}", shape_name(t, ha, dvs), if half { " f16" } else { "" });
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        if half {
            bench_shape::<f16>(rt, &mut out, t, ha, dvs, "f16");
        } else {
            bench_shape::<bf16>(rt, &mut out, t, ha, dvs, "bf16");
        }
    }
    out
}

fn bench_shape<T: TestElem + crate::tensor::Element>(rt: &Runtime, out: &mut Vec<Record>, t: usize, ha: usize, dvs: usize, dt: &str) {
    let n = t * ha * dvs;
    // 4 row tensors of the activation dtype and 2 f32 logits per row.
    let bytes = (4 * n * 2 + t * ha * 2 * 4) as f64;
    let nbuf = ((200e6 / bytes).ceil() as usize).clamp(1, 8);
    let sets: Vec<Set<T>> = (0..nbuf)
        .map(|i| {
            let s = 10 * i as u64;
            Set { g: fill(rt, n, -2.0, 2.0, s + 1), a: fill(rt, n, -1.0, 1.0, s + 2), z: fill(rt, n, -3.0, 3.0, s + 3), w: fill(rt, t * ha * 2, -2.0, 2.0, s + 4) }
        })
        .collect();
    let gg: CudaSlice<T> = fill(rt, dvs, 0.5, 1.5, 90);
    let ga: CudaSlice<T> = fill(rt, dvs, 0.5, 1.5, 91);
    let mut outs: Vec<CudaSlice<T>> = (0..nbuf).map(|_| rt.stream().alloc_zeros::<T>(n).expect("alloc out")).collect();
    let shape = [t, ha, dvs];
    let timing = time_it(rt, 5, 30, |i| {
        let k = i % nbuf;
        let s = &sets[k];
        let inp = MergeInputs {
            o_gdn: TensorRef::new(&s.g, &shape),
            o_att: TensorRef::new(&s.a, &shape),
            w: TensorRef::new(&s.w, &[t, ha, 2]),
            gamma_gdn: TensorRef::new(&gg, &[dvs]),
            gamma_att: TensorRef::new(&ga, &[dvs]),
            z: TensorRef::new(&s.z, &shape),
        };
        merge::merge(rt, &inp, &mut TensorMut::new(&mut outs[k], &shape))
    })
    .expect("merge");
    out.push(Record::new(rt, "merge", shape_name(t, ha, dvs), format!("{dt} w f32"), &timing, 0.0, bytes));
    // The ceiling this kernel is held to: a copy that moves the same bytes (half read, half written).
    let half_bytes = (bytes / 2.0) as usize;
    let src = rt.stream().alloc_zeros::<u8>(half_bytes * nbuf).expect("alloc copy");
    let mut dst = rt.stream().alloc_zeros::<u8>(half_bytes * nbuf).expect("alloc copy");
    let timing = time_it(rt, 5, 30, |i| {
        let k = i % nbuf;
        let r = k * half_bytes..(k + 1) * half_bytes;
        rt.stream().memcpy_dtod(&src.slice(r.clone()), &mut dst.slice_mut(r))?;
        Ok(())
    })
    .expect("copy");
    out.push(Record::new(rt, "merge", shape_name(t, ha, dvs), "d2d copy".into(), &timing, 0.0, bytes));
}
