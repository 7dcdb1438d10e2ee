"""Helpers shared by the kernel tests (``test_kv_blocks.py``, ``test_crc32c.py``); no conftest.

Every kernel test compares bytes exactly (integer views + ``torch.equal``, never a tolerance) on
fresh random inputs, and writes into poisoned outputs so a copy that skips an element shows.

Three ways a kernel runs here:

- Interpreter (any machine): :func:`interpret_kernels` swaps a module's ``@triton.jit`` functions
  for Triton's interpreter for one test, in this process, so the kernels run on CPU tensors.
  ``TRITON_INTERPRET=1`` does the same process-wide, but only for kernels decorated after it is
  set, and it would interpret vLLM's kernels too; when it is set, the kernels already are
  interpreted and the swap is a no-op.
- Offline compile (CPU machines, :func:`compile_sm90`): the kernels compile for sm_90 (H100/H200);
  catches compiler-only failures the interpreter cannot, and shows the 128-bit accesses.
- CUDA (``-m gpu``): the compiled kernels on CUDA tensors; skipped without a GPU.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""The whole process runs Triton kernels under the interpreter (kernels cannot compile)."""

RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.float8_e4m3fn]

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
offline_compile = pytest.mark.skipif(
    INTERPRETED or torch.cuda.is_available(), reason="CUDA machines run the real kernels instead"
)


def random_bits(shape, dtype, device="cpu") -> torch.Tensor:
    """Uniformly random bit patterns, NaN payloads and all."""
    raw = RAW[torch.empty(0, dtype=dtype).element_size()]
    info = torch.iinfo(raw)
    return torch.randint(info.min, info.max, shape, dtype=raw, device=device).view(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s raw bits as the same-sized integer dtype."""
    return t.view(RAW[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and bit-identical (NaN payloads included)."""
    return a.shape == b.shape and torch.equal(bits(a).cpu(), bits(b).cpu())


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer filled with a recognisable non-zero pattern."""
    out = torch.empty(shape, dtype=dtype, device=device)
    bits(out).fill_(0x5A if out.element_size() == 1 else -0x5A5A)
    return out


def interpret_kernels(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> None:
    """Run ``module``'s Triton kernels under the interpreter until the test ends.

    Every ``JITFunction`` global of ``module`` (kernels and the jit helpers they call) and of
    ``triton.language`` (its jit library functions: ``tl.zeros``, ``tl.xor_sum``, ...) becomes an
    ``InterpretedFunction`` of the same source, as ``TRITON_INTERPRET=1`` would have decorated
    them. The launchers look their kernels up as module globals, so they pick the swap up.
    Library functions called as tensor members (``x.sum()``) keep their compiled form: the
    kernels here call none.
    """
    try:  # imported lazily by the interpreter (triton >= 3.5); it must not import while swapped
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    import triton.language as tl
    from triton.language import core, standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    # Triton's interpreter patches triton.language for every jit helper call it runs
    # (InterpretedFunction.__call__ -> _patch_lang) and never restores it: a later real
    # compilation in this process (the sm_90 tests) then fails inside tl.load. Re-set every
    # attribute it may patch, so the monkeypatch teardown restores the compiled language.
    for patched in (tl, core, tl.math, core.tensor, core.tensor_descriptor_base):
        for name, value in list(vars(patched).items()):
            if not name.startswith("__"):
                monkeypatch.setattr(patched, name, value)
    made: dict[int, InterpretedFunction] = {}
    for namespace in (module, tl, core, standard, tl.math):
        for name, value in list(vars(namespace).items()):
            if isinstance(value, JITFunction):
                if id(value) not in made:
                    made[id(value)] = InterpretedFunction(value.fn)
                monkeypatch.setattr(namespace, name, made[id(value)])
    kernels = [
        n for n, v in vars(module).items() if isinstance(v, (JITFunction, InterpretedFunction))
    ]
    assert kernels and all(isinstance(getattr(module, n), InterpretedFunction) for n in kernels), (
        kernels
    )


def compile_sm90(fn, signature: dict, constexprs: dict, aligned: list[str]) -> str:
    """PTX of a ``@triton.jit`` kernel compiled for sm_90; ``aligned`` args are 16-byte aligned."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(
        fn=fn,
        signature={**signature, **{k: "constexpr" for k in constexprs}},
        constexprs=constexprs,
        attrs=attrs,
    )
    return triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm[
        "ptx"
    ]


def require_nvidia_backend() -> None:
    """Skip the test when triton has no NVIDIA backend to compile with."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton without its NVIDIA backend")
