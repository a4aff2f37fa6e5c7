//! Router benchmark: bytes of x read once (the W_score bytes are tiny and
//! L2-resident). Inputs rotate over enough buffers to exceed the 60 MB L2.

use super::{time_it, Record};
use crate::error::Result;
use crate::ops::router::{route_into, RouterOptions, RouterOutput, RouterPolicy};
use crate::{testing, Batch, Runtime, TensorRef};
use half::bf16;

/// (T, D, Hr) shapes: NAtS-L 340M / 760M widths and a large model width.
pub const SHAPES: &[(usize, usize, usize)] = &[(4096, 1024, 6), (16384, 1024, 6), (32768, 1024, 6), (131072, 1024, 6), (32768, 1536, 6), (16384, 4096, 32), (65536, 4096, 32)];

/// The shapes of [`SHAPES`] whose name (`T=.. D=.. Hr=..`) contains one of `filters` (all if empty).
pub fn shapes_matching(filters: &[String]) -> Vec<(usize, usize, usize)> {
    SHAPES.iter().copied().filter(|&(t, d, hr)| filters.is_empty() || filters.iter().any(|f| format!("T={t} D={d} Hr={hr}").contains(f.as_str()))).collect()
}

pub fn run(rt: &Runtime, shapes: &[(usize, usize, usize)]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut rng = testing::rng(1);
    for &(t, d, hr) in shapes {
        let bytes_x = (t * d * 2) as f64;
        let nbuf = ((200e6 / bytes_x).ceil() as usize).clamp(1, 16);
        let xs: Vec<_> = (0..nbuf).map(|_| testing::upload::<bf16>(rt, &testing::rand_vec(&mut rng, t * d, 1.0))).collect::<Result<_>>()?;
        let w = testing::upload::<bf16>(rt, &testing::rand_vec(&mut rng, 2 * hr * d, 0.05))?;
        let batch = Batch::new(rt, &[0, t as i32])?;
        let mut o = RouterOutput::alloc(rt, &batch, hr, d, false)?;
        // (Row names as before the blocked pool's removal, so records compare across runs.)
        for (policy, name) in [(RouterPolicy::Argmax, "argmax split tile"), (RouterPolicy::KeepFraction(0.25), "keep.25 split tile")] {
            let opts = RouterOptions { policy, ..Default::default() };
            bench_one(rt, &mut out, t, d, hr, &xs, &w, &batch, &mut o, opts, name.to_string())?;
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn bench_one(rt: &Runtime, out: &mut Vec<Record>, t: usize, d: usize, hr: usize, xs: &[cudarc::driver::CudaSlice<bf16>], w: &cudarc::driver::CudaSlice<bf16>, batch: &Batch, o: &mut RouterOutput, opts: RouterOptions, name: String) -> Result<()> {
    let nbuf = xs.len();
    let bytes_x = (t * d * 2) as f64;
    {
        {
            let timing = time_it(rt, 5, 30, |i| route_into(rt, batch, &TensorRef::new(&xs[i % nbuf], &[t, d]), &TensorRef::new(w, &[2 * hr, d]), &opts, o))?;
            let flops = 2.0 * (t * d * 2 * hr) as f64 + (t * d) as f64;
            let bytes = bytes_x + (2 * hr * d * 2) as f64 + (t / 64 * hr) as f64 * 9.0;
            out.push(Record::new(rt, "router", format!("T={t} D={d} Hr={hr}"), name, &timing, flops, bytes));
        }
    }
    Ok(())
}
