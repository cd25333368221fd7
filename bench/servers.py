"""Start, probe and stop OpenAI-compatible servers (llama-server, inferd) for bench scripts.

Why: the benchmark and the llama.cpp reference recorder both need to launch a server on its own
port, wait until it is ready, and always kill it afterwards, even on error or Ctrl-C.
Only the standard library is used, so these scripts run without a venv.
"""
import json
import os
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request


class ServerError(RuntimeError):
    """A server failed to start or answered with an error."""


def http_json(url, body=None, timeout=60.0):
    """POSTs (or GETs when body is None) JSON and returns the decoded reply."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode())
    except urllib.error.HTTPError as e:
        raise ServerError(f"{url}: HTTP {e.code}: {e.read()[:500]!r}") from e


class Server:
    """A child server process in its own process group, killed on close()."""

    def __init__(self, name, argv, port, log_path, ready_path="/health", env=None):
        self.name, self.argv, self.port = name, list(argv), port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path, self.ready_path = log_path, ready_path
        self.env = env
        self.proc = None

    def start(self, timeout=300.0):
        """Launches the process and waits until ready_path answers 200."""
        log = open(self.log_path, "wb")
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}; "
                                  f"see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.close()
        raise ServerError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}")

    def close(self):
        """Kills the process group (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def llama_server_argv(binary, gguf, port, threads, parallel, ctx_per_slot, extra=()):
    """llama-server flags used by every script here (documented in bench/README.md)."""
    return [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
            "--cont-batching", "--jinja", "--no-webui", *extra]


def inferd_argv(spec, gguf, port, threads, extra=""):
    """inferd command line: spec is a binary path or a command prefix ("cargo run -r --")."""
    return [*shlex.split(spec), "serve", "--model", gguf, "--port", str(port),
            "--threads", str(threads), *shlex.split(extra)]
