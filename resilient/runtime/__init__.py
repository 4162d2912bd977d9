"""The worker side of the agent <-> worker contract (see ``api.py``)."""
