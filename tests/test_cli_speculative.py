"""`dsv3 generate --speculative mtp --stats`: the same greedy text as plain decoding, and the draft statistics."""

from __future__ import annotations

import pytest
import torch

from dsv3.cli import main
from dsv3.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = ModelConfig.preset("tiny")
    import dsv3_torch

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("spec_ckpt")
    dsv3_torch.DeepSeekV3(cfg).save_pretrained(d)
    return str(d)


def _generate(checkpoint, capsys, *extra):
    base = ["generate", "--checkpoint", checkpoint, "--prompt", "def f(x):", "--framework", "torch",
            "--max-new-tokens", "12"]
    assert main(base + list(extra)) == 0
    return capsys.readouterr()


def test_speculative_generate_prints_the_plain_greedy_text_and_stats(checkpoint, capsys):
    plain = _generate(checkpoint, capsys)
    spec = _generate(checkpoint, capsys, "--speculative", "mtp", "--stats")
    assert spec.out == plain.out and spec.out.startswith("def f(x):")
    assert "acceptance rate" in spec.err and "mean accepted length" in spec.err and "tokens/s" in spec.err
    assert "acceptance rate" not in _generate(checkpoint, capsys, "--stats").err
