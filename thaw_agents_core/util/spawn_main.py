"""Main module of every process vLLM spawns for a thaw-agents engine (``compat.spawn_main_module``).

multiprocessing imports this module in the child instead of re-running the user's script (which
may have no ``if __name__ == "__main__":``), before anything is unpickled, i.e. before vLLM is
imported there. It quiets the child the way ``compat.configure_vllm_environment`` quiets the
parent. Keep it import-light.
"""

import logging
import os
import warnings

from thaw_agents_core.util.compat import hide_our_triton_kernels

hide_our_triton_kernels()

if os.environ.get("THAW_AGENTS_VERBOSE", "") in ("", "0"):
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "ERROR").upper())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
