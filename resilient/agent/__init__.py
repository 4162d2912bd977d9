"""The node agent behind ``resilient-run``: supervises this host's workers, takes part in the rendezvous,
owns snapshot memory, and recovers with the cheapest safe tier (in-process, respawn, replace)."""
