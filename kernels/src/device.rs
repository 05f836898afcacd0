//! What a device can say about its memory: the pool's reservation and the largest single buffer.
//! Part of [`crate::KernelBackend`], so the trainer can refuse a step whose largest buffer the
//! device cannot allocate before it starts, instead of failing inside the backend.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;

/// Memory facts where the backend has them (CubeCL backends); `None` elsewhere.
pub trait MemoryProbe: Backend {
    /// Bytes reserved by the device's memory pool, if known.
    fn reserved_bytes(_device: &Self::Device) -> Option<u64> {
        None
    }
    /// The largest single buffer the device can allocate, if it has such a limit (wgpu
    /// adapters: `max_storage_buffer_binding_size`, under 256 MiB on Mesa lavapipe; the CPU: the
    /// host's available memory).
    fn max_buffer_bytes(_device: &Self::Device) -> Option<u64> {
        None
    }
    /// The memory a training run may use on the device, if known (CUDA: the device's total
    /// memory; the CPU: the host's available memory). wgpu adapters do not report theirs.
    fn device_memory_bytes(_device: &Self::Device) -> Option<u64> {
        None
    }
}

/// The CPU: no buffer can be larger than the memory the host has available (Linux
/// `MemAvailable`); an allocation past it would end in the kernel's OOM killer, not an error.
impl MemoryProbe for burn::backend::Flex {
    fn max_buffer_bytes(_device: &Self::Device) -> Option<u64> {
        host_available_bytes()
    }
    fn device_memory_bytes(_device: &Self::Device) -> Option<u64> {
        host_available_bytes()
    }
}

/// `MemAvailable` from `/proc/meminfo`, where there is one.
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl<R, F, I, BT> MemoryProbe for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn reserved_bytes(device: &Self::Device) -> Option<u64> {
        R::client(device)
            .memory_usage()
            .ok()
            .map(|m| m.bytes_reserved)
    }
    fn max_buffer_bytes(device: &Self::Device) -> Option<u64> {
        Some(R::client(device).properties().memory.max_page_size)
    }
    /// CUDA: cubecl-cuda 0.10 sets the largest page to a quarter of `cuDeviceTotalMem`
    /// (`runtime.rs`), so the total is four pages. Other runtimes: unknown.
    fn device_memory_bytes(device: &Self::Device) -> Option<u64> {
        let client = R::client(device);
        (R::name(&client) == "cuda").then(|| 4 * client.properties().memory.max_page_size)
    }
}

impl<B: MemoryProbe, C: CheckpointStrategy> MemoryProbe for Autodiff<B, C> {
    fn reserved_bytes(device: &Self::Device) -> Option<u64> {
        B::reserved_bytes(device)
    }
    fn max_buffer_bytes(device: &Self::Device) -> Option<u64> {
        B::max_buffer_bytes(device)
    }
    fn device_memory_bytes(device: &Self::Device) -> Option<u64> {
        B::device_memory_bytes(device)
    }
}
