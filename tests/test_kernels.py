"""hardware.kernels (dxcli/model/kernels.py): the CPU side. liger itself runs only on a GPU
(tests/gpu/check_kernels.py); here: the refusal, the config key, the plain references against what
rollout computes today, the chunked entropy, and the fused head's wiring with the plain math."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dxcli import config
from dxcli.base.errors import DxError, UsageError
from dxcli.model.kernels import IGNORE, chunked_entropy, full_entropy, install_fused_head, token_logprobs
from dxcli.training.rollout import Rollout, completion_logprobs

LIGER_USABLE = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
HARNESS = Path(__file__).parent / "gpu" / "check_kernels.py"


@pytest.mark.skipif(LIGER_USABLE, reason="liger is usable on this machine")
def test_liger_is_refused_in_one_line_before_anything_loads(tmp_path):
    from typer.testing import CliRunner

    from dxcli.cli.main import app
    from dxcli.model.kernels import check_kernels

    with pytest.raises(DxError, match="hardware.kernels=liger") as info:
        check_kernels("liger")
    assert "\n" not in str(info.value)
    check_kernels("none")
    out = tmp_path / "run"  # refused before the data is read (it does not exist) or a model loads
    result = CliRunner().invoke(app, ["train", "instruct", "--data", str(tmp_path / "absent"), "--out", str(out),
                                      "--set", "hardware.kernels=liger"], terminal_width=400)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # after the profile line
    assert len(errors) == 1 and "needs a CUDA GPU" in errors[0] and "Traceback" not in result.output
    assert not out.exists()


def test_kernels_defaults_to_none_and_rejects_other_values():
    assert config.resolve("cpu-tiny", []).config.hardware.kernels == "none"
    assert config.resolve("cpu-tiny", ["hardware.kernels=liger"]).config.hardware.kernels == "liger"
    with pytest.raises(UsageError, match="kernels: must be one of none, liger"):
        config.resolve("cpu-tiny", ["hardware.kernels=triton"])


def test_chunked_entropy_equals_the_full_entropy():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=gen) * 4  # peaked and flat rows alike
    weight = torch.randn(50, 16, generator=gen)
    full = full_entropy(F.linear(hidden, weight))
    for rows, vocab in ((4, 16), (5, 50), (1024, 8192), (21, 7)):  # ragged, one chunk, larger than the data
        torch.testing.assert_close(chunked_entropy(hidden, weight, rows=rows, vocab=vocab), full,
                                   rtol=1e-5, atol=1e-5)


class LookupModel(nn.Module):
    """A stand-in for DX-LLaVA with completion_logprobs' interface: embeddings from a table, the
    hidden state is the embedding, logits from its lm_head; random tensors, no transformers."""

    def __init__(self, vocab: int = 40, width: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def prompt_embeds(self, ids, mask, image_features=None):
        return self.embed(ids) + image_features.mean(1, keepdim=True)

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_to_keep):
        hidden = torch.tanh(inputs_embeds) * attention_mask.unsqueeze(-1)
        return type("Out", (), {"logits": self.lm_head(hidden[:, -logits_to_keep:])})()


def lookup_rollout(vocab: int = 40, rows: int = 3, prompt: int = 5, width: int = 6) -> Rollout:
    gen = torch.Generator().manual_seed(1)
    comp_mask = (torch.arange(width) < torch.tensor([[width], [4], [2]])).long()
    return Rollout(torch.randint(0, vocab, (rows, prompt), generator=gen), torch.ones(rows, prompt, dtype=torch.long),
                   torch.randn(rows, 2, 12, generator=gen), torch.randint(0, vocab, (rows, width), generator=gen),
                   comp_mask, torch.randn(rows, width, generator=gen), {}, [])


def test_plain_token_logprobs_equal_rollouts_computation():
    torch.manual_seed(0)
    model, roll = LookupModel(), lookup_rollout()
    logp, entropy = completion_logprobs(model, roll, slice(None), "cpu")  # rollout's own code, unchanged
    embeds = model.prompt_embeds(torch.cat([roll.prompt_ids, roll.completion_ids], 1), None, roll.image_features)
    mask = torch.cat([roll.prompt_mask, roll.completion_mask], 1)
    hidden = (torch.tanh(embeds) * mask.unsqueeze(-1))[:, -roll.completion_ids.shape[1] - 1:-1]
    weight = model.lm_head.weight
    assert torch.equal(token_logprobs(hidden, weight, roll.completion_ids, "none"), logp)
    assert torch.equal(full_entropy(F.linear(hidden, weight)), entropy)
    ignored = roll.completion_ids.masked_fill(roll.completion_mask == 0, IGNORE)  # ignored targets score 0
    assert torch.equal(token_logprobs(hidden, weight, ignored, "none"), logp * roll.completion_mask)


def test_the_fused_route_scores_what_the_plain_path_scores():
    """The fused head's route (targets shifted into the head, the last position dropped, entropy in
    chunks) with the plain math: the same log-probs, entropies and gradients as rollout's plain path."""
    torch.manual_seed(0)
    model, roll = LookupModel(), lookup_rollout()
    logp, entropy = completion_logprobs(model, roll, slice(None), "cpu")
    (logp * roll.advantages).sum().backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    install_fused_head(model, "none")
    assert model.lm_head.weight is model.get_output_embeddings().weight and "lm_head.weight" in model.state_dict()
    fused_logp, fused_entropy = completion_logprobs(model, roll, slice(None), "cpu", "liger")
    (fused_logp * roll.advantages).sum().backward()
    torch.testing.assert_close(fused_logp, logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused_entropy, entropy, rtol=0, atol=1e-5)
    for fused_grad, plain_grad in zip((p.grad for p in model.parameters()), plain_grads):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-5, atol=1e-6)
    assert model.lm_head.request is None  # the request ends with the pass: generation sees logits again
    assert model.lm_head(torch.zeros(1, 12)).shape == (1, 40)


def test_the_harness_smoke_reports_equality():
    """tests/gpu/check_kernels.py --smoke: the GPU harness's code at tiny scale on the CPU, so it cannot
    rot between GPU runs; its SFT pass is also the check that the fused route's shifted labels give
    a real (tiny) DX-LLaVA's own L_lm exactly."""
    result = subprocess.run([sys.executable, str(HARNESS), "--smoke"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["pass"] is True
    assert [line.split(":")[0] for line in lines if line.startswith("check ")] == [
        f"check smoke-fp32/{name}" for name in ("functions", "sft", "logp_ref", "logp_grad")]
    assert figures["smoke-fp32"]["sft"]["loss_rel"] == 0.0 and figures["smoke-fp32"]["logp_grad"]["logp_abs"] == 0.0
