"""One vLLM engine's lifecycle: what to start (``EngineSpec``), starting, serving and restarting
it (``engine``), shared engines per spec (``registry``), generation options -> vLLM
``SamplingParams`` (``sampling``), the embedded and tiny models (``models``), and the reaper that
kills vLLM engine cores whose owner died (``reaper``)."""
