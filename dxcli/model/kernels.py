"""Fused GPU kernels as an option (`hardware.kernels`: none | liger; METHOD.md, issue 21).

`liger` swaps the LLM's RMSNorm, SwiGLU and RoPE for Liger-Kernel's Triton kernels and turns its
`lm_head` into a `FusedLinearHead`: when a caller asks through `head_request`, the head returns
the SFT loss or the RL token log-probs straight from the hidden states with Liger's fused linear
cross-entropy, so the B x T x V logits (V = 32000 at 7B) are never materialised. The logged token
entropy is then computed over vocabulary chunks (`chunked_entropy`). Every fused function has its
plain-PyTorch reference here (kernels="none"), which is what tests and tests/gpu/check_kernels.py
compare against. Plain PyTorch stays the default; liger_kernel is imported only on the fused path.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dxcli.base.errors import DxError

KERNELS = ("none", "liger")
IGNORE = -100  # transformers' ignore_index: a label the loss skips (prompt, image, padding)
# chunk sizes of the entropy: 1024 rows x 8192 vocabulary entries are 32 MiB of float32 logits at
# a time, against 1 GiB for 8 sequences x 1024 tokens x 32000 at once
ENTROPY_ROWS, ENTROPY_VOCAB = 1024, 8192


def check_kernels(name: str) -> None:
    """A one-line error, before any model is loaded, when `name` needs what this machine lacks."""
    if name != "liger":
        return
    if not torch.cuda.is_available():
        raise DxError("hardware.kernels=liger needs a CUDA GPU and `pip install liger-kernel`; this machine "
                      "has none: use hardware.kernels=none")
    missing = [pkg for pkg, module in (("liger-kernel", "liger_kernel"), ("triton", "triton"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise DxError(f"hardware.kernels=liger needs {' and '.join(missing)}: `pip install {' '.join(missing)}`, "
                      "or use hardware.kernels=none")


def apply_kernels(model: nn.Module, name: str) -> nn.Module:
    """Patch a loaded DX-LLaVA in place for `name` (no-op for "none"); returns the model.

    Only the LLM is touched (the vision tower, projector and binary head run as before): Liger's
    RMSNorm and SwiGLU replace the forwards of the existing module instances, so parameter names,
    checkpoints and LoRA targets are unchanged; its RoPE is a module-level patch of transformers'
    Llama code (every Llama in the process: the PRPO reference included, which is what KL needs).
    Call before LoRA and DeepSpeed wrap the model (they find the same modules afterwards).
    """
    if name == "none":
        return model
    check_kernels(name)
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    llm = model.model.language_model  # LlamaModel: model_type "llama" selects Liger's Llama patch
    _apply_liger_kernel_to_instance(model=llm, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    install_fused_head(model, "liger")
    return model


# ---------------------------------------------------------------------- the math, fused and plain


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kernels: str) -> torch.Tensor:
    """log p(target) [B, T] (float32) for hidden states [B, T, d] under the head `weight` [V, d].

    none: log_softmax of the logits in float32, gathered (what rollout.completion_logprobs does
    with the model's logits). liger: the negated per-token fused linear cross-entropy, computed in
    row chunks; its backward recomputes each chunk's logits. Targets equal to IGNORE give 0."""
    if kernels == "none":
        logits = F.linear(hidden, weight).float()  # what lm_head computes, then upcast as rollout does
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return logp.masked_fill(targets == IGNORE, 0.0)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    d = hidden.shape[-1]
    # accum_dtype float32: with a trained lm_head (full fine-tuning) its gradient sums over chunks;
    # in bf16 those partial sums would lose what the plain path's single GEMM keeps
    nll = liger_fused_linear_cross_entropy(hidden.reshape(-1, d), weight, targets.reshape(-1),
                                           ignore_index=IGNORE, reduction="none", accum_dtype=torch.float32)
    return -nll.float().view(targets.shape)


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kernels: str) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE (transformers' ForCausalLMLoss
    without num_items_in_batch); `targets` are already shifted (position t scores token t+1)."""
    d = hidden.shape[-1]
    if kernels == "none":
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden.reshape(-1, d), weight, targets.reshape(-1),
                                            ignore_index=IGNORE, reduction="mean", accum_dtype=torch.float32)


def full_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The reference: token entropy over the whole vocabulary at once, as completion_logprobs logs it."""
    logp_all = torch.log_softmax(logits.float(), -1)
    return -(logp_all.exp() * logp_all).sum(-1)


@torch.no_grad()
def chunked_entropy(hidden: torch.Tensor, weight: torch.Tensor, rows: int = ENTROPY_ROWS,
                    vocab: int = ENTROPY_VOCAB) -> torch.Tensor:
    """Token entropy [B, T] of softmax(hidden @ weight^T) without the B x T x V logits: rows x vocab
    blocks, with a running (max, sum exp, sum exp * logit) per row, H = m + log s - t / s. Logits
    are computed in the head's dtype and upcast, as lm_head's would be."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for r0 in range(0, flat.shape[0], rows):
        h = flat[r0:r0 + rows]
        m = torch.full((h.shape[0],), -torch.inf, device=h.device)
        s = torch.zeros(h.shape[0], device=h.device)
        t = torch.zeros(h.shape[0], device=h.device)
        for v0 in range(0, weight.shape[0], vocab):
            z = F.linear(h, weight[v0:v0 + vocab]).float()
            new_m = torch.maximum(m, z.max(-1).values)
            scale = torch.exp(m - new_m)  # exp(-inf) = 0 on the first chunk
            e = torch.exp(z - new_m.unsqueeze(-1))
            s = s * scale + e.sum(-1)
            t = t * scale + (e * z).sum(-1)
            m = new_m
        out[r0:r0 + rows] = m + torch.log(s) - t / s
    return out.view(hidden.shape[:-1])


# ---------------------------------------------------------------------- the head


@dataclass
class HeadRequest:
    """What the next head forward returns instead of logits: "lm_loss" (a scalar) or "logprobs"
    ([B, T, 2]: log p(target), entropy) for `targets` [B, T], one per position the head sees."""

    kind: str
    targets: torch.Tensor


class FusedLinearHead(nn.Linear):
    """lm_head that, under a `head_request`, returns the loss or the log-probs from its input.

    Computing inside the head's own forward keeps every caller's path (DeepSpeed engine, peft,
    FastVlm's forward) and ZeRO-3's per-module gathering of the weight, forward and backward, as
    they are. `impl`: "liger" (fused) or "none" (the plain reference math through the same route,
    which is how the CPU tests exercise this wiring)."""

    impl: str = "none"
    request: HeadRequest | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        request = self.request
        if request is None:
            return super().forward(x)
        if request.targets.shape != x.shape[:-1]:
            raise ValueError(f"head request targets {tuple(request.targets.shape)} != positions {tuple(x.shape[:-1])}")
        if request.kind == "lm_loss":
            return lm_loss(x, self.weight, request.targets, self.impl)
        logp = token_logprobs(x, self.weight, request.targets, self.impl)
        entropy = chunked_entropy(x.detach(), self.weight.detach())
        return torch.stack([logp, entropy], -1)


def install_fused_head(model: nn.Module, impl: str) -> FusedLinearHead:
    """Make the model's lm_head a FusedLinearHead in place (same parameter, same state-dict name)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"lm_head is a {type(head).__name__}, not nn.Linear: cannot fuse it")
    head.__class__ = FusedLinearHead
    head.impl, head.request = impl, None
    return head


@contextmanager
def head_request(model: Any, request: HeadRequest) -> Iterator[None]:
    """Within the block, the model's head answers `request` (engine, peft or plain model)."""
    head = model.get_output_embeddings()
    if not isinstance(head, FusedLinearHead):
        raise RuntimeError("the fused path needs apply_kernels(model, 'liger') (or install_fused_head) first")
    head.request = request
    try:
        yield
    finally:
        head.request = None


# ---------------------------------------------------------------------- the training passes


def lm_forward(model: Any, labels: torch.Tensor, kernels: str, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """(L_lm, output) of the model's forward on `inputs`: plain, the model's own loss from its logits;
    fused, the head's, from shifted labels as transformers' loss shifts them (t scores t+1)."""
    if kernels == "none":
        out = model(labels=labels, **inputs)
        return out.loss, out
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    with head_request(model, HeadRequest("lm_loss", targets)):
        out = model(**inputs)
    return out.logits, out  # FastVlm returns what the head returned as its `logits`: here the loss


def fused_completion_logprobs(model: Any, embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                              comp_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rollout.completion_logprobs on the fused path: the head sees the last width + 1 positions
    (position t predicts token t + 1), scores each completion token and the entropy at each; the
    last position predicts nothing (IGNORE) and is dropped, as the plain path drops its logits."""
    targets = F.pad(comp_ids, (0, 1), value=IGNORE)
    with head_request(model, HeadRequest("logprobs", targets)):
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                    logits_to_keep=comp_ids.shape[1] + 1).logits
    return out[:, :-1, 0], out[:, :-1, 1].detach()
