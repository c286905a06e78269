"""TPU slice names (as Cloud TPU sells them: v5p-64, v5e-16, ...) -> the devices of that topology on a CPU host.

`get_topology_desc` needs libtpu (`pip install jax[tpu]`) but no TPU: it describes the slice so that `jax.jit(...)
.lower(...).compile()` targets it ahead of time. The arguments per name follow MaxText's accelerator_to_spec_map.
The number in a v4/v5p name counts TensorCores (2 per chip, "megacore"); in v5e/v6e names it counts chips.
"""
from __future__ import annotations

import dataclasses
import os

from grit_jax.errors import GritJaxError
from grit_jax.flops import TPU_PEAK_BF16_FLOPS

# libtpu asks the GCE metadata server for the slice it runs on and warns without these; on a CPU host that compiles
# for a described topology none of them matter, so set harmless values (only if the user set none). Several
# processes compiling at once (pytest-xdist, two `grit-jax aot` runs) need ALLOW_MULTIPLE_LIBTPU_LOAD.
_LIBTPU_ENV = dict(TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE="v5litepod-4", TPU_WORKER_HOSTNAMES="localhost",
                   TPU_WORKER_ID="0", ALLOW_MULTIPLE_LIBTPU_LOAD="true")


def quiet_libtpu_env() -> None:
  """Call before jax initialises libtpu (first get_topology_desc)."""
  for k, v in _LIBTPU_ENV.items():
    os.environ.setdefault(k, v)


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip peak numbers (Cloud TPU system-architecture pages)."""
  name: str
  peak_bf16_flops: float   # FLOP/s, dense bf16
  hbm_bytes: int
  hbm_bytes_per_s: float
  ici_bytes_per_s: float   # per chip, all links, one direction


GiB = 1024**3
CHIPS = {
    "v4": Chip("v4", TPU_PEAK_BF16_FLOPS["v4"], 32 * GiB, 1228e9, 300e9),
    "v5e": Chip("v5e", TPU_PEAK_BF16_FLOPS["v5e"], 16 * GiB, 819e9, 200e9),
    "v5p": Chip("v5p", TPU_PEAK_BF16_FLOPS["v5p"], 95 * GiB, 2765e9, 600e9),
    "v6e": Chip("v6e", TPU_PEAK_BF16_FLOPS["v6e"], 32 * GiB, 1640e9, 448e9),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                  # v5p-64
  chip: Chip
  topology_name: str         # v5:2x4x4
  chip_config_name: str      # megacore | default
  chips_per_host_bounds: tuple[int, int, int]
  num_chips: int
  wrap: tuple[bool, bool, bool]

  def devices(self, num_slices: int = 1) -> list:
    """The jax devices of this slice (TpuDevice objects usable in a Mesh for lowering and compiling)."""
    quiet_libtpu_env()
    from jax.experimental import topologies

    try:
      desc = topologies.get_topology_desc(
          platform="tpu", topology_name=self.topology_name, chip_config_name=self.chip_config_name,
          chips_per_host_bounds=self.chips_per_host_bounds, num_slices=num_slices, wrap=self.wrap)
    except Exception as e:  # no libtpu, or a libtpu that does not know this chip
      raise GritJaxError(f"--topology {self.name}: cannot describe the TPU topology ({e}); "
                         "ahead-of-time compilation needs libtpu: pip install 'jax[tpu]==<your jax version>'") from e
    return list(desc.devices)


_NO_WRAP, _TORUS3, _TORUS2 = (False, False, False), (True, True, True), (True, True, False)


def _table() -> dict[str, Topology]:
  t = {}
  # v5p / v4: 3D slices; 4 chips per host; a full 4-cube (64 chips) and up wraps around in all dims.
  for gen, chip_gen, cubes in (("v5p", "v5", ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8),
                                               (4, 8, 8), (8, 8, 8))),
                               ("v4", "v4", ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8),
                                             (4, 8, 8)))):
    for x, y, z in cubes:
      chips = x * y * z
      wrap = _TORUS3 if chips >= 64 else _NO_WRAP
      t[f"{gen}-{2 * chips}"] = Topology(f"{gen}-{2 * chips}", CHIPS[gen], f"{chip_gen}:{x}x{y}x{z}", "megacore",
                                        (2, 2, 1), chips, wrap)
  # v5e / v6e: 2D slices, names count chips; 16x16 wraps both dims, 8x16 the long one.
  for gen in ("v5e", "v6e"):
    for x, y in ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)):
      chips = x * y
      wrap = {256: _TORUS2, 128: (False, True, False)}.get(chips, _NO_WRAP)
      bounds = (1, 1, 1) if chips == 1 else (2, 2, 1)
      t[f"{gen}-{chips}"] = Topology(f"{gen}-{chips}", CHIPS[gen], f"{gen}:{x}x{y}", "default", bounds, chips, wrap)
  return t


TOPOLOGIES = _table()


def get_topology(name: str) -> Topology:
  if name not in TOPOLOGIES:
    known = ", ".join(sorted(TOPOLOGIES, key=lambda n: (n.split("-")[0], int(n.split("-")[1]))))
    raise GritJaxError(f"--topology {name!r}: unknown TPU slice; known: {known}")
  return TOPOLOGIES[name]
