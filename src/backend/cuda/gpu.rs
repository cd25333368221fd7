//! One CUDA device as the backend uses it: the context, one stream, cuBLAS on that stream, the
//! kernels of `kernels.cu` (built by build.rs, embedded), device buffers and the launches.
//!
//! The CUDA libraries are loaded at run time (cudarc's `dynamic-loading`): a cuda build starts and
//! serves on the CPU on a machine without a GPU or driver, and `Gpu::open` says clearly what is
//! missing. Buffers are addressed by raw device pointers within one stream (event tracking is
//! off), so the step is a plain sequence of launches that a CUDA graph can later capture.
use std::cell::RefCell;
use std::sync::Arc;

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{sys as driver_sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;

use crate::backend::BackendError;

/// The kernels' fatbin (build.rs).
static KERNELS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// The element type of weights and of the activations fed to the matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F16,
    F32,
}

impl Dtype {
    /// `INFERD_CUDA_DTYPE=f32` computes the products in full f32 (weights stored in f32: twice
    /// the memory; for exact comparisons), else f16 with f32 accumulation.
    pub fn from_env() -> Dtype {
        match std::env::var("INFERD_CUDA_DTYPE").as_deref() {
            Ok("f32") => Dtype::F32,
            _ => Dtype::F16,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    fn cuda(self) -> blas_sys::cudaDataType {
        match self {
            Dtype::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            Dtype::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// A device buffer with its raw address (valid while the buffer lives).
pub struct Buf<T> {
    pub slice: CudaSlice<T>,
    pub ptr: u64,
}

impl<T> Buf<T> {
    pub fn len(&self) -> usize {
        self.slice.len()
    }
}

/// The kernels by name.
pub struct Kernels {
    pub embed_f16: CudaFunction,
    pub embed_f32: CudaFunction,
    pub rms_norm: CudaFunction,
    pub qkv_rope_store: CudaFunction,
    pub attend: CudaFunction,
    pub silu_mul: CudaFunction,
    pub argmax_part: CudaFunction,
    pub argmax_rows: CudaFunction,
    pub sample_rows: CudaFunction,
    pub scatter_i32: CudaFunction,
    pub gather_ids: CudaFunction,
    pub lora_update: CudaFunction,
    pub f16_to_f32: CudaFunction,
    pub gemv_row: CudaFunction,
    pub gemv_qkv_rope: CudaFunction,
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// A second stream for work beside the main stream's (LoRA updates beside the products),
    /// forked from and joined to it by the two events (`fork`, `join`; also inside a capture).
    side: Arc<CudaStream>,
    /// Whether the side stream is used (`INFERD_CUDA_SIDE_STREAM=0`: its work runs on the main
    /// stream, in order, for A/B runs).
    use_side: bool,
    forked: CudaEvent,
    joined: CudaEvent,
    /// Page-locked staging of the steps' uploads (async scheduling; `stage_uploads`).
    staging: RefCell<Option<Staging>>,
    blas: CudaBlas,
    /// cuBLAS's workspace, set explicitly so that no product allocates (a graph capture forbids it).
    _workspace: CudaSlice<u8>,
    /// A cuBLAS handle on the side stream, with its own workspace (LoRA's stacked products).
    blas_side: CudaBlas,
    _workspace_side: CudaSlice<u8>,
    _module: Arc<CudaModule>,
    pub k: Kernels,
}

/// Two page-locked arenas that the steps' uploads are copied from, alternating by step, each with
/// the event recorded after the last copy from it.
struct Staging {
    arenas: [PinnedHostSlice<u8>; 2],
    done: [Option<CudaEvent>; 2],
    cur: usize,
    used: usize,
}

impl Staging {
    /// Copies `data` into the current arena; None when it does not fit.
    fn stage<T>(&mut self, data: &[T]) -> Result<Option<&[T]>, BackendError> {
        let bytes = std::mem::size_of_val(data);
        let at = self.used.next_multiple_of(16);
        let arena = &mut self.arenas[self.cur];
        if at + bytes > arena.len() {
            return Ok(None);
        }
        let base = arena.as_mut_ptr().map_err(|e| compute("page-locked buffer", e))?;
        self.used = at + bytes;
        // SAFETY: [at, at + bytes) lies inside the arena, which nothing reads until the copy
        // queued from it runs; 16-byte alignment covers every T the uploads use.
        unsafe {
            let dst = base.add(at);
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, dst, bytes);
            Ok(Some(std::slice::from_raw_parts(dst as *const T, data.len())))
        }
    }
}

/// A captured CUDA graph, movable to the worker thread that owns the backend.
pub struct Graph(CudaGraph);

// SAFETY: CUDA graph handles are not tied to the thread that made them (the driver API only needs
// the context current, which every launch binds); the backend that holds them is used by one
// thread at a time.
unsafe impl Send for Graph {}

/// cuBLAS's workspace: what NVIDIA recommends for Hopper (32 MiB).
const BLAS_WORKSPACE: usize = 32 << 20;

fn driver_err(what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Load(format!("{what}: {e:?}"))
}

/// Whether a shared library can be opened (checked before cudarc, which panics when it cannot).
fn library_present(names: &[&str]) -> bool {
    // SAFETY: opening NVIDIA's own libraries runs only their initialisers.
    names.iter().any(|n| unsafe { libloading::Library::new(*n) }.is_ok())
}

impl Gpu {
    /// Opens device `ordinal`, its stream, cuBLAS and the kernels.
    pub fn open(ordinal: usize) -> Result<Gpu, BackendError> {
        if !library_present(&["libcuda.so.1", "libcuda.so"]) {
            return Err(BackendError::Load(format!(
                "cuda:{ordinal}: the NVIDIA driver library (libcuda.so.1) is not installed or not on the library path; \
                 serve with device = \"cpu\", or install the driver (CUDA 13.0, driver 580 or newer)"
            )));
        }
        if !library_present(&["libcublas.so.13", "libcublas.so"]) {
            return Err(BackendError::Load(format!(
                "cuda:{ordinal}: cuBLAS (libcublas.so.13) is not on the library path; install CUDA 13's cuBLAS \
                 (e.g. pip install nvidia-cublas==13.0.*) and add its lib folder to LD_LIBRARY_PATH"
            )));
        }
        let count = CudaContext::device_count().map_err(|e| driver_err("cannot count CUDA devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(BackendError::Load(format!("cuda:{ordinal}: this machine has {count} CUDA device(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(&format!("cuda:{ordinal}: cannot open the device"), e))?;
        // SAFETY: every buffer is used on the one stream below, in order; nothing needs events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_err("cannot create a CUDA stream", e))?;
        let side = ctx.new_stream().map_err(|e| driver_err("cannot create a CUDA stream", e))?;
        let event = || ctx.new_event(None).map_err(|e| driver_err("cannot create a CUDA event", e));
        let (forked, joined) = (event()?, event()?);
        let (blas, workspace) = blas_on(&stream)?;
        let (blas_side, workspace_side) = blas_on(&side)?;
        let module = ctx
            .load_module(Ptx::from_binary(KERNELS.to_vec()))
            .map_err(|e| driver_err(&format!("cuda:{ordinal}: cannot load inferd's kernels (built for sm_80..sm_90; is the driver older than CUDA 13.0?)"), e))?;
        let f = |name: &str| module.load_function(name).map_err(|e| driver_err(&format!("kernel {name}"), e));
        let k = Kernels {
            embed_f16: f("embed_f16")?,
            embed_f32: f("embed_f32")?,
            rms_norm: f("rms_norm")?,
            qkv_rope_store: f("qkv_rope_store")?,
            attend: f("attend")?,
            silu_mul: f("silu_mul")?,
            argmax_part: f("argmax_part")?,
            argmax_rows: f("argmax_rows")?,
            sample_rows: f("sample_rows")?,
            scatter_i32: f("scatter_i32")?,
            gather_ids: f("gather_ids")?,
            lora_update: f("lora_update")?,
            f16_to_f32: f("f16_to_f32")?,
            gemv_row: f("gemv_row")?,
            gemv_qkv_rope: f("gemv_qkv_rope")?,
        };
        let use_side = !std::env::var("INFERD_CUDA_SIDE_STREAM").is_ok_and(|v| v == "0");
        Ok(Gpu {
            ctx,
            stream,
            side,
            use_side,
            forked,
            joined,
            staging: RefCell::new(None),
            blas,
            _workspace: workspace,
            blas_side,
            _workspace_side: workspace_side,
            _module: module,
            k,
        })
    }

    /// The device's name, for the log.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown".into())
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), BackendError> {
        self.ctx.mem_get_info().map_err(|e| driver_err("cannot read the device's memory", e))
    }

    /// A zeroed buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<Buf<T>, BackendError> {
        let slice = self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| oom(n * std::mem::size_of::<T>(), e))?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(Buf { slice, ptr })
    }

    /// A buffer holding `data`.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<Buf<T>, BackendError> {
        let slice = self.stream.clone_htod(data).map_err(|e| oom(std::mem::size_of_val(data), e))?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(Buf { slice, ptr })
    }

    /// Copies `data` into the start of `buf`.
    pub fn write<T: DeviceRepr>(&self, buf: &mut Buf<T>, data: &[T]) -> Result<(), BackendError> {
        self.write_at(buf, 0, data)
    }

    /// Copies `data` into `buf` from element `offset` on, queued on the stream. With staging on
    /// (`stage_uploads`) the copy goes through page-locked memory and returns at once; otherwise
    /// it is a copy from pageable memory, which may wait for the stream's earlier work.
    pub fn write_at<T: DeviceRepr>(&self, buf: &mut Buf<T>, offset: usize, data: &[T]) -> Result<(), BackendError> {
        assert!(offset + data.len() <= buf.len(), "a write past the end of a device buffer");
        if let Some(st) = self.staging.borrow_mut().as_mut() {
            if let Some(src) = st.stage(data)? {
                // SAFETY: `src` is page-locked memory that stays untouched until the event
                // recorded after this step's uploads has passed (`Staging::flip`), and the
                // destination lies inside `buf` (asserted above).
                return unsafe { cudarc::driver::result::memcpy_htod_async(buf.ptr + (offset * std::mem::size_of::<T>()) as u64, src, self.stream.cu_stream()) }
                    .map_err(|e| compute("copy to the device", e));
            }
        }
        let mut view = buf.slice.slice_mut(offset..offset + data.len());
        self.stream.memcpy_htod(data, &mut view).map_err(|e| compute("copy to the device", e))
    }

    /// Stages every later upload through two page-locked arenas of `bytes` each (async
    /// scheduling: the next step's uploads must not wait for the step in flight). An upload that
    /// does not fit goes from pageable memory, as without staging.
    pub fn stage_uploads(&self, bytes: usize) -> Result<(), BackendError> {
        // SAFETY: the arenas are written before any copy reads them (`Staging::stage`).
        let arena = || unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }.map_err(|e| oom(bytes, e));
        *self.staging.borrow_mut() = Some(Staging { arenas: [arena()?, arena()?], done: [None, None], cur: 0, used: 0 });
        Ok(())
    }

    /// Ends one step's uploads (staging on): the arena they came from is refilled only after they
    /// have run. The event is recorded after the step's last launch, so the wait here, at the end
    /// of the next step's launch, lasts until the step before has ended: with async scheduling a
    /// launch returns with its work queued and the step before done, and the host's work for the
    /// step after runs while this one computes.
    pub fn end_uploads(&self) -> Result<(), BackendError> {
        let mut staging = self.staging.borrow_mut();
        let Some(st) = staging.as_mut() else { return Ok(()) };
        st.done[st.cur] = Some(self.stream.record_event(None).map_err(|e| compute("record an event", e))?);
        st.cur ^= 1;
        st.used = 0;
        if let Some(e) = st.done[st.cur].take() {
            e.synchronize().map_err(|e| compute("the uploads of two steps before", e))?;
        }
        Ok(())
    }

    /// A page-locked host buffer of `n` elements (cached, for the host to read).
    pub fn pinned<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<PinnedHostSlice<T>, BackendError> {
        // SAFETY: the buffer is only read after a copy into it has completed (`read_async`).
        unsafe { self.ctx.alloc_pinned_with_flags::<T>(n.max(1), 0) }.map_err(|e| oom(n * std::mem::size_of::<T>(), e))
    }

    /// Queues a copy of `n` elements of `buf` into `dst` (page-locked) and returns the event that
    /// marks its end: `dst` may be read once that event has passed.
    pub fn read_async<T: DeviceRepr + ValidAsZeroBits>(&self, buf: &Buf<T>, n: usize, dst: &mut PinnedHostSlice<T>) -> Result<CudaEvent, BackendError> {
        assert!(n <= buf.len() && n <= dst.len(), "an asynchronous read past a buffer's end");
        let host = dst.as_mut_slice().map_err(|e| compute("page-locked buffer", e))?;
        // SAFETY: both ranges are in bounds (asserted above); the caller reads `dst` only after
        // the returned event has passed.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..n], buf.ptr, self.stream.cu_stream()) }.map_err(|e| compute("copy to the host", e))?;
        self.stream.record_event(None).map_err(|e| compute("record an event", e))
    }

    /// Records what `launches` puts on the stream into a CUDA graph (nothing runs).
    pub fn capture(&self, launches: impl FnOnce() -> Result<(), BackendError>) -> Result<Graph, BackendError> {
        self.stream
            .begin_capture(driver_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| compute("begin a graph capture", e))?;
        let r = launches();
        let graph = self.stream.end_capture(driver_sys::CUgraphInstantiate_flags(0)).map_err(|e| compute("end a graph capture", e));
        r?;
        graph?.map(Graph).ok_or_else(|| BackendError::Compute("CUDA: the graph capture recorded nothing".into()))
    }

    /// Replays a captured graph on the stream.
    pub fn replay(&self, graph: &Graph) -> Result<(), BackendError> {
        graph.0.launch().map_err(|e| compute("graph launch", e))
    }

    /// Copies `out.len()` elements from device address `ptr` (inside `buf`) to the host; waits.
    pub fn read<T: DeviceRepr + Default + Clone>(&self, buf: &Buf<T>, offset: usize, out: &mut [T]) -> Result<(), BackendError> {
        let view = buf.slice.slice(offset..offset + out.len());
        self.stream.memcpy_dtoh(&view, out).map_err(|e| compute("copy to the host", e))?;
        self.stream.synchronize().map_err(|e| compute("stream", e))
    }

    /// Launches `f` on the stream with `args` (each a reference to a plain value or device address).
    pub fn launch(&self, f: &CudaFunction, grid: (u32, u32), block: u32, args: &[&dyn Arg]) -> Result<(), BackendError> {
        self.launch_on(&self.stream, f, grid, block, args)
    }

    /// Launches `f` on the side stream (between `fork` and `join`).
    pub fn launch_side(&self, f: &CudaFunction, grid: (u32, u32), block: u32, args: &[&dyn Arg]) -> Result<(), BackendError> {
        self.launch_on(if self.use_side { &self.side } else { &self.stream }, f, grid, block, args)
    }

    /// The side stream's next work waits for everything on the stream so far.
    pub fn fork(&self) -> Result<(), BackendError> {
        if !self.use_side {
            return Ok(());
        }
        self.forked.record(&self.stream).map_err(|e| compute("record an event", e))?;
        self.side.wait(&self.forked).map_err(|e| compute("wait for an event", e))
    }

    /// The stream's next work waits for everything on the side stream so far.
    pub fn join(&self) -> Result<(), BackendError> {
        if !self.use_side {
            return Ok(());
        }
        self.joined.record(&self.side).map_err(|e| compute("record an event", e))?;
        self.stream.wait(&self.joined).map_err(|e| compute("wait for an event", e))
    }

    fn launch_on(&self, stream: &CudaStream, f: &CudaFunction, grid: (u32, u32), block: u32, args: &[&dyn Arg]) -> Result<(), BackendError> {
        let mut b = stream.launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        let cfg = LaunchConfig { grid_dim: (grid.0.max(1), grid.1.max(1), 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: every kernel's parameter list is matched by its caller in `forward.rs`, and the
        // device addresses passed point into live buffers of the sizes the kernels index.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| compute("kernel launch", e))
    }

    /// `y[rows, n] = x[rows, k] W^T (+ y when accumulate)`: `w` row-major [n, k] of `dtype`, `x`
    /// row-major [rows, k] of `dtype`, `y` f32. f32 inputs compute in full f32 (no TF32).
    pub fn gemm(&self, dtype: Dtype, w: u64, x: u64, y: u64, rows: usize, n: usize, k: usize, accumulate: bool) -> Result<(), BackendError> {
        gemm_with(&self.blas, dtype, w, x, y, rows, n, k, accumulate)
    }

    /// `gemm` on the side stream (between `fork` and `join`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_side(&self, dtype: Dtype, w: u64, x: u64, y: u64, rows: usize, n: usize, k: usize, accumulate: bool) -> Result<(), BackendError> {
        gemm_with(if self.use_side { &self.blas_side } else { &self.blas }, dtype, w, x, y, rows, n, k, accumulate)
    }

    /// Waits for the stream; surfaces any asynchronous error of the launches before.
    pub fn sync(&self) -> Result<(), BackendError> {
        self.stream.synchronize().map_err(|e| compute("the step on the device", e))
    }
}

fn oom(bytes: usize, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Load(format!("cannot allocate {} MiB on the device: {e:?}", bytes.div_ceil(1 << 20)))
}

fn compute(what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Compute(format!("CUDA: {what}: {e:?}"))
}

/// `Gpu::gemm` on the handle `blas` (bound to its stream).
#[allow(clippy::too_many_arguments)]
fn gemm_with(blas: &CudaBlas, dtype: Dtype, w: u64, x: u64, y: u64, rows: usize, n: usize, k: usize, accumulate: bool) -> Result<(), BackendError> {
    let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
    // Column-major view: Y^T [n, rows] = W [n, k] (stored as k x n, transposed) X^T [k, rows].
    // SAFETY: the handle is bound to this stream; the addresses hold the sizes described above.
    unsafe {
        blas_result::gemm_ex(
            *blas.handle(),
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            rows as i32,
            k as i32,
            (&alpha as *const f32).cast(),
            w as *const _,
            dtype.cuda(),
            k as i32,
            x as *const _,
            dtype.cuda(),
            k as i32,
            (&beta as *const f32).cast(),
            y as *mut _,
            blas_sys::cudaDataType::CUDA_R_32F,
            n as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| compute("cuBLAS product", e))
}

/// A cuBLAS handle on `stream` with a workspace of its own, set explicitly so that no product
/// allocates (a graph capture forbids it).
fn blas_on(stream: &Arc<CudaStream>) -> Result<(CudaBlas, CudaSlice<u8>), BackendError> {
    let blas = CudaBlas::new(Arc::clone(stream)).map_err(|e| driver_err("cannot start cuBLAS", e))?;
    let workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE).map_err(|e| oom(BLAS_WORKSPACE, e))?;
    let ws_ptr = workspace.device_ptr(stream).0;
    // SAFETY: the workspace outlives the handle (both are fields of `Gpu`, dropped together).
    let status = unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ws_ptr as *mut _, BLAS_WORKSPACE) };
    if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(driver_err("cannot set cuBLAS's workspace", status));
    }
    Ok((blas, workspace))
}

/// A kernel argument: a plain value pushed by reference.
pub trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

impl<T: DeviceRepr> Arg for T {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}
