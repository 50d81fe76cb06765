"""Deliberately broken Raft variants, to show the simulator catches each ("test the tester").

- `LazyFsyncDriver` (tests/sim/raft_node.py): sends before its writes are durable;
- `ForgetVoteDriver` (tests/sim/raft_node.py): persists the term but not voted_for;
- `CountingCommitCore` (here): commits an entry of a previous term by counting replicas, the
  bug the Raft paper's Figure 8 shows.

`CountingCommitCore` overrides a private method of RaftCore: the core has no public seam for
this, and a test-only subclass is the least intrusive one. If the core's internals move,
this class fails loudly (AttributeError), never silently.
"""

from __future__ import annotations

from typing import Any

from spear.mesh.raft import RaftCore
from spear.mesh.raft_config import quorum_index


class CountingCommitCore(RaftCore):
    """BROKEN on purpose: a leader commits any index a quorum holds, whatever its term."""

    def _maybe_commit(self, now: float) -> None:
        me: Any = self
        if me._state != "leader":
            return
        matches = [
            me._log.last_index if voter == me.node_id else me._progress[voter].match_index
            for voter in me._membership.voters
            if voter == me.node_id or voter in me._progress
        ]
        index = quorum_index(matches, me._membership.quorum)
        if index > me._commit:
            me._commit_to(index, now)
