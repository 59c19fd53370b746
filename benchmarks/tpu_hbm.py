"""The HBM that XLA lets one program use on each TPU kind, beside jaxlm.plan's figure for it.

Compiles, ahead of time for one chip of each topology (libtpu's topology description, no TPU
attached), a program whose argument is larger than any chip, and reads the limit from XLA's
compile-time out-of-memory error ("... exceeds available HBM (15.75G)", in GiB). jaxlm.plan's
HBM_BYTES should match it for the TPU kinds it lists; run this after a libtpu upgrade.

    TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_HOSTNAMES=localhost \
        python benchmarks/tpu_hbm.py --topologies=v4:2x2x1,v5e:2x2,v5p:2x2x1,v6e:2x2
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import plan
from jaxlm.errors import ConfigError


def available_hbm(topology: str) -> tuple[str, float | None, str]:
    """(device kind, XLA's available HBM in bytes or None, the error's first line)."""
    device = plan.topology_devices("tpu:" + topology)[0]
    whole = NamedSharding(Mesh([device], ("chip",)), PartitionSpec())
    too_big = jax.ShapeDtypeStruct((256 * 2**30 // 4,), jnp.float32, sharding=whole)
    try:
        jax.jit(lambda x: x * 2 + 1, out_shardings=whole).lower(too_big).compile()
    except Exception as e:  # noqa: BLE001 -- the error is the measurement
        found = re.search(r"available HBM \(([\d.]+)G\)", str(e))
        return device.device_kind, found and float(found.group(1)) * 2**30, str(e).split("\n")[0]
    return device.device_kind, None, "compiled: no limit below 256 GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topologies", default="v4:2x2x1,v5e:2x2,v5p:2x2x1,v6e:2x2")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"jax {jax.__version__}")
    for topology in args.topologies.split(","):
        try:
            kind, hbm, line = available_hbm(topology)
        except ConfigError as e:
            parser.error(f"--topologies: {e}")
        ours = plan.device_memory(kind)
        shown = f"{hbm / 2**30:.2f} GiB ({hbm:.4g} bytes)" if hbm else line[:100]
        planned = f"{ours / 2**30:.2f} GiB" if ours else "none"
        print(f"{topology:10} {kind:14} XLA: {shown:32} jaxlm.plan: {planned}")


if __name__ == "__main__":
    main()
