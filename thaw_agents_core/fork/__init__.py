"""Forking a prefix: durable prefix handles (``prefix``), and running branches in the parent
engine or a pool with the routing rule (``branches``)."""
