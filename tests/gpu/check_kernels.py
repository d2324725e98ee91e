"""hardware.kernels=liger against plain PyTorch: equal losses, log-probs and gradients, and the
log-prob passes' peak memory (tests/gpu/README.md, issue 21).

Run: python tests/gpu/check_kernels.py [--smoke]

For each case (a random-init DX-LLaVA built from config, as check_gpu.py builds it), one model runs
every pass on the plain path, then `apply_kernels(model, "liger")` patches it in place (RMSNorm,
SwiGLU, RoPE, the fused head) and the same passes run again on the same inputs:
  sft:       L_lm of a batch (dxcli.model.kernels.lm_forward, as sft.train_step), then backward;
  logp_ref:  rollout.completion_logprobs under no_grad (the reference and old-policy passes);
  logp_grad: the same with gradients, backward of an advantage-weighted sum (the policy pass);
  functions: token_logprobs and chunked_entropy on random tensors against their plain references.
Figures: max abs difference of the masked token log-probs and entropies, relative difference of
the loss and of two gradients (the last MLP's down_proj, lm_head), and per log-prob pass the peak
(torch.cuda.max_memory_allocated) and its rise over what was allocated before the pass; the goal
is the fused rise at most half the plain one. PASS: every difference within the case's tolerance.
`--smoke`: the same harness on the CPU at tiny scale; the "fused" side is the fused head's route
with the plain math (install_fused_head(..., "none")), so equality is exact up to float rounding
and the wiring (label shift, positions, entropy) is what it checks. One `check NAME: ...` line per
case and pass, then one JSON line; exit status 1 on failure. About a minute on one H100 or H200.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import check_gpu  # noqa: E402
import torch  # noqa: E402

# tolerances: bf16 rounds the logits (|log p| ~ 10 at vocabulary 32000) to ~3 significant digits and
# Liger's RMSNorm/SwiGLU/RoPE round differently inside every layer; fp32 leaves summation order only
TOLERANCE = {"bf16": dict(loss_rel=1e-2, logp_abs=2e-2, entropy_abs=2e-2, grad_rel=1e-1),
             "fp32": dict(loss_rel=1e-4, logp_abs=1e-4, entropy_abs=1e-4, grad_rel=1e-3)}
SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000)


@dataclasses.dataclass
class Case:
    name: str
    scale: Any  # check_gpu.Scale: llm shape, device, precision (the tower is the smoke ConvNeXt)
    group: int  # sequences per log-prob pass (G)
    completion: int  # completion tokens per sequence
    impl: str  # the fused side: "liger", or "none" (the fused route with the plain math)


def cases(smoke: bool) -> list[Case]:
    base = check_gpu.SCALES["smoke"]
    if smoke:
        return [Case("smoke-fp32", dataclasses.replace(base, batch=2, seq=160), 4, 24, "none")]
    gpu = dict(device="cuda", vision_args=base.vision_args)
    return [  # 1B-shaped in bf16 for the memory goal; a small fp32 model for tight equality
        Case("1b-bf16", dataclasses.replace(base, llm=check_gpu.LLAMA_1B, precision="bf16", batch=4, seq=1024,
                                            **gpu), 8, 512, "liger"),
        Case("small-fp32", dataclasses.replace(base, llm=SMALL, precision="fp32", batch=2, seq=512, **gpu),
             8, 256, "liger"),
    ]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def measured(case: Case, run: Callable[[], dict]) -> dict:
    """`run`'s figures plus its peak memory and that peak's rise over what was allocated before."""
    check_gpu.reset_peak()
    before = torch.cuda.memory_allocated() if case.scale.device == "cuda" else 0
    started = time.perf_counter()
    figures = run()
    check_gpu.sync()
    figures["seconds"] = round(time.perf_counter() - started, 3)  # the first fused call includes Triton's compile
    if case.scale.device != "cuda":  # the CPU has no allocator statistics: nothing to say
        return {**figures, "peak_gib": None, "rise_gib": None}
    peak = torch.cuda.max_memory_allocated()
    return {**figures, "peak_gib": round(peak / 2**30, 3), "rise_gib": round((peak - before) / 2**30, 3)}


def probes(model) -> dict[str, torch.nn.Parameter]:
    return {"down_proj": model.model.language_model.layers[-1].mlp.down_proj.weight,
            "lm_head": model.get_output_embeddings().weight}


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.detach().clone() for name, p in probes(model).items()}
    model.zero_grad(set_to_none=True)
    return out


def make_rollout(bundle, case: Case):
    """A rollout as dxcli.training.rollout builds it: G left-padded prompts with one image's features,
    random completions of uneven lengths (right-padded), random advantages."""
    from dxcli.model.generate import encode_prompts
    from dxcli.training.rollout import Rollout

    G, T, dev = case.group, case.completion, case.scale.device
    ids, mask = encode_prompts(bundle, ["Is this image real or fake?"] * G)
    pixels = torch.randn(1, 3, case.scale.image_size, case.scale.image_size, device=dev,
                         dtype=check_gpu.dtype_of(case.scale))
    with torch.no_grad():
        features = bundle.model.image_features(pixels).expand(G, -1, -1)
    first_plain = max(bundle.tokenizer.all_special_ids) + 1
    comp = torch.randint(first_plain, len(bundle.tokenizer), (G, T))
    lengths = torch.linspace(T // 2, T, G).long()
    comp_mask = (torch.arange(T) < lengths[:, None]).long()
    comp = comp.masked_fill(comp_mask == 0, bundle.tokenizer.pad_token_id)
    return Rollout(ids, mask, features, comp, comp_mask, torch.randn(G, T) * comp_mask, {}, [])


def passes(bundle, case: Case, kernels: str, batch: dict, roll) -> dict[str, dict]:
    """sft, logp_ref and logp_grad on one path; the tensors each leaves for comparison."""
    from dxcli.model.kernels import lm_forward
    from dxcli.training.rollout import completion_logprobs

    model, dev = bundle.model, case.scale.device
    model.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    kept: dict[str, dict] = {}

    def sft() -> dict:
        loss, _ = lm_forward(model, batch["labels"], kernels, **inputs)
        loss.backward()
        kept["sft"] = {"loss": loss.detach().float(), **grads(model)}
        return {"loss": round(loss.item(), 5)}

    def logp_ref() -> dict:
        with torch.no_grad():
            logp, entropy = completion_logprobs(model, roll, slice(None), dev, kernels)
        kept["logp_ref"] = {"logp": logp.float(), "entropy": entropy.float()}
        return {}

    def logp_grad() -> dict:
        logp, entropy = completion_logprobs(model, roll, slice(None), dev, kernels)
        mask = roll.completion_mask.to(dev)
        (-(logp * roll.advantages.to(dev) * mask).sum() / mask.sum()).backward()
        kept["logp_grad"] = {"logp": logp.detach().float(), "entropy": entropy.float(), **grads(model)}
        return {}

    figures = {name: measured(case, run) for name, run in (("sft", sft), ("logp_ref", logp_ref),
                                                             ("logp_grad", logp_grad))}
    return {name: {"figures": figures[name], "kept": kept[name]} for name in figures}


def compare(plain: dict, fused: dict, mask: torch.Tensor, tol: dict) -> dict:
    """Differences of one pass, and whether each is within tolerance."""
    out: dict[str, Any] = {}
    mean_abs: dict[str, float] = {}
    if "loss" in plain:
        out["loss_rel"] = abs(fused["loss"].item() - plain["loss"].item()) / max(abs(plain["loss"].item()), 1e-12)
    for key in ("logp", "entropy"):
        if key in plain:
            m = mask.to(plain[key].device).bool()
            out[f"{key}_abs"] = (fused[key] - plain[key])[m].abs().max().item()
            mean_abs[f"{key}_mean_abs"] = (fused[key] - plain[key])[m].abs().mean().item()  # reported only
    for key in ("down_proj", "lm_head"):
        if key in plain:
            out[f"grad_{key}_rel"] = rel(fused[key], plain[key])
    limits = {k: tol["grad_rel"] if k.startswith("grad_") else tol[k] for k in out}
    out = {k: float(f"{v:.3g}") for k, v in {**out, **mean_abs}.items()}
    out["ok"] = all(out[k] <= limits[k] for k in limits)
    return out


def functions(case: Case, tol: dict) -> dict:
    """The fused functions on random tensors against the plain ones (and the plain ones against
    the logits they replace: rollout's log_softmax + gather, the full-vocabulary entropy)."""
    from dxcli.model.kernels import chunked_entropy, full_entropy, token_logprobs

    dev, dtype = case.scale.device, check_gpu.dtype_of(case.scale)
    d, V = case.scale.llm["hidden_size"], case.scale.llm["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    # logits of std 0.5, as a random-init LLM's (|z| < 4: a bf16 rounding step of the target's logit,
    # should two GEMMs round it differently, stays under the 2e-2 tolerance)
    hidden = torch.randn(case.group, case.completion, d, generator=gen).to(dev, dtype)
    weight = (torch.randn(V, d, generator=gen) / (2 * d ** 0.5)).to(dev, dtype)
    targets = torch.randint(0, V, (case.group, case.completion), generator=gen).to(dev)
    logits = torch.nn.functional.linear(hidden, weight).float()
    gathered = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    plain = token_logprobs(hidden, weight, targets, "none")
    fused = token_logprobs(hidden, weight, targets, case.impl)
    entropy = chunked_entropy(hidden, weight, rows=97, vocab=V // 3 + 1)  # ragged chunks on purpose
    out = {"plain_vs_gather_abs": (plain - gathered).abs().max().item(),
           "fused_vs_plain_abs": (fused - plain).abs().max().item(),
           "chunked_vs_full_entropy_abs": (entropy - full_entropy(logits)).abs().max().item()}
    out = {k: float(f"{v:.3g}") for k, v in out.items()}
    out["ok"] = out["plain_vs_gather_abs"] <= 1e-6 and all(
        v <= tol["logp_abs"] for k, v in out.items() if k != "plain_vs_gather_abs")
    return out


def llama_module_state() -> Callable[[], None]:
    """Liger patches transformers' Llama module itself (RoPE function, RMSNorm and MLP classes):
    the returned callable puts it back, so the next case's plain path is plain again."""
    from transformers.models.llama import modeling_llama

    names = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
    saved = {name: getattr(modeling_llama, name) for name in names}
    return lambda: [setattr(modeling_llama, name, value) for name, value in saved.items()]


def run_case(case: Case, tokenizer) -> dict:
    from dxcli.model import checkpointing
    from dxcli.model.kernels import apply_kernels, install_fused_head

    torch.manual_seed(0)
    tol = TOLERANCE[case.scale.precision]
    result: dict[str, Any] = {"functions": functions(case, tol)}
    report(case, "functions", result["functions"])
    restore = llama_module_state()
    try:
        bundle = check_gpu.make_bundle(case.scale, case.scale.llm, tokenizer)
        # as the GPU profiles train (train.grad_checkpointing): activations are then small, and the
        # logits are what a log-prob pass holds at its peak
        checkpointing.enable(bundle.model)
        bundle.model.config.use_cache = bundle.model.config.text_config.use_cache = False
        batch = check_gpu.sft_batch(bundle, case.scale)
        roll = make_rollout(bundle, case)
        plain = passes(bundle, case, "none", batch, roll)
        if case.impl == "liger":
            apply_kernels(bundle.model, "liger")
        else:  # smoke: the fused route, plain math
            install_fused_head(bundle.model, "none")
        fused = passes(bundle, case, "liger", batch, roll)
    finally:
        restore()
    for name in plain:
        figures = compare(plain[name]["kept"], fused[name]["kept"], roll.completion_mask, tol)
        for side, run in (("plain", plain), ("fused", fused)):
            figures.update({f"{side}_{k}": v for k, v in run[name]["figures"].items()})
        if name.startswith("logp") and figures["plain_rise_gib"]:  # the goal: at most 0.5
            figures["rise_ratio"] = round(figures["fused_rise_gib"] / max(figures["plain_rise_gib"], 1e-9), 3)
        result[name] = figures
        report(case, name, figures)
    del bundle
    check_gpu.reset_peak()
    return result


def report(case: Case, name: str, figures: dict) -> None:
    print(f"check {case.name}/{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)


def main(argv: list[str] | None = None) -> int:
    from dxcli.model.build import train_tokenizer
    from dxcli.model.kernels import check_kernels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the same harness at tiny scale on the CPU")
    args = parser.parse_args(argv)
    check_gpu.process_scale(args.smoke)  # no GPU without --smoke: a one-line exit
    started = time.perf_counter()
    chosen = cases(args.smoke)
    if any(c.impl == "liger" for c in chosen):
        check_kernels("liger")  # liger-kernel missing: one line, before any model is built
    texts = ["**Edges**: blurry edges, warping and synthetic artifacts.\n\n### Answer: fake",
             "**Skin Texture**: natural pores and realistic texture.\n\n### Answer: real"] * 4
    tokenizer = train_tokenizer(texts, 600)  # its vocabulary is smaller than the LLM's rows, as check_gpu's
    results: dict[str, Any] = {c.name: run_case(c, tokenizer) for c in chosen}
    passed = all(part["ok"] for res in results.values() for part in res.values())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    print(json.dumps({"pass": passed, "device": device, "tolerance": TOLERANCE,
                      "seconds": round(time.perf_counter() - started, 1), **results}), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
