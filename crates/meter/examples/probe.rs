//! Prints what the meter sees on this machine: fingerprint, energy sources over two
//! seconds, and the MFU peak for the detected GPU. `cargo run -p ftbench-meter --example
//! probe --features nvml -- cuda:0` on a GPU machine.

fn main() {
    let device = std::env::args().nth(1).unwrap_or_else(|| "cpu".into());
    let fp = ftbench_meter::Fingerprint::detect(1, &device);
    println!("fingerprint: {}", serde_json::to_string(&fp).unwrap());
    let meter = ftbench_meter::EnergyMeter::start();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let readings = meter.finish();
    println!(
        "energy over 2 s: {}",
        serde_json::to_string(&readings).unwrap()
    );
    if let Some(gpu) = &fp.gpu_name {
        for dtype in ["bf16", "f32"] {
            println!(
                "peak {gpu} {dtype}: {:?} TFLOP/s",
                ftbench_meter::peak_tflops(gpu, dtype, None)
            );
        }
    }
    println!("peak rss: {:?} bytes", ftbench_meter::peak_rss_bytes());
}
