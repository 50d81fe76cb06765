"""The gossip mesh (SWIM + Lifeguard) and Raft-lite leadership: arrives with the mesh issue."""
