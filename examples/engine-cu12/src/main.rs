//! The engine's own cudarc context and stream, handed to natsl.
use cudarc::driver::CudaContext;

fn main() {
    if !natsl::runtime::driver_present() {
        println!("skipped: no CUDA device (engine-cu12 built against natsl with NVRTC {})", natsl::jit::NVRTC_MAJOR);
        return;
    }
    let ctx = CudaContext::new(0).expect("device 0");
    let stream = ctx.new_stream().expect("stream");
    let rt = natsl::Runtime::from_stream(stream).expect("natsl runtime");
    println!("natsl on the engine's CUDA 12 stream: {:?} path, {} SMs", rt.arch(), rt.sm_count());
}
