"""One generation job spread over several processes (`torchrun --nproc_per_node=K scripts/generate.py ...`).

The job is a list of images, (prompt, seed) pairs in a fixed order. Every name is decided before any sampling,
from the image's place in that list (`plan_names`), and process r of K takes the r-th of K contiguous shares
(`share`), so the images, their names and their metadata are those of a single-process run. Processes talk
only through torchrun's environment variables and, for the names and the final summary, a gloo group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Rank":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or a single process without them."""
        try:
            r = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
        if not 0 <= r.rank < r.world:
            raise ValueError(f"RANK {r.rank} is outside 0..WORLD_SIZE-1 ({r.world - 1})")
        return r


def share(n: int, rank: int, world: int) -> range:
    """The jobs of process `rank`: a contiguous block, the blocks' sizes differing by at most one."""
    return range(rank * n // world, (rank + 1) * n // world)


def plan_names(targets: list[Path]) -> list[Path]:
    """A free name for each target, in order: the target itself, else stem_1, stem_2, ... (as io.claim_path
    names them), skipping names that exist on disk or were given to an earlier target."""
    taken, names = set(), []
    for target in targets:
        candidate, n = target, 0
        while candidate in taken or candidate.exists():
            n += 1
            candidate = target.with_name(f"{target.stem}_{n}{target.suffix}")
        taken.add(candidate)
        names.append(candidate)
    return names
