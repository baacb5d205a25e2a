"""The processes the relay is compared with, each its own process on a free loopback port.

- the mock upstream (bench/mockupstream.py, in the bench tools' virtual environment, uvloop);
- the bare pass-through proxy (bench/bareproxy.py, in the project's environment: the relay's
  own uvicorn, FastAPI and aiohttp versions);
- LiteLLM's proxy (`litellm --config`, pinned in .cache/bench/litellm by bench/requirements-litellm.txt)
  pointed at the mock as an `openai/` model: no database, no callbacks, no telemetry, the local
  model cost map (there is no internet), errors-only logging, one worker, a master key.

`Target` is what a load window needs to know about a path: URL, headers, the pid to account.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from quotra_dev.demo.marketplace import Process
from quotra_dev.twin import free_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = ROOT / ".cache" / "bench"
TOOLS_PYTHON = CACHE / "tools" / "bin" / "python"
LITELLM = CACHE / "litellm" / "bin" / "litellm"
MODEL = "bench-model"
UPSTREAM_KEY = "sk-bench-upstream"
LITELLM_MASTER_KEY = "sk-bench-litellm-0123456789abcdef"  # local only; LiteLLM refuses to start without one


@dataclass
class Target:
    """One benchmarked path: where to send requests and which process pays for them."""

    name: str
    url: str  # the chat completions URL
    pid: int
    headers: list[str] = field(default_factory=list)
    paid: str | None = None  # "x402" or "prepaid": its calls are charged and settled
    relay: object | None = None  # the quotra_setup.Relay serving it


def start_mock(workdir: Path, chunks: int, chunk_delay_ms: float) -> tuple[Process, str]:
    port = free_port()
    argv = [str(TOOLS_PYTHON), str(BENCH / "mockupstream.py"), "--port", str(port), "--model", MODEL]
    argv += ["--chunks", str(chunks), "--chunk-delay-ms", str(chunk_delay_ms)]
    process = Process("mock upstream", argv, {"PATH": "/usr/bin:/bin"}, workdir / "mock.log")
    base = f"http://127.0.0.1:{port}/v1"
    process.wait_ready(base + "/models")
    return process, base


def start_bare(workdir: Path, upstream: str) -> tuple[Process, str]:
    port = free_port()
    argv = [sys.executable, str(BENCH / "bareproxy.py"), "--port", str(port), "--upstream", upstream]
    argv += ["--api-key", UPSTREAM_KEY]
    process = Process("bare proxy", argv, {"PATH": "/usr/bin:/bin"}, workdir / "bare.log")
    url = f"http://127.0.0.1:{port}"
    process.wait_ready(url + "/healthz")
    return process, url + "/v1/chat/completions"


def litellm_config(upstream: str) -> str:
    return f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream}
      api_key: {UPSTREAM_KEY}
litellm_settings:
  telemetry: false
  drop_params: true
  set_verbose: false
  cache: false
  callbacks: []
  success_callback: []
  failure_callback: []
general_settings:
  master_key: {LITELLM_MASTER_KEY}
  disable_spend_logs: true
  disable_error_logs: true
"""


def start_litellm(workdir: Path, upstream: str) -> tuple[Process, str]:
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(upstream))
    env = {
        "PATH": f"{LITELLM.parent}:/usr/bin:/bin",
        "HOME": str(workdir),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from the internet
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    argv = [str(LITELLM), "--config", str(config), "--port", str(port), "--num_workers", "1"]
    process = Process("litellm", argv, env, workdir / "litellm.log")
    url = f"http://127.0.0.1:{port}"
    process.wait_ready(url + "/health/liveliness", timeout=180)
    return process, url + "/v1/chat/completions"


def litellm_version() -> str:
    site = next((LITELLM.parent.parent / "lib").glob("python*/site-packages"), None)
    if site is None:
        return "?"
    found = sorted(site.glob("litellm-*.dist-info"))
    return found[0].name.removeprefix("litellm-").removesuffix(".dist-info") if found else "?"
