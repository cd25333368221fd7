"""Fixtures of the OpenAI SDK tests: the real `inferd` binary started on a free port.

INFERD_BIN names the binary (scripts/test.sh sets target/checked/inferd; default target/release/inferd); the
tests skip with a message when it or a model file is missing. INFERD_TEST_DEVICE (e.g. `cuda:0`) runs
every candle server on that device, INFERD_TEST_ONNX_DEVICE every onnx server (the same switch as the
Rust tests'); unset, both run on the CPU, as in CI.
"""
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests/fixtures/generated/tiny-llama.f32.gguf"
# The tiny Qwen2 model exported to ONNX (committed; scripts/make_tiny_onnx.py regenerates it).
TINY_ONNX = ROOT / "tests/fixtures/onnx/tiny-qwen2"
ORT_LIB = ROOT / "runtimes/onnxruntime/libonnxruntime.so"
SMOLLM2 = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_CODER = ROOT / "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
START_TIMEOUT_S = 60


def inferd_bin() -> Path:
    return Path(os.environ.get("INFERD_BIN") or ROOT / "target/release/inferd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `inferd serve`; `stop()` kills it. stderr goes to a file for diagnostics."""

    def __init__(self, model: Path, model_id: str, extra=(), config_text: str = "[server]\n"):
        self.dir = tempfile.TemporaryDirectory(prefix="inferd-e2e-")
        config = Path(self.dir.name) / "config.toml"
        config.write_text(config_text)
        self.stderr_path = Path(self.dir.name) / "stderr.log"
        self.model_id = model_id
        last = ""
        onnx = "onnx" in extra
        device = os.environ.get("INFERD_TEST_ONNX_DEVICE" if onnx else "INFERD_TEST_DEVICE")
        if device:
            extra = (*extra, "--device", device)
        for _ in range(3):  # the free port may be taken between probing and binding
            self.port = free_port()
            self.stderr = open(self.stderr_path, "wb")
            cmd = [str(inferd_bin()), "serve", "--config", str(config), "--host", "127.0.0.1",
                   "--port", str(self.port), "--model", str(model), "--model-id", model_id, *extra]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self.stderr)
            ok, last = self._wait_healthy()
            if ok:
                return
            self.stop()
        raise RuntimeError(f"inferd did not start: {last}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_healthy(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, f"exited with {self.proc.returncode}:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return True, ""
            except OSError:
                pass
            time.sleep(0.1)
        return False, f"no /health answer within {START_TIMEOUT_S} s:\n{self.log()}"

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("timeout", 120.0)
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, api_key="unused", **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.stderr.close()


def _require(path: Path, what: str):
    if not inferd_bin().is_file():
        pytest.skip(f"inferd binary not found at {inferd_bin()}: build it (cargo build --release) or set INFERD_BIN")
    if not path.is_file():
        pytest.skip(f"{what} missing at {path}")


@pytest.fixture(scope="session", params=["candle", "onnx"])
def tiny(request):
    """Every SDK test runs on both backends: a tiny Llama GGUF on candle, a tiny Qwen2 on onnx."""
    if request.param == "candle":
        _require(TINY, "tiny model (run scripts/make_tiny_model.py tests/fixtures/generated)")
        s = Server(TINY, "tiny")
    else:
        _require(TINY_ONNX / "model.onnx", "tiny ONNX model")
        _require(ORT_LIB, "ONNX Runtime library (run scripts/fetch_onnxruntime.sh)")
        s = Server(TINY_ONNX, "tiny", extra=("--backend", "onnx"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def smollm2():
    _require(SMOLLM2, "SmolLM2 GGUF (run scripts/fetch_models.sh)")
    s = Server(SMOLLM2, "smollm2")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(tiny):
    return tiny.client()


@pytest.fixture(scope="session")
def qwen_coder():
    _require(QWEN_CODER, "Qwen2.5-Coder GGUF (run scripts/fetch_models.sh qwen-coder)")
    s = Server(QWEN_CODER, "qwen-coder")
    yield s
    s.stop()
