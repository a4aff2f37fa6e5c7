//! 01: route a packed batch. The router labels every 64-token chunk of every
//! routing head and writes the compact, sorted lists of ATTN chunks.
//!
//!   cargo run --release --example 01_route

use half::bf16;
use natsl::ops::router::{route, RouterOptions, RouterPolicy};
use natsl::{testing, Batch, TensorRef};

fn main() -> Result<(), natsl::Error> {
    let Some(rt) = testing::gpu_or_skip("example 01_route") else { return Ok(()) };
    let (d, heads) = (1024, 6);
    let lens = [1000usize, 4096, 130];
    let cu = testing::cu_seqlens(&lens);
    let t = *cu.last().unwrap() as usize;
    let mut rng = testing::rng(1);
    let x = testing::upload::<bf16>(&rt, &testing::rand_vec(&mut rng, t * d, 1.0))?;
    let w_score = testing::upload::<bf16>(&rt, &testing::rand_vec(&mut rng, 2 * heads * d, 0.05))?;

    let batch = Batch::new(&rt, &cu)?; // validated once, reused by every op of the pass
    let opts = RouterOptions { policy: RouterPolicy::KeepFraction(0.25), ..Default::default() };
    let out = route(&rt, &batch, &TensorRef::new(&x, &[t, d]), &TensorRef::new(&w_score, &[2 * heads, d]), &opts)?;

    let count: Vec<i32> = rt.stream().clone_dtoh(&out.attn_count)?;
    let list: Vec<i32> = rt.stream().clone_dtoh(&out.attn_list)?;
    for (n, len) in lens.iter().enumerate() {
        let base = cu[n] as usize / 64 + n; // chunk slot of the sequence's first chunk
        let r = 0;
        let c = count[n * heads + r] as usize;
        let s = r * batch.num_slots() + base;
        println!("sequence {n} ({len} tokens, {} complete chunks): head 0 keeps chunks {:?}", len / 64, &list[s..s + c]);
    }
    Ok(())
}
