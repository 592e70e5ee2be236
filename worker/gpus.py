"""Which GPUs this machine has (NVML); none means CPU mode."""

from __future__ import annotations

import logging

log = logging.getLogger("paratrain.worker")


def detect_gpus(spec: str = "auto") -> list[dict]:
    """[{index, name, memory_gb}] for 'auto' (NVML), [] for 'none', the listed indices for '0,2'."""
    spec = spec.strip().lower()
    if spec in ("none", "cpu", ""):
        return []
    found = _nvml_gpus()
    if spec == "auto":
        return found
    wanted = [int(part) for part in spec.split(",") if part.strip()]
    by_index = {g["index"]: g for g in found}
    if found and set(wanted) - set(by_index):
        raise ValueError(f"--gpus {spec}: this machine has GPU(s) {sorted(by_index)} only")
    if not found:
        # Taken on trust (a driver NVML cannot reach); on a machine with no GPU at all, the jobs given these
        # "GPUs" would train on the CPU, so say so where the operator looks.
        log.warning("no GPU found through NVML: --gpus %s is taken on trust; jobs asking for GPUs run here "
                    "and train on the CPU if this machine has none (use --gpus none for a CPU worker)", spec)
    return [by_index.get(i, {"index": i, "name": "GPU", "memory_gb": 0.0}) for i in wanted]


def _nvml_gpus() -> list[dict]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no driver: a CPU machine
        log.info("no NVIDIA driver (%s): CPU mode", e)
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory_gb": round(memory / 2**30, 1)})
        return gpus
    finally:
        pynvml.nvmlShutdown()
