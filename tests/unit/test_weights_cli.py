"""``thaw-agents info | verify | diff | freeze`` on small files (no engine)."""

from __future__ import annotations

import json

import pytest
import torch

from thaw_agents.cli import main
from thaw_agents_core.snapshot.io import build_snapshot, write_snapshot_file
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.weights.format import WeightsNamespace
from thaw_agents_core.weights.io import write_weights

NS = Namespace("tiny-model", "w1", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0")


def _kv(path, tokens, namespace=NS, salt=b""):
    data = build_snapshot(namespace, tokens, 32, b"\x07" * 32 * (len(tokens) // 4), hash_salt=salt)
    write_snapshot_file(path, data)
    return path


@pytest.fixture()
def weights_file(tmp_path):
    ns = WeightsNamespace("f" * 32, "LlamaForCausalLM", "float32", "engine", 0, 1, "step-3")
    path = tmp_path / "w.thaw"
    write_weights(
        path,
        [("a.weight", torch.arange(600.0)), ("b.bias", torch.ones(3))],
        ns,
        crc_chunk_bytes=1024,
    )
    return path


def test_info_and_verify_weights(weights_file, capsys):
    assert main(["info", str(weights_file)]) == 0
    out = capsys.readouterr().out
    assert "weights_version 'step-3', LlamaForCausalLM, float32, engine layout" in out
    assert "a.weight" in out and "[600]" in out
    assert main(["info", str(weights_file), "--json"]) == 0
    header = json.loads(capsys.readouterr().out)
    assert [len(t["crc32c"]) for t in header["tensors"]] == [3, 1]
    assert main(["verify", str(weights_file)]) == 0
    assert "OK, 4 chunks verified" in capsys.readouterr().out
    data = bytearray(weights_file.read_bytes())
    data[-2000] ^= 1  # inside a.weight (the payload is its 2400 B, padding, b.bias)
    weights_file.write_bytes(bytes(data))
    assert main(["verify", str(weights_file)]) == 1
    assert "CORRUPT: 1 of 4 chunks" in capsys.readouterr().err


def test_info_verify_and_diff_kv(tmp_path, capsys):
    a = _kv(tmp_path / "a.thawkv", list(range(16)))
    b = _kv(tmp_path / "b.thawkv", list(range(9)) + [99] + list(range(10, 20)))
    assert main(["info", str(a)]) == 0
    assert "16 tokens = 4 blocks of 4" in capsys.readouterr().out
    assert main(["verify", str(a)]) == 0
    assert "OK, 1 chunks verified" in capsys.readouterr().out
    assert main(["diff", str(a), str(b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shared_blocks"] == 2 and report["shared_tokens"] == 8
    assert report["first_differing_token"] == 9 and report["reusable_blocks"] == 2
    assert "token 9 differs (A has 9, B has 99): block 2" in report["reasons"][0]

    other = Namespace(**{**NS.to_json(), "weights_version": "w2"})
    c = _kv(tmp_path / "c.thawkv", list(range(12)), namespace=other)
    assert main(["diff", str(a), str(c)]) == 0
    out = capsys.readouterr().out
    assert "shared prefix: 3 blocks (12 tokens)" in out and "reusable across them: 0" in out
    assert "weights_version: A has 'w1', B has 'w2'" in out
    assert "one is a prefix of the other: A continues for 1 more block(s)" in out


def test_freeze_safetensors_folder(tmp_path, capsys):
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    save_file(
        {"x": torch.ones(4, 4), "y": torch.zeros(2)}, str(tmp_path / "m" / "model.safetensors")
    )
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"]}))
    out = tmp_path / "m.thaw"
    assert main(["freeze", str(tmp_path / "m"), str(out), "--weights-version", "v0"]) == 0
    assert "froze 2 tensors" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    ns = json.loads(capsys.readouterr().out)["namespace"]
    assert (ns["architecture"], ns["layout"], ns["weights_version"]) == (
        "TinyForCausalLM",
        "checkpoint",
        "v0",
    )


def test_not_a_snapshot(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello world")
    with pytest.raises(SystemExit, match="not a thaw snapshot"):
        main(["info", str(path)])
