"""The device-mesh spec both frameworks share: axis names and the ``--mesh`` string.

``data``: replicas of the whole model, each on its own slice of the batch; ``fsdp``: parameters,
gradients and optimizer state split over devices and gathered per layer; ``expert``: the routed experts
split over devices, tokens exchanged to the devices that hold their experts. The batch is split over all
three. `dsv3_jax.sharding` and `dsv3_torch.sharding` build each framework's mesh from these sizes.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

AXES = ("data", "fsdp", "expert")


def parse_mesh(spec: Union[str, Mapping[str, int], None], world_size: Optional[int] = None) -> dict[str, int]:
    """"fsdp=2,expert=2" (or a dict) -> {"data": 1, "fsdp": 2, "expert": 2}; axes left out are 1.

    With ``world_size`` the sizes' product must equal it, and an empty spec means ``fsdp=world_size``.
    Raises ValueError naming the bad entry."""
    if isinstance(spec, Mapping):
        items = {str(k): v for k, v in spec.items()}
    else:
        items = {}
        for part in (spec or "").replace(" ", "").split(","):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"--mesh {spec!r}: each entry must be axis=size with the axis one of "
                                 f"{list(AXES)}, got {part!r}")
            if name in items:
                raise ValueError(f"--mesh {spec!r}: axis {name!r} given twice")
            try:
                items[name] = int(value)
            except ValueError:
                raise ValueError(f"--mesh {spec!r}: the size of {name!r} must be an integer >= 1, "
                                 f"got {value!r}") from None
    bad = sorted(set(items) - set(AXES))
    if bad:
        raise ValueError(f"--mesh {spec!r}: unknown axes {bad}; the axes are {list(AXES)}")
    for name, n in items.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"--mesh {spec!r}: the size of {name!r} must be an integer >= 1, got {n!r}")
    sizes = {a: int(items.get(a, 1)) for a in AXES}
    if world_size is not None:
        if not items:
            sizes["fsdp"] = world_size
        if mesh_size(sizes) != world_size:
            raise ValueError(f"mesh {format_mesh(sizes)} has {mesh_size(sizes)} ranks, the job has {world_size}")
    return sizes


def mesh_size(sizes: Mapping[str, int]) -> int:
    return math.prod(sizes.get(a, 1) for a in AXES)


def format_mesh(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={sizes.get(a, 1)}" for a in AXES)
