"""Which ranks train which ensemble member.

With world size W and k members:
- W >= k and W a multiple of k: k groups of W/k consecutive ranks; each group trains one
  member with DistributedDataParallel inside the group;
- W < k: each rank trains a contiguous block of members one after another;
- anything else is refused, with the arithmetic in the message.
The "holder" of a member is the first rank of its group; it keeps the trained member.
"""

from dataclasses import dataclass
from typing import List

from ntdist.errors import UserError


@dataclass(frozen=True)
class MemberLayout:
    num_members: int
    world_size: int

    def __post_init__(self):
        k, w = self.num_members, self.world_size
        if w >= k and w % k:
            lower = k * (w // k)
            raise UserError(f"{w} ranks cannot train {k} members: with at least as many ranks as members the ranks "
                            f"must split evenly ({w} % {k} = {w % k}); use {lower} or {lower + k} ranks, "
                            f"or fewer ranks than members, or set fusion.k to a divisor of {w}")

    @property
    def group_size(self) -> int:
        """Ranks per member (1 when ranks train several members each)."""
        return max(1, self.world_size // self.num_members)

    def holder(self, member: int) -> int:
        """The rank that keeps `member` after training (first rank of its group)."""
        if self.world_size >= self.num_members:
            return member * self.group_size
        return member * self.world_size // self.num_members

    @property
    def holders(self) -> List[int]:
        """holders[i]: the rank that keeps member i after training."""
        return [self.holder(m) for m in range(self.num_members)]

    def group_ranks(self, member: int) -> List[int]:
        first = self.holder(member)
        return list(range(first, first + self.group_size))

    def members_of(self, rank: int) -> List[int]:
        """Members that `rank` trains (in order)."""
        return [m for m in range(self.num_members) if rank in self.group_ranks(m)]

    def held_by(self, rank: int) -> List[int]:
        """Members whose trained weights `rank` keeps."""
        return [m for m in range(self.num_members) if self.holder(m) == rank]
