"""Moving snapshot bytes between host and device: the stream scheduler (pinned, chunked,
double-buffered copies on two CUDA streams; memcpy on the CPU) and the KV transport built on it
(save = gather + checksum + publish, load = copy + verify + scatter)."""
