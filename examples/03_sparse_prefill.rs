//! 03: block-sparse softmax over routed chunks, with the NAtS-L head layout:
//! 12 softmax heads of 64/128 as strided views of 6 GDN heads of 128/256.
//!
//!   cargo run --release --example 03_sparse_prefill

use half::bf16;
use natsl::ops::sparse::{prefill, BlockMask, SparseOptions};
use natsl::reference as r;
use natsl::{testing, Batch, TensorMut, TensorRef};

fn main() -> Result<(), natsl::Error> {
    let Some(rt) = testing::gpu_or_skip("example 03_sparse_prefill") else { return Ok(()) };
    let (h, dk, dv, ha, dks, dvs) = (6, 128, 256, 12, 64, 128);
    let lens = [700usize, 129];
    let cu = testing::cu_seqlens(&lens);
    let t = *cu.last().unwrap() as usize;
    let mut rng = testing::rng(3);
    let q = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * h * dk, 1.0));
    let k = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * h * dk, 1.0));
    let v = testing::quantize::<bf16>(&testing::rand_vec(&mut rng, t * h * dv, 1.0));
    // Labels as the router would produce them (here: random), and their compact lists.
    let ns = r::num_slots(t, lens.len());
    let mut labels = vec![r::LABEL_GDN; ns * h];
    for (n, &len) in lens.iter().enumerate() {
        for c in 0..r::n_chunks(len) {
            for head in 0..h {
                let partial = (c + 1) * 64 > len; // an incomplete last chunk is not labelled
                labels[(r::slot_base(&cu, n) + c) * h + head] = if partial { r::LABEL_PARTIAL } else { ((c + head) % 3 == 0) as u8 };
            }
        }
    }
    let (list, count) = r::attn_list_from_labels(&labels, &cu, h);

    let batch = Batch::new(&rt, &cu)?;
    let (qd, kd, vd) = (testing::upload::<bf16>(&rt, &q)?, testing::upload::<bf16>(&rt, &k)?, testing::upload::<bf16>(&rt, &v)?);
    let (ld, cd) = (rt.stream().clone_htod(&list)?, rt.stream().clone_htod(&count)?);
    let mut o = testing::poisoned::<bf16>(&rt, t * ha * dvs)?;
    // Softmax head j = the j-th 64-wide slice of q/k rows and the j-th 128-wide slice of v rows.
    let qs = TensorRef::strided(&qd, &[t, ha, dks], &[h * dk, dks, 1]);
    let ks = TensorRef::strided(&kd, &[t, ha, dks], &[h * dk, dks, 1]);
    let vs = TensorRef::strided(&vd, &[t, ha, dvs], &[h * dv, dvs, 1]);
    let mask = BlockMask::Routed { attn_list: TensorRef::new(&ld, &[h, ns]), attn_count: TensorRef::new(&cd, &[lens.len(), h]) };
    prefill(&rt, &batch, &qs, &ks, &vs, &mask, &SparseOptions::default(), &mut TensorMut::new(&mut o, &[t, ha, dvs]), None)?;
    let reference = r::sparse_attention(&r::AttnProblem { q: &q, k: &k, v: &v, cu_seqlens: &cu, hq: ha, hkv: ha, dk: dks, dv: dvs, scale: None, q_norm_w: None, k_norm_w: None }, &labels, h);
    println!("sparse softmax over {} ATTN chunk-heads: rel err {:.2e} vs the f64 reference", labels.iter().filter(|&&l| l == r::LABEL_ATTN).count(), r::rel_err(&testing::download(&rt, &o)?, &reference.o));
    Ok(())
}
