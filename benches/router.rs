//! Criterion bench of the router, with the GPU time from CUDA events (graph
//! replays, see `natsl::bench::time_it`), not the host clock.
//!
//!   cargo bench --bench router

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use natsl::ops::router::{route_into, RouterOptions, RouterOutput};
use natsl::{bench, testing, Batch, TensorRef};
use std::time::Duration;

fn router(c: &mut Criterion) {
    let Some(rt) = testing::gpu_or_skip("bench router") else { return };
    let mut group = c.benchmark_group("router");
    for &(t, d, hr) in &[(16384usize, 1024usize, 6usize), (32768, 1024, 6), (32768, 1536, 6), (131072, 1024, 6)] {
        let mut rng = testing::rng(1);
        let nbuf = ((200e6 / (t * d * 2) as f64).ceil() as usize).clamp(1, 8);
        let xs: Vec<_> = (0..nbuf).map(|_| testing::upload::<bf16>(&rt, &testing::rand_vec(&mut rng, t * d, 1.0)).unwrap()).collect();
        let w = testing::upload::<bf16>(&rt, &testing::rand_vec(&mut rng, 2 * hr * d, 0.05)).unwrap();
        let batch = Batch::new(&rt, &[0, t as i32]).unwrap();
        let mut out = RouterOutput::alloc(&rt, &batch, hr, d, false).unwrap();
        let opts = RouterOptions::default();
        group.bench_function(format!("T={t} D={d} Hr={hr}"), |b| {
            b.iter_custom(|iters| {
                let timing = bench::time_it(&rt, 2, iters.max(3) as usize, |i| {
                    route_into(&rt, &batch, &TensorRef::new(&xs[i % nbuf], &[t, d]), &TensorRef::new(&w, &[2 * hr, d]), &opts, &mut out)
                })
                .unwrap();
                Duration::from_secs_f64(timing.median_ms * 1e-3 * iters as f64)
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(1));
    targets = router
}
criterion_main!(benches);
