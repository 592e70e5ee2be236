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
