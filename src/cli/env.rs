//! `diffusiond env`: what libtorch sees on this machine.

use clap::Args;
use tch::{Cuda, Device, Kind, Tensor};

#[derive(Debug, Args)]
pub struct EnvArgs {
    /// Also run a small matmul on each visible device to prove it works.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: EnvArgs) -> anyhow::Result<()> {
    let cuda = Cuda::is_available();
    let gpus = Cuda::device_count();
    println!("diffusiond {}", env!("CARGO_PKG_VERSION"));
    println!("cpu threads: {}", tch::get_num_threads());
    println!("cuda available: {cuda}");
    println!("cuda devices: {gpus}");
    println!("cudnn available: {}", Cuda::cudnn_is_available());
    if args.check {
        let mut devices = vec![Device::Cpu];
        devices.extend((0..gpus.max(0) as usize).map(Device::Cuda));
        for device in devices {
            let a = Tensor::ones([64, 64], (Kind::Float, device));
            let sum = a.matmul(&a).sum(Kind::Double).f_double_value(&[])?;
            anyhow::ensure!(sum == 64.0 * 64.0 * 64.0, "{device:?}: matmul gave {sum}");
            println!("{device:?}: ok");
        }
    }
    Ok(())
}
