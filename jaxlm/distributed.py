"""Starting JAX's multi-controller runtime: one jaxlm process per host, all running the
same program; `jax.distributed` connects them. No process orchestration of our own.

config.distributed says how: explicit coordinator/process fields (launch/local.py), or
auto_detect, which lets jax read the cluster's environment (SLURM, Cloud TPU, GKE, MPI;
launch/slurm.sh and launch/tpu_pod.sh), or neither: a single process.
"""

from __future__ import annotations

import logging

import jax

from jaxlm.errors import ConfigError

log = logging.getLogger("jaxlm")


def initialize(cfg_dist) -> None:
    """Call once, before anything asks JAX for devices."""
    if cfg_dist.cpu_devices > 0:
        jax.config.update("jax_num_cpu_devices", cfg_dist.cpu_devices)
    if cfg_dist.coordinator_address:
        n, pid = cfg_dist.num_processes, cfg_dist.process_id
        if n < 1 or not 0 <= pid < n:
            raise ConfigError(
                f"config.distributed: coordinator_address is set, so num_processes (got {n}) "
                f"must be >= 1 and process_id (got {pid}) in [0, num_processes)")
        if jax.config.jax_platforms in (None, "", "cpu") and cfg_dist.cpu_devices > 0:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cfg_dist.coordinator_address, n, pid)
        if jax.process_count() != n:
            raise ConfigError(f"config.distributed.num_processes={n}, but the coordinator "
                              f"reports {jax.process_count()} processes")
    elif cfg_dist.auto_detect:
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d; %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
