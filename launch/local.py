#!/usr/bin/env python3
"""Runs one jaxlm command as N processes on this machine, joined by jax.distributed.

What a multi-host pod does, on one host: each process gets its own devices (here
--cpu-devices fake CPU devices each), the same program, and a process id. Tests use it
to check that 2 processes x 4 devices train exactly like 1 process x 8 devices.

    python launch/local.py --processes=2 --cpu-devices=4 -- \
        -m jaxlm.train --config=configs/gpt/debug.py --workdir=runs/mp
    python launch/local.py --processes=2 --dry-run -- -m jaxlm.train ...   # print commands

Output lines are prefixed with the process id. The exit code is the first non-zero exit
code of any process (the others are then stopped), else 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def commands(processes: int, cpu_devices: int, port: int, argv: list[str]) -> list[list[str]]:
    flags = [f"--config.distributed.coordinator_address=localhost:{port}",
             f"--config.distributed.num_processes={processes}"]
    if cpu_devices:
        flags.append(f"--config.distributed.cpu_devices={cpu_devices}")
    return [[sys.executable, *argv, *flags, f"--config.distributed.process_id={i}"]
            for i in range(processes)]


def child_env(cpu_devices: int) -> dict:
    env = dict(os.environ)
    if cpu_devices:  # the device count comes from the config, not an inherited XLA flag
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                    if "xla_force_host_platform_device_count" not in f)
        env["JAX_PLATFORMS"] = "cpu"
    return env


def run(cmds: list[list[str]], env: dict) -> int:
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]

    def pump(i, p):
        for line in p.stdout:
            sys.stdout.write(f"[p{i}] {line}")
            sys.stdout.flush()

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    code = 0
    pending = list(procs)
    while pending:
        for p in list(pending):
            try:
                rc = p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            pending.remove(p)
            if rc and not code:
                code = rc
                for other in pending:  # one failed: the others would wait for it forever
                    other.terminate()
    for t in threads:
        t.join()
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="fake CPU devices per process (0: use the machine's accelerators)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: the python arguments, e.g. -m jaxlm.train --config=...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- -m jaxlm.train --config=... --workdir=...")
    if args.processes < 1:
        parser.error(f"--processes={args.processes} must be >= 1")
    cmds = commands(args.processes, args.cpu_devices, args.port or free_port(), command)
    if args.dry_run:
        for c in cmds:
            print(shlex.join(c))
        return 0
    return run(cmds, child_env(args.cpu_devices))


if __name__ == "__main__":
    sys.exit(main())
