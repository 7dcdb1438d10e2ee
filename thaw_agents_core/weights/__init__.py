"""``.thaw`` weight snapshots: format, freeze, restore, hot swap, the vLLM model loader."""
