"""Process plumbing of :mod:`ldke_peft.distributed`: shards, the accelerate state, launching processes,
gathering results and reporting a failed process to all. Knows nothing of edits or metrics.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

_LAUNCH_ENV = ("LOCAL_RANK", "WORLD_SIZE", "RANK")


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Indices of the items process ``rank`` of ``world`` handles: ``range(rank, n, world)``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad process rank {rank} of {world}")
    return list(range(rank, n, world))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _inside_launch() -> bool:
    """True when a launcher (torchrun / accelerate) started this process."""
    return any(k in os.environ for k in _LAUNCH_ENV) or "ACCELERATE_DYNAMO_BACKEND" in os.environ


def _state(cpu: bool) -> Any:
    import torch
    from accelerate import PartialState

    use_cpu = cpu or _env_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=use_cpu)
    if state.num_processes == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        logger.warning(
            "running as ONE process: `accelerate launch --cpu --num_processes N` starts a single process unless "
            "mpirun is configured. For N CPU processes use `accelerate launch --multi_gpu --num_processes N` with "
            "ACCELERATE_USE_CPU=1, or pass --num-processes N to this command."
        )
    return state


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(command: str, argv: Sequence[str], num_processes: int, *, cpu: bool = False, port: int | None = None) -> int:
    """Run ``python -m ldke_peft.distributed <command> <argv>`` in ``num_processes`` processes via
    ``accelerate launch`` (torchrun-based launcher; CPU processes use gloo). Returns the exit status."""
    import torch

    n = int(num_processes)
    if n < 1:
        raise ValueError(f"--num-processes must be >= 1, got {n}")
    use_cpu = cpu or not torch.cuda.is_available()
    if not use_cpu and n > torch.cuda.device_count():
        raise ValueError(
            f"--num-processes {n} but only {torch.cuda.device_count()} CUDA device(s); pass --cpu to run CPU processes"
        )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port or _free_port())]
    if n > 1:
        cmd.append("--multi_gpu")  # torchrun-style: N processes (each picks gloo on CPU, nccl on GPU)
    cmd += ["-m", "ldke_peft.distributed", command, *argv]
    env = dict(os.environ)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    env.setdefault("OMP_NUM_THREADS", "1")
    logger.info("launching: %s", " ".join(cmd))
    return subprocess.run(cmd, env=env, check=False).returncode


def _strip_option(argv: Sequence[str], option: str, takes_value: bool = True) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == option:
            skip = takes_value
            continue
        if a.startswith(option + "="):
            continue
        out.append(a)
    return out


def _collect(state: Any, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """All processes' payloads (every process gets the list); raises if any process reported an error."""
    from accelerate.utils import gather_object

    payloads = gather_object([payload]) if state.num_processes > 1 else [payload]
    errors = [f"process {p['rank']}: {p['error']}" for p in payloads if p.get("error")]
    if errors:
        raise RuntimeError("distributed run failed: " + "; ".join(errors))
    return payloads


def _shutdown(state: Any) -> None:
    """Tear the process group down before exit: gloo's threads abort the interpreter ("terminate called
    without an active exception") when a process exits with the group still alive."""
    if state.num_processes > 1:
        try:
            state.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - teardown only
            logger.debug("destroy_process_group: %s", exc)


def _run_guarded(rank: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return {"rank": rank, **fn()}
    except Exception as exc:  # noqa: BLE001 - reported to every process through the collective
        logger.exception("process %d failed", rank)
        return {"rank": rank, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pos_model", nargs="?", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--model", help="model folder, or 'toy' / 'toy:SEED' for the toy world")
    p.add_argument("--processor", help="processor folder (default: the model folder)")
    p.add_argument("--device", default="auto", help="auto (this process's accelerate device), cpu, cuda:0, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--image-root", help="folder relative image paths are resolved against")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "easyedit"])
    p.add_argument("--limit", type=int, help="use only the first N requests")
    p.add_argument("--num-processes", type=int, default=None,
                   help="launch this many processes with accelerate (omit when already under a launcher)")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo), even when CUDA is available")


def _resolve_positional(args: argparse.Namespace, names: Sequence[str], ap: argparse.ArgumentParser) -> None:
    """Accept both ``--model M --requests R`` and the ``ldke``-style positional ``M [PACK] R``."""
    pos = [getattr(args, "pos_" + n) for n in names if getattr(args, "pos_" + n, None) is not None]
    targets = [n for n in names if getattr(args, n, None) is None]
    for n, v in zip(targets, pos):
        setattr(args, n, v)
    missing = [n for n in names if getattr(args, n, None) is None and n != "pack"]
    if missing:
        ap.error("missing " + ", ".join("--" + m for m in missing))


def _device(args: argparse.Namespace, state: Any) -> str:
    if args.device != "auto":
        return args.device
    # accelerate names the CPU device "cpu:0" in multi-process runs; tensors report plain "cpu"
    return "cpu" if state.device.type == "cpu" else str(state.device)


def _launched_itself(command: str, argv: Sequence[str] | None, args: argparse.Namespace) -> bool:
    """With ``--num-processes`` outside a launcher: run ``command`` in that many processes and return True
    once they all succeeded (raise otherwise); inside a launcher (or without the option): False."""
    if args.num_processes is None or _inside_launch():
        return False
    rc = launch(command, _strip_option(list(argv or []), "--num-processes"), args.num_processes, cpu=args.cpu)
    if rc != 0:
        raise RuntimeError(f"distributed {command} failed (exit status {rc}); see the processes' output above")
    return True
