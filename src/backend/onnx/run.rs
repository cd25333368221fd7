//! One ONNX Runtime `Run` over tensors that live in the backend's own memory.
//!
//! Every input and output is a view (`CreateTensorWithDataAsOrtValue`) of memory the backend
//! owns: token ids and masks, the KV buffers (bound as the past input *and* the present output,
//! which puts GroupQueryAttention in its shared-buffer mode) and the logits. Outputs given to
//! `Run` pre-allocated are written in place, so a step allocates nothing in ORT. `ort`'s safe
//! `run` cannot bind one memory as both an input and an output, hence the raw call.
use std::ffi::{CStr, CString};

use ort::memory::MemoryInfo;
use ort::session::Session;
use ort::value::{Shape, TensorRefMut};
use ort::AsPointer;

/// Element types the backend hands to the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
}

/// A tensor view kept alive for the duration of one `Run`.
pub enum View {
    F32(TensorRefMut<'static, f32>),
    F16(TensorRefMut<'static, half::f16>),
    I64(TensorRefMut<'static, i64>),
}

impl View {
    /// A float view of `shape` at `ptr`.
    ///
    /// # Safety
    /// `ptr` must point to at least `shape.product() * dtype.bytes()` bytes valid for the device
    /// of `info`, and the memory must outlive the view.
    pub unsafe fn float(info: &MemoryInfo, dtype: Dtype, ptr: *mut u8, shape: &[i64]) -> Result<View, String> {
        let shape = Shape::new(shape.iter().copied());
        let r = match dtype {
            Dtype::F32 => unsafe { TensorRefMut::<f32>::from_raw(info.clone(), ptr.cast(), shape) }.map(View::F32),
            Dtype::F16 => unsafe { TensorRefMut::<half::f16>::from_raw(info.clone(), ptr.cast(), shape) }.map(View::F16),
        };
        r.map_err(|e| format!("cannot create a tensor view: {e}"))
    }

    /// An i64 view of a host slice (token ids, masks, positions).
    pub fn ids(info: &MemoryInfo, data: &mut [i64], shape: &[i64]) -> Result<View, String> {
        assert_eq!(data.len() as i64, shape.iter().product::<i64>(), "shape does not match the data");
        let shape = Shape::new(shape.iter().copied());
        // SAFETY: the slice holds exactly `shape` elements and outlives the view (callers drop
        // views before touching the slice again).
        unsafe { TensorRefMut::<i64>::from_raw(info.clone(), data.as_mut_ptr().cast(), shape) }
            .map(View::I64)
            .map_err(|e| format!("cannot create a tensor view: {e}"))
    }

    fn ptr(&self) -> *mut ort::sys::OrtValue {
        match self {
            View::F32(v) => v.ptr().cast_mut(),
            View::F16(v) => v.ptr().cast_mut(),
            View::I64(v) => v.ptr().cast_mut(),
        }
    }
}

/// Runs `session` with `inputs`, writing into the pre-allocated `outputs`. A view may appear in
/// both lists (shared past/present buffers).
pub fn run(session: &mut Session, inputs: &[(&CStr, &View)], outputs: &[(&CStr, &View)]) -> Result<(), String> {
    let in_names: Vec<*const std::ffi::c_char> = inputs.iter().map(|(n, _)| n.as_ptr()).collect();
    let in_vals: Vec<*const ort::sys::OrtValue> = inputs.iter().map(|(_, v)| v.ptr().cast_const()).collect();
    let out_names: Vec<*const std::ffi::c_char> = outputs.iter().map(|(n, _)| n.as_ptr()).collect();
    let mut out_vals: Vec<*mut ort::sys::OrtValue> = outputs.iter().map(|(_, v)| v.ptr()).collect();
    let api = ort::api();
    // SAFETY: names are NUL-terminated and live across the call; every value is a live OrtValue
    // over memory that outlives the call; pre-allocated outputs stay owned by their views.
    let status = unsafe {
        (api.Run)(
            session.ptr_mut(),
            std::ptr::null(),
            in_names.as_ptr(),
            in_vals.as_ptr(),
            in_vals.len(),
            out_names.as_ptr(),
            out_names.len(),
            out_vals.as_mut_ptr(),
        )
    };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status is a valid OrtStatus that we own and release once.
    let msg = unsafe {
        let m = CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned();
        (api.ReleaseStatus)(status.0);
        m
    };
    Err(msg)
}

/// `name` as a C string (graph names never contain NUL; one that does is reported, not panicked on).
pub fn cname(name: &str) -> Result<CString, String> {
    CString::new(name).map_err(|_| format!("graph name {name:?} contains a NUL byte"))
}
