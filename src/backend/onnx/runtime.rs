//! Finding and loading the ONNX Runtime shared library, and opening sessions on an execution
//! provider.
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`), once per process, from the first
//! of: the configured path (`[server] onnxruntime_library`), `ORT_DYLIB_PATH`, or the copy that
//! `scripts/fetch_onnxruntime.sh` installs under `runtimes/onnxruntime/`. A missing or too old
//! library is an error with one sentence saying how to get it, never a panic.
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;

use crate::config::Device;

/// The ONNX Runtime release the project pins and `scripts/fetch_onnxruntime.sh` installs.
pub const PINNED_VERSION: &str = "1.31.1";

/// File name of the library on this OS.
pub const LIB_NAME: &str = if cfg!(target_os = "macos") {
    "libonnxruntime.dylib"
} else if cfg!(windows) {
    "onnxruntime.dll"
} else {
    "libonnxruntime.so"
};

fn how_to_get() -> String {
    format!(
        "run scripts/fetch_onnxruntime.sh (installs ONNX Runtime {PINNED_VERSION} from PyPI into runtimes/onnxruntime/) \
         or point ORT_DYLIB_PATH or [server] onnxruntime_library at {LIB_NAME} 1.31 or newer"
    )
}

/// A path given explicitly: the configured one, else `ORT_DYLIB_PATH`. It must work as given.
fn explicit_path(configured: Option<&Path>) -> Option<PathBuf> {
    configured
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()).map(PathBuf::from))
}

/// Where an installed copy is looked for when no path is given, in order (existing or not).
fn installed_copies() -> Vec<PathBuf> {
    let installed = Path::new("runtimes").join("onnxruntime").join(LIB_NAME);
    let mut out = vec![installed.clone(), Path::new(env!("CARGO_MANIFEST_DIR")).join(&installed)];
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        out.push(dir.join(LIB_NAME));
    }
    out
}

static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());
/// Held while a session that registers inferd's operator domain is created. ONNX Runtime keeps
/// custom domains in one process-wide map and checks for a domain, then adds it, without a lock
/// between the two: two sessions created at once could both find [`super::op_edit::DOMAIN`]
/// missing, and the second failed with "the domain is already exist", which made that model
/// fall back to ONNX Runtime's kernels (another summation order, not batch-invariant). Seen
/// here in 6 of 100 runs of two tests that loaded models at the same time.
static REGISTER: Mutex<()> = Mutex::new(());

/// Loads the library (first call) and returns the process-wide environment.
pub fn environment(configured: Option<&Path>) -> Result<&'static Environment, String> {
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    ENV.get_or_init(|| {
        let path = match explicit_path(configured) {
            Some(p) => p,
            None => installed_copies().into_iter().find(|p| p.is_file()).ok_or_else(|| {
                format!("the ONNX Runtime library ({LIB_NAME}) was not found; {}", how_to_get())
            })?,
        };
        if !path.is_file() {
            return Err(format!("the ONNX Runtime library {} does not exist; {}", path.display(), how_to_get()));
        }
        let builder = ort::init_from(&path)
            .map_err(|e| format!("cannot load the ONNX Runtime library {}: {e}; {}", path.display(), how_to_get()))?;
        let env = builder
            .with_name("inferd")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))?;
        // ORT's own INFO lines (arena growth on every new shape) would drown the server's log.
        env.set_log_level(ort::logging::LogLevel::Warning);
        tracing::info!(library = %path.display(), "ONNX Runtime loaded");
        Ok(env)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// How one worker's session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSpec {
    pub device: Device,
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
}

impl SessionSpec {
    /// The provider's name as logs and errors show it.
    pub fn provider_name(&self) -> String {
        match self.device {
            Device::Cpu => "cpu".into(),
            Device::Cuda(id) => format!("cuda:{id}"),
            Device::CoreMl => "coreml".into(),
        }
    }
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Why a session did not open.
#[derive(Debug)]
pub enum OpenError {
    /// Set-up that fails the same way for any graph: the session options, or an execution
    /// provider that cannot be registered (not compiled in, library without it, no device).
    Setup(String),
    /// The graph did not load on a registered provider.
    Graph(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Setup(e) | OpenError::Graph(e) => f.write_str(e),
        }
    }
}

/// Opens `graph` on the requested execution provider, or `edited` (the bytes of an edited copy of
/// that file; its external weights are still read from the file's directory). A provider that
/// cannot be registered (not compiled in, library without it, no device) is an error, never a
/// silent fall-back to the CPU.
///
/// `inferd_ops`: register inferd's own kernels ([`super::op_edit`]) for a graph that uses them.
pub fn open_session(env: &Environment, graph: &Path, edited: Option<&[u8]>, spec: &SessionSpec, inferd_ops: bool) -> Result<Session, OpenError> {
    let builder = Session::builder(env).map_err(|e| OpenError::Setup(format!("cannot create a session builder: {e}")))?;
    let builder = builder
        .with_intra_threads(spec.intra_op_threads.max(1))
        .map_err(err("intra_op_threads"))
        .and_then(|b| b.with_inter_threads(spec.inter_op_threads.max(1)).map_err(err("inter_op_threads")))
        .map_err(OpenError::Setup)?;
    let mut builder = match spec.device {
        Device::Cpu => builder,
        Device::Cuda(id) => cuda(builder, id).map_err(OpenError::Setup)?,
        Device::CoreMl => coreml(builder).map_err(OpenError::Setup)?,
    };
    let _registering = inferd_ops.then(|| REGISTER.lock().unwrap_or_else(|e| e.into_inner()));
    if inferd_ops {
        let domain = super::op_edit::domain().map_err(|e| OpenError::Setup(format!("cannot create inferd's operator domain: {e}")))?;
        builder = builder.with_operators(domain).map_err(|e| OpenError::Setup(format!("cannot register inferd's operators: {e}")))?;
    }
    let loaded = match edited {
        None => builder.commit_from_file(graph),
        Some(bytes) => {
            let dir = graph.parent().unwrap_or(Path::new("."));
            let mut builder = builder
                .with_config_entry("session.model_external_initializers_file_folder_path", dir.to_string_lossy())
                .map_err(err("external initializers folder"))
                .map_err(OpenError::Graph)?;
            builder.commit_from_memory(bytes)
        }
    };
    loaded.map_err(|e| OpenError::Graph(format!("cannot load {} on {}: {e}", graph.display(), spec.provider_name())))
}

#[cfg(feature = "cuda")]
fn cuda(b: ort::session::builder::SessionBuilder, id: usize) -> Result<ort::session::builder::SessionBuilder, String> {
    // TF32 off: ONNX Runtime turns it on by default, which moves fp32 logits by ~1e-2 (fp16
    // exports are the fast path on GPUs; an fp32 export is chosen for its accuracy).
    let ep = ort::ep::CUDA::default().with_device_id(id as i32).with_tf32(false).build().error_on_failure();
    b.with_execution_providers([ep]).map_err(err(
        "cannot register the CUDA execution provider (is the library onnxruntime-gpu 1.31, with CUDA 13 and cuDNN 9 on the loader path?)",
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: ort::session::builder::SessionBuilder, _: usize) -> Result<ort::session::builder::SessionBuilder, String> {
    Err("this build has no CUDA support; rebuild with `cargo build --release --features cuda`".into())
}

#[cfg(all(feature = "coreml", target_os = "macos"))]
fn coreml(b: ort::session::builder::SessionBuilder) -> Result<ort::session::builder::SessionBuilder, String> {
    let ep = ort::ep::CoreML::default().build().error_on_failure();
    b.with_execution_providers([ep]).map_err(err("cannot register the CoreML execution provider"))
}

#[cfg(not(all(feature = "coreml", target_os = "macos")))]
fn coreml(_: ort::session::builder::SessionBuilder) -> Result<ort::session::builder::SessionBuilder, String> {
    Err("this build has no CoreML support; CoreML needs macOS and `cargo build --release --features coreml`".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_path_comes_first_then_the_installed_copy() {
        let c = explicit_path(Some(Path::new("/opt/ort/libonnxruntime.so")));
        assert_eq!(c, Some(PathBuf::from("/opt/ort/libonnxruntime.so")));
        assert!(installed_copies().iter().any(|p| p.ends_with(Path::new("runtimes/onnxruntime").join(LIB_NAME))));
    }
}
