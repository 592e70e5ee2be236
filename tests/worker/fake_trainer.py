"""A stand-in for `python -m trainer_core.train` that follows its process contract (docs/API.md) in
milliseconds: JSON metric lines on stdout, resume from a checkpoint file, SIGTERM saves and exits 0,
exit 2 for bad data, 3 for OOM. It also starts a child process, so tests can check that a whole
process group dies. `--name` picks a behaviour: ok, data-error, oom, crash, stubborn (ignores SIGTERM), long-line."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--output_dir", required=True)
parser.add_argument("--max_steps", type=int, default=5)
parser.add_argument("--name", default="ok")
parser.add_argument("--save_interval", type=int, default=1)
args, _unknown = parser.parse_known_args()

step_s = float(os.environ.get("FAKE_STEP_S", "0.05"))
os.makedirs(args.output_dir, exist_ok=True)
ckpt = os.path.join(args.output_dir, "checkpoint.json")
rank = int(os.environ.get("RANK", "0"))
stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, signal.SIG_IGN if args.name == "stubborn" else on_term)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.path.join(args.output_dir, f"pids-{os.getpid()}.json"), "w") as f:
    json.dump({"pid": os.getpid(), "child": child.pid, "pgid": os.getpgid(0),
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": sys.argv[1:]}, f)

if args.name == "data-error":
    print(f"{args.output_dir}/data.jsonl:3: 'branches' must be a list of strings", file=sys.stderr, flush=True)
    sys.exit(2)
if args.name == "oom":
    print("paratrain: out of memory on rank 0", file=sys.stderr, flush=True)
    sys.exit(3)

def save(step):
    with open(ckpt + ".tmp", "w") as f:
        json.dump({"step": step}, f)
    os.replace(ckpt + ".tmp", ckpt)


start = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
done = start  # last finished step
if rank == 0:
    print(json.dumps({"event": "start", "total_steps": args.max_steps, "resumed_from_step": start}), flush=True)
for step in range(start + 1, args.max_steps + 1):
    if stop:
        break
    time.sleep(step_s)
    if args.name == "crash" and step == 2:
        raise RuntimeError("boom")
    if args.name == "long-line" and step == 2:   # e.g. a printed tensor
        print("long line: " + "x" * 20_000, file=sys.stderr, flush=True)
        time.sleep(1.0)   # its report goes alone (and is refused alone), even from a slow worker
    if rank == 0:
        print(json.dumps({"step": step, "epoch": 0.0, "loss": 1.0 / step, "lr": 1e-4, "grad_norm": 1.0,
                          "tokens_per_s": 100.0, "gpu_mem_gb": 0.0, "eta_s": 0.0, "total_steps": args.max_steps}),
              flush=True)
        print(f"step {step}/{args.max_steps}", file=sys.stderr, flush=True)
        if step % args.save_interval == 0:
            save(step)
    done = step
if stop and rank == 0:  # like the real trainer: SIGTERM saves a checkpoint, then exits 0
    save(done)
while args.name == "stubborn":
    time.sleep(1)
child.kill()
if rank == 0 and not stop:
    with open(os.path.join(args.output_dir, "final.txt"), "w") as f:
        f.write("done\n")
    print(json.dumps({"event": "done", "final_path": "final.txt"}), flush=True)
    time.sleep(float(os.environ.get("FAKE_DONE_LINGER_S", "0")))  # the real trainer's last barrier and cleanup
sys.exit(0)
