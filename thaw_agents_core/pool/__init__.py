"""``ForkPool``: warm worker processes, each a vLLM engine with the connector (``fork_pool``),
the JSON frames between parent and workers (``wire``), the worker's main loop (``worker``) and
where workers run (``placement``)."""
