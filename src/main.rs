//! The `inferd` binary: parse the command line, set up logging, run the subcommand.
use std::process::ExitCode;

use clap::Parser;
use inferd::config::{self, Cli, Command};

fn main() -> ExitCode {
    // ONNX Runtime's own warnings are mostly noise at load time (one line per LoRA input of a
    // `--lora-inputs` graph, "shape ops assigned to CPU" on CUDA): errors only unless RUST_LOG
    // asks for more (e.g. RUST_LOG=info,ort=warn).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,tower_http=warn,ort=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let cfg = match config::load(&args) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("inferd: {e}");
                    return ExitCode::from(2);
                }
            };
            inferd::memory::spawn_trimmer(inferd::memory::TRIM_INTERVAL);
            let http_threads = cfg.server.http_threads.unwrap_or_else(config::default_http_threads);
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(http_threads).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("inferd: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(inferd::serve::run(cfg)) {
                Ok(()) => exit_now(0),
                Err(e) => {
                    eprintln!("inferd: {e}");
                    exit_now(1)
                }
            }
        }
        Command::ConvertAdapter(args) => match inferd::lora::convert_adapter(&args.input, &args.output, args.adapter_version) {
            Ok(n) => {
                eprintln!("inferd: wrote {} ({n} parameters)", args.output.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("inferd: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Ends the serving process with `code`: after a graceful shutdown every stream is drained and
/// answered, and after a failed start nothing is left to do, so only the runtimes' teardown
/// remains. `_exit` skips the C++ static destructors and `atexit` handlers of the GPU
/// libraries, which may run after the CUDA driver has shut down: ONNX Runtime's CUDA allocator
/// then frees pinned memory, fails ("driver shutting down") and aborts, so a clean SIGTERM ended
/// with status 134 on an H200 (2026-12-03, the CUDA image's binary).
fn exit_now(code: i32) -> ExitCode {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process at once; no state of this process is used after it.
    unsafe { libc::_exit(code) }
}
