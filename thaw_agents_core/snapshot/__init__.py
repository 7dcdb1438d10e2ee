"""The ``.thawkv`` snapshot: on-disk format (``format``), building and writing it (``io``),
the engine namespace that must match before a load (``namespace``), and vLLM-compatible block
hashes (``block_hashes``). Data only: a JSON header and raw bytes, never pickle."""
