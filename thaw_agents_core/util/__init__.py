"""Leaf helpers with no project imports: vLLM-version differences (``compat``), atomic file
operations (``files``), process identity (``process_identity``), a background event loop
(``loop_thread``)."""
