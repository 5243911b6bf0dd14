"""Majority arithmetic, in one place (etcd-io/raft's quorum/majority.go).

Membership is static: the voters are fixed at construction. Every rule that counts
nodes (winning an election, committing an index, check-quorum, ReadIndex) goes through
these functions, so the quorum is computed the same way everywhere.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


def quorum_size(voters: Collection[str]) -> int:
    return len(voters) // 2 + 1


def vote_result(voters: Collection[str], votes: Mapping[str, bool]) -> VoteResult:
    """WON once a majority granted, LOST once a majority can no longer grant."""
    granted = sum(1 for v in voters if votes.get(v) is True)
    rejected = sum(1 for v in voters if votes.get(v) is False)
    need = quorum_size(voters)
    if granted >= need:
        return VoteResult.WON
    if len(voters) - rejected < need:
        return VoteResult.LOST
    return VoteResult.PENDING


def committed_index(voters: Collection[str], match: Mapping[str, int]) -> int:
    """The largest index that a majority of voters has stored (0 if none)."""
    acked = sorted((match.get(v, 0) for v in voters), reverse=True)
    return acked[quorum_size(voters) - 1]


def has_quorum(voters: Collection[str], active: Collection[str]) -> bool:
    return sum(1 for v in voters if v in active) >= quorum_size(voters)
