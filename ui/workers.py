"""What the workers the server reports (GET /api/workers) mean for a job: which GPUs there are, whether a
job of some shape can start now. The form's `gpus` default, the memory panel's GPU size and the submit
message read them; the server's scheduler alone decides what runs."""

from __future__ import annotations

from typing import Any

from ui.api import ApiClient, ApiError

Worker = dict[str, Any]  # WorkerPublic of docs/API.md: id, name, gpus: [{index, name, memory_gb}], online, ...


def known_workers(client: ApiClient) -> list[Worker] | None:
    """The registered workers, or None when the server could not say (the callers then assume nothing)."""
    try:
        return client.workers()
    except ApiError:
        return None


def gpu_count(worker: Worker) -> int:
    return len(worker.get("gpus") or [])


def largest_gpu_gb(workers: list[Worker]) -> float | None:
    """Largest GPU the workers report (GB), or None without GPU workers."""
    sizes = [float(g.get("memory_gb") or 0) for w in workers for g in (w.get("gpus") or [])]
    sizes = [s for s in sizes if s > 0]
    return max(sizes) if sizes else None


def cpu_only(workers: list[Worker]) -> bool:
    """Workers are registered and none has a GPU (the default `paratrain serve` on a machine without one):
    a job asking for a GPU would wait forever."""
    return bool(workers) and not any(gpu_count(w) for w in workers)


def gpu_worker_online(workers: list[Worker]) -> bool:
    return any(w.get("online") and gpu_count(w) for w in workers)


def capacity_warning(workers: list[Worker], gpus: int, nodes: int = 1) -> str | None:
    """Why a job of `gpus` GPUs per node on `nodes` workers cannot start on the online workers, or None when
    enough of them have that many GPUs (busy or not: that is only a wait). A stopping worker takes no new
    job, so it does not count (the rule of the server's "queued: it needs ..." log line)."""
    online = [w for w in workers if w.get("online") and not w.get("stopping")]
    able = [w for w in online if gpu_count(w) >= gpus]
    if len(able) >= nodes:
        return None
    if not online:
        return "No worker is online: the job waits until one joins."
    if not able:
        most = max(gpu_count(w) for w in online)
        return (f"No online worker has {gpus} GPU{'s' if gpus != 1 else ''} (the most is {most}): the job waits "
                "until a worker with that many joins.")
    if gpus:
        return (f"The job spans {nodes} workers with {gpus} GPU{'s' if gpus != 1 else ''} each; {len(able)} online "
                f"worker{'s have' if len(able) != 1 else ' has'} that many: it waits until more join.")
    return f"The job spans {nodes} workers; {len(online)} {'are' if len(online) != 1 else 'is'} online: it waits " \
           "until more join."
