"""Devices, meshes and shardings: one global batch, jit over all devices.

Every array the train step sees is a global `jax.Array` on a `Mesh` with one
axis, 'data', spanning all devices of all processes. Batches are split along
'data'; parameters and optimizer state follow a sharding rule ('replicate'
today; a rule such as 'fsdp' is one more entry in `SHARDING_RULES`). The same
code runs on 1 device, 8 devices, or many hosts.
"""

from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'

# A rule maps (abstract leaf, mesh) to the leaf's sharding.
ShardingRule = Callable[[jax.ShapeDtypeStruct, Mesh], NamedSharding]


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays whose leading (batch) dimension is split across 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays held whole on every device."""
  return NamedSharding(mesh, P())


def _replicate(leaf: jax.ShapeDtypeStruct, mesh: Mesh) -> NamedSharding:
  del leaf
  return replicated_sharding(mesh)


SHARDING_RULES: dict[str, ShardingRule] = {'replicate': _replicate}


def state_shardings(abstract_tree: Any, mesh: Mesh,
                    rule: str = 'replicate') -> Any:
  """Shardings for a tree of arrays (params, optimizer state) under `rule`."""
  if rule not in SHARDING_RULES:
    raise ValueError(f'unknown sharding rule {rule!r}; known: '
                     f'{", ".join(SHARDING_RULES)}')
  shard = SHARDING_RULES[rule]
  return jax.tree.map(lambda leaf: shard(leaf, mesh), abstract_tree)


def check_divisible(global_batch_size: int, num_devices: int,
                    what: str = 'batch_size') -> None:
  """Raises a clear error unless the batch splits evenly over the devices."""
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f'{what}={global_batch_size} must be a positive multiple of the '
        f'device count ({num_devices} devices)')


def global_batch(local_batch: Mapping[str, np.ndarray],
                 mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's share of a batch into global sharded arrays.

  Each process passes its own rows (batch / process_count of them); the result
  has the global batch size and is split along 'data'.
  """
  sharding = batch_sharding(mesh)
  processes = jax.process_count()

  def assemble(local):
    local = np.asarray(local)
    global_shape = (local.shape[0] * processes,) + local.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local,
                                                  global_shape)

  return {name: assemble(value) for name, value in local_batch.items()}


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> bool:
  """Starts JAX's multi-controller runtime when `config.multihost` asks.

  Must run before anything touches the devices. `coordinator_address`,
  `num_processes` and `process_id` left unset are auto-detected by JAX where
  the cluster allows it (TPU pods, SLURM, ...). Returns whether it initialised.
  """
  multihost = config.get('multihost')
  if multihost is None or not multihost.initialize:
    return False
  kwargs = {
      key: multihost[key]
      for key in ('coordinator_address', 'num_processes', 'process_id')
      if multihost.get(key) is not None
  }
  jax.distributed.initialize(**kwargs)
  return True
