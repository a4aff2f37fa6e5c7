//! 02: Gated DeltaNet prefill over a packed batch with a random initial state,
//! the final state written out, checked against the f64 reference.
//!
//!   cargo run --release --example 02_gdn_prefill

use half::bf16;
use natsl::ops::gdn::{gdn_prefill, GdnOptions, GdnPrefillInputs, GdnPrefillOutputs, GdnWorkspace, PoolIn, PoolOut};
use natsl::reference as r;
use natsl::{testing, Batch, TensorMut, TensorRef};

fn main() -> Result<(), natsl::Error> {
    let Some(rt) = testing::gpu_or_skip("example 02_gdn_prefill") else { return Ok(()) };
    let (hqk, hv, dk, dv) = (2, 4, 128, 128); // GVA: 2 value heads per q/k head
    let lens = [300usize, 64, 1000];
    let cu = testing::cu_seqlens(&lens);
    let (t, n) = (*cu.last().unwrap() as usize, lens.len());
    let mut rng = testing::rng(2);
    let q = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * hqk * dk, 1.0));
    let k = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * hqk * dk, 1.0));
    let v = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * hv * dv, 1.0));
    let g: Vec<f64> = testing::rand_range(&mut rng, t * hv, -0.1, -0.005).iter().map(|&x| x as f32 as f64).collect();
    let beta: Vec<f64> = testing::rand_range(&mut rng, t * hv, 0.05, 0.95).iter().map(|&x| x as f32 as f64).collect();
    let h0: Vec<f64> = testing::rand_vec(&mut rng, n * hv * dk * dv, 0.5).iter().map(|&x| x as f32 as f64).collect();

    let batch = Batch::new(&rt, &cu)?;
    let (qd, kd, vd) = (testing::upload::<bf16>(&rt, &q)?, testing::upload::<bf16>(&rt, &k)?, testing::upload::<bf16>(&rt, &v)?);
    let (gd, bd, h0d) = (testing::upload::<f32>(&rt, &g)?, testing::upload::<f32>(&rt, &beta)?, testing::upload::<f32>(&rt, &h0)?);
    let mut o = testing::poisoned::<bf16>(&rt, t * hv * dv)?;
    let mut state = testing::poisoned::<f32>(&rt, n * hv * dk * dv)?;
    let inputs = GdnPrefillInputs {
        q: TensorRef::new(&qd, &[t, hqk, dk]),
        k: TensorRef::new(&kd, &[t, hqk, dk]),
        v: TensorRef::new(&vd, &[t, hv, dv]),
        g: TensorRef::new(&gd, &[t, hv]),
        beta: TensorRef::new(&bd, &[t, hv]),
        labels: None, // plain GDN: every chunk commits
        h0: Some(PoolIn { pool: TensorRef::new(&h0d, &[n, hv, dk, dv]), index: None }),
    };
    let mut ws = GdnWorkspace::new();
    {
        let mut outputs = GdnPrefillOutputs {
            o: TensorMut::new(&mut o, &[t, hv, dv]),
            committed: Some(PoolOut { pool: TensorMut::new(&mut state, &[n, hv, dk, dv]), index: None }),
            running: None,
            gsum_running: None,
        };
        gdn_prefill(&rt, &batch, &inputs, &mut outputs, &GdnOptions { scale: None, l2norm: true }, &mut ws)?;
    }
    let reference = r::gdn_chunked(&r::GdnProblem { q: &q, k: &k, v: &v, g: &g, beta: &beta, cu_seqlens: &cu, hqk, hv, dk, dv, labels: None, h0: Some(&h0), scale: None, l2norm: true });
    println!("o:           rel err {:.2e} vs the f64 reference", r::rel_err(&testing::download(&rt, &o)?, &reference.o));
    // The committed state: after the last complete chunk (for a sequence that ends
    // in a partial chunk, the state at that chunk's start; decode continues from it).
    println!("committed state: rel err {:.2e} vs the f64 reference", r::rel_err(&testing::download(&rt, &state)?, &reference.state_committed));
    Ok(())
}
