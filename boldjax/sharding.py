"""Device mesh, logical-axis rules and the shardings of train state and batches.

Models name their axes logically ('batch', 'embed', 'mlp', ...); the rules here map
those names onto the mesh axes ('data', 'fsdp', 'tensor'). Changing the parallelism
strategy is a config change, never a model change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch is split over every data-like axis; parameters over
# 'fsdp' (FSDP: params and optimizer state sharded) and 'tensor' (tensor parallelism).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("patch", None),
  ("subjects", None),
  ("channels", None),
)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh from (name, size) pairs; one size may be -1 (fill with the remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(name for name, _ in axes)
  if set(names) != set(MESH_AXES):
    raise ValueError(f"config.mesh must name the axes {MESH_AXES}; found {names}")
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, found {tuple(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f"config.mesh {tuple(axes)}: {len(devices)} devices are not a multiple of the "
        f"fixed axes' product {known}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"config.mesh {tuple(axes)} needs {math.prod(sizes)} devices; found {len(devices)}"
    )
  device_grid = np.asarray(devices).reshape(sizes)
  return Mesh(device_grid, names, axis_types=(AxisType.Auto,) * len(names))


def logical_rules(overrides: Sequence[tuple[str, object]] = ()) -> tuple:
  """DEFAULT_RULES with config overrides (same logical name replaces the default)."""
  table = dict(DEFAULT_RULES)
  for name, target in overrides:
    table[name] = tuple(target) if isinstance(target, list) else target
  return tuple(table.items())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel mesh axes."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def tree_shardings(boxed_abstract, mesh: Mesh, rules) -> object:
  """NamedShardings for a pytree whose leaves may carry flax logical-axis boxes.

  A mesh axis is used once per array: when two logical axes of one array map to the same
  mesh axis (e.g. an ('embed', 'embed') projection under FSDP), the later one stays whole.
  """
  specs = nn.get_partition_spec(boxed_abstract)
  table = dict(rules)

  def to_mesh(spec: PartitionSpec) -> NamedSharding:
    used: set[str] = set()
    out = []
    for name in spec:
      target = table.get(name) if isinstance(name, str) else name
      axes = (target,) if isinstance(target, str) else tuple(target or ())
      axes = tuple(a for a in axes if a not in used and a in mesh.axis_names)
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(*out))

  return jax.tree.map(to_mesh, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch -> global jax arrays (works across processes)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def bytes_per_device(tree) -> dict[int, int]:
  """Bytes each device holds for a pytree of jax arrays (from addressable shards)."""
  out: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out
