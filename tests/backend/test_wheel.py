"""The relay as a wheel, outside the checkout: built from the project, its `quotra` package alone
(without `quotra_dev`, ape's `.build/` or the contracts) runs `quotra serve` against a chain
configuration, loading the contract ABIs it ships."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from relay_helpers import MASTER_KEY

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_wheel_serves_outside_the_checkout_without_dev_tooling(tmp_path: Any) -> None:
    # Built from a copy of what the wheel is made of, so that the build leaves the checkout clean.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "backend", source / "backend", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            # Built as `pip install` builds it: in an isolated environment with the build-system's
            # setuptools (the venv's own is older than what the SPDX license field needs).
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("quotra-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "quotra/chain/abi/QuotraEscrow.json" in names and "quotra/chain/abi/FiatToken.json" in names
        assert "quotra/store/migrations/versions/0005_call_core.py" in names
        archive.extractall(site, [n for n in names if n.startswith("quotra/")])  # not quotra_dev
    assert not (site / "quotra_dev").exists()

    port = free_port()
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTRA_")}
    env.update(
        {
            # The wheel's package first, ahead of the checkout's editable install.
            "PYTHONPATH": str(site),
            "QUOTRA_ENV": "test",
            "QUOTRA_DATA_DIR": str(workdir / "data"),
            "QUOTRA_MASTER_KEY": MASTER_KEY,
            "QUOTRA_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "QUOTRA_LOG_JSON": "false",
            # A chain nobody answers: the ABIs are loaded all the same, and the relay serves.
            "QUOTRA_CHAIN_RPC_URL": "http://127.0.0.1:9",
            "QUOTRA_ESCROW_ADDRESS": "0x" + "e5" * 20,
        }
    )
    script = (
        "import sys, quotra; assert quotra.__file__.startswith(sys.argv[1]), quotra.__file__; "
        "from quotra.cli import main; sys.argv = ['quotra', 'serve', '--port', sys.argv[2]]; main()"
    )
    relay = subprocess.Popen(
        [sys.executable, "-c", script, str(site), str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert relay.poll() is None, relay.stdout.read() if relay.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the wheel's relay did not start"
            time.sleep(0.1)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert models.status_code == 200
        loaded = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; import quotra.app; "
                "print(sorted(m for m in sys.modules if m.startswith('quotra_dev')))",
            ],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert loaded.stdout.strip() == "[]"
    finally:
        relay.terminate()
        relay.wait(10)
