//! Backend choice: `--backend auto|cuda|wgpu|cpu`.
//!
//! The backends are Burn's `CubeBackend` for CUDA and WGPU **without** the fusion wrapper (Burn is
//! built without its `fusion` feature): our CubeCL kernels are implemented for
//! `CubeBackend<R, …>` generically over the runtime, so both GPU backends share one kernel source,
//! and the fusion layer would hide those ops from the extension traits. `cpu` is burn-flex, Burn's
//! newer CPU backend (`gemm` matmuls, rayon threads, SIMD, f16/bf16 storage), which uses the
//! composite reference ops. It replaced NdArray, whose SIMD reciprocal is a 12-bit approximation
//! (parity errors ~10× those of wgpu, and isolated gradient elements off by 1e-4 relative).
//!
//! `auto` picks CUDA if a driver answers, else a hardware wgpu adapter, else the CPU. A software
//! Vulkan adapter (Mesa lavapipe/llvmpipe) counts as the CPU: it is correct but slower than the
//! CPU backend, so `auto` says so and uses `cpu`; `--backend wgpu` still selects it.

use std::fmt;

use anyhow::{bail, Result};

/// CUDA backend type (f32, i32 ints).
pub type CudaBackend = burn::backend::Cuda<f32, i32>;
/// WGPU backend type (f32, i32 ints, u32 bools).
pub type WgpuBackend = burn::backend::Wgpu<f32, i32, u32>;
/// CPU backend type.
pub type CpuBackend = burn::backend::Flex;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// CUDA if a driver answers, else a hardware wgpu adapter, else the CPU.
    #[default]
    Auto,
    /// NVIDIA GPUs through CUDA.
    Cuda,
    /// Any Vulkan / Metal / DX12 adapter through wgpu (including software Vulkan).
    Wgpu,
    /// The CPU (burn-flex).
    Cpu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda),
            "wgpu" => Ok(Self::Wgpu),
            "cpu" | "flex" => Ok(Self::Cpu),
            other => Err(format!(
                "unknown backend {other:?} (expected auto, cuda, wgpu or cpu)"
            )),
        }
    }
}

/// A usable device, with a description for the user.
#[derive(Debug, Clone)]
pub enum Selected {
    /// A CUDA device.
    Cuda(burn::backend::cuda::CudaDevice),
    /// A wgpu adapter, and its name.
    Wgpu(burn::backend::wgpu::WgpuDevice, String),
    /// The CPU.
    Cpu(burn::backend::flex::FlexDevice),
}

impl fmt::Display for Selected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selected::Cuda(d) => write!(f, "cuda (device {})", d.index),
            Selected::Wgpu(d, name) => write!(f, "wgpu ({name}, {d:?})"),
            Selected::Cpu(_) => write!(
                f,
                "cpu (burn-flex, {} threads)",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
        }
    }
}

/// Run `$body` with `$b` bound to the selected backend type and `$dev` to its device.
///
/// ```ignore
/// dispatch!(selected, B, device => run::<B>(&device))
/// ```
#[macro_export]
macro_rules! dispatch {
    ($sel:expr, $b:ident, $dev:ident => $body:expr) => {
        match $sel {
            $crate::backend::Selected::Cuda(d) => {
                type $b = $crate::backend::CudaBackend;
                let $dev = d;
                $body
            }
            $crate::backend::Selected::Wgpu(d, _) => {
                type $b = $crate::backend::WgpuBackend;
                let $dev = d;
                $body
            }
            $crate::backend::Selected::Cpu(d) => {
                type $b = $crate::backend::CpuBackend;
                let $dev = d;
                $body
            }
        }
    };
}

/// Resolve a choice to a device, or explain why it is unavailable.
pub fn select(choice: BackendChoice) -> Result<Selected> {
    match choice {
        BackendChoice::Cpu => Ok(Selected::Cpu(Default::default())),
        BackendChoice::Cuda => cuda(),
        BackendChoice::Wgpu => match wgpu_adapter(true) {
            Some((d, name)) => Ok(Selected::Wgpu(d, name)),
            None => bail!(
                "--backend wgpu: no wgpu adapter found (no Vulkan/Metal/DX12 driver; on a machine without a GPU install Mesa's software Vulkan: apt-get install mesa-vulkan-drivers libvulkan1)"
            ),
        },
        BackendChoice::Auto => {
            if let Ok(s) = cuda() {
                return Ok(s);
            }
            if let Some((d, name)) = wgpu_adapter(false) {
                return Ok(Selected::Wgpu(d, name));
            }
            if let Some((_, name)) = wgpu_adapter(true) {
                eprintln!("note: wgpu adapter {name:?} is a software renderer; using the cpu backend (pass --backend wgpu to use it anyway)");
            }
            Ok(Selected::Cpu(Default::default()))
        }
    }
}

fn cuda() -> Result<Selected> {
    #[cfg(target_os = "windows")]
    const LIB: &str = "nvcuda.dll";
    #[cfg(not(target_os = "windows"))]
    const LIB: &str = "libcuda.so.1";
    // Loading the driver library first gives a clean error; Burn's device registry panics on a
    // machine without one.
    #[allow(unsafe_code)]
    // SAFETY: loading the CUDA driver library runs only its (trusted, vendor) initialisers.
    let lib = unsafe { libloading::Library::new(LIB) };
    if lib.is_err() {
        bail!("--backend cuda: no CUDA driver ({LIB}) found");
    }
    let device = burn::backend::cuda::CudaDevice::new(0);
    if !cuda_answers(&device) {
        bail!("--backend cuda: the CUDA driver loaded but device 0 could not be used (no GPU visible, or the driver is too old)");
    }
    Ok(Selected::Cuda(device))
}

/// Whether `device` round-trips a one-element tensor (a missing or broken device panics inside
/// Burn; the panic is caught quietly).
fn cuda_answers(device: &burn::backend::cuda::CudaDevice) -> bool {
    let probe = quietly(|| {
        let t = burn::tensor::Tensor::<CudaBackend, 1>::from_floats([1.0f32], device);
        t.into_data()
            .to_vec::<f32>()
            .map(|v| v[0])
            .unwrap_or(f32::NAN)
    });
    probe == Some(1.0)
}

/// The adapters of the graphics API Burn uses here (Metal on macOS, Vulkan elsewhere); none if
/// enumerating them fails.
fn wgpu_adapter_infos() -> Vec<wgpu::AdapterInfo> {
    #[cfg(target_os = "macos")]
    let backends = wgpu::Backends::METAL;
    #[cfg(not(target_os = "macos"))]
    let backends = wgpu::Backends::VULKAN;
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    quietly(|| pollster::block_on(instance.enumerate_adapters(backends)))
        .map_or(vec![], |a| a.iter().map(|a| a.get_info()).collect())
}

/// Run `f`, turning a panic into `None` without printing it.
pub fn quietly<T>(f: impl FnOnce() -> T) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // Nothing observed by `f` is used after a panic except its result, so unwind safety holds.
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok();
    std::panic::set_hook(hook);
    out
}

/// The first wgpu adapter of the graphics API Burn uses here (Metal on macOS, Vulkan elsewhere):
/// discrete, then integrated, then virtual GPUs; a CPU adapter only if `allow_cpu`.
fn wgpu_adapter(allow_cpu: bool) -> Option<(burn::backend::wgpu::WgpuDevice, String)> {
    use burn::backend::wgpu::WgpuDevice;
    let infos = wgpu_adapter_infos();
    let find = |t: wgpu::DeviceType| {
        infos
            .iter()
            .find(|i| i.device_type == t)
            .map(|i| i.name.clone())
    };
    use wgpu::DeviceType as D;
    if let Some(n) = find(D::DiscreteGpu) {
        return Some((WgpuDevice::DiscreteGpu(0), n));
    }
    if let Some(n) = find(D::IntegratedGpu) {
        return Some((WgpuDevice::IntegratedGpu(0), n));
    }
    if let Some(n) = find(D::VirtualGpu) {
        return Some((WgpuDevice::VirtualGpu(0), n));
    }
    if allow_cpu {
        if let Some(n) = find(D::Cpu) {
            return Some((WgpuDevice::Cpu, n));
        }
    }
    None
}

/// The `i`-th device of the same kind (for `--devices cuda:0,cuda:1`), checked against the
/// devices that exist: a CUDA index must answer a probe, a hardware wgpu index must be below the
/// number of adapters of that type. The CPU and a software wgpu adapter have one device, which
/// several peers then share (any index names it).
pub trait NthDevice: Sized {
    /// Device `i` of this kind, or an error naming `--devices` and the devices there are.
    fn nth(&self, i: usize) -> Result<Self>;
}

impl NthDevice for burn::backend::cuda::CudaDevice {
    fn nth(&self, i: usize) -> Result<Self> {
        let device = burn::backend::cuda::CudaDevice::new(i);
        match cuda_answers(&device) {
            true => Ok(device),
            false => bail!("--devices cuda:{i}: no usable CUDA device {i} (`nvidia-smi -L` lists the devices; indices start at 0)"),
        }
    }
}

impl NthDevice for burn::backend::wgpu::WgpuDevice {
    fn nth(&self, i: usize) -> Result<Self> {
        use burn::backend::wgpu::WgpuDevice as W;
        let (kind, make): (wgpu::DeviceType, fn(usize) -> W) = match self {
            W::DiscreteGpu(_) => (wgpu::DeviceType::DiscreteGpu, W::DiscreteGpu),
            W::IntegratedGpu(_) => (wgpu::DeviceType::IntegratedGpu, W::IntegratedGpu),
            W::VirtualGpu(_) => (wgpu::DeviceType::VirtualGpu, W::VirtualGpu),
            other => return Ok(other.clone()),
        };
        let n = wgpu_adapter_infos()
            .iter()
            .filter(|a| a.device_type == kind)
            .count();
        if i >= n {
            bail!("--devices wgpu:{i}: this machine has {n} wgpu adapter(s) of type {kind:?} (indices 0..{n})");
        }
        Ok(make(i))
    }
}

impl NthDevice for burn::backend::flex::FlexDevice {
    fn nth(&self, _: usize) -> Result<Self> {
        Ok(*self)
    }
}
