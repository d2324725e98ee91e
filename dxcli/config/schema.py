"""The config schema: one dataclass per section, with each key's default and what it means.
Later features add their keys here, in the section they belong to."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PROFILE = "cpu-tiny"


@dataclass
class TinyModelConfig:
    """The offline tiny preset: random-init ConvNeXt + small Llama + a freshly trained BPE."""

    vision_depths: list[int] = field(default_factory=lambda: [1, 1, 2, 1])
    vision_dims: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 2000


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the LLM only (dxcli.model.lora); PRPO's KL reference is then the policy
    with adapters off. No QLoRA: bitsandbytes' 4-bit CPU path failed in no-grad forwards (docs/lora.md)."""

    r: int = 0  # adapter rank; 0 = off (full fine-tuning of the LLM)
    alpha: float = 16.0  # scaling = alpha / r
    dropout: float = 0.05
    # Llama's attention and MLP projections (every linear layer of a decoder block)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    # the stages that use LoRA when r > 0 (a profile may keep instruct full and make only PRPO LoRA)
    stages: list[str] = field(default_factory=lambda: ["instruct", "prpo"])

    def rank_for(self, stage: str) -> int:
        """The adapter rank `stage` trains with; 0 = full fine-tuning (align never adapts the LLM)."""
        return self.r if stage in self.stages else 0


@dataclass
class ModelConfig:
    path: str | None = None  # a dx checkpoint folder; wins over everything below
    preset: str = "compose"  # "compose" (vision + llm) or "tiny"
    vision: str = "convnext_large_mlp.clip_laion2b_ft_soup_320"  # timm name
    # None -> timm's own; a local file/folder (timm or open_clip keys) or timm hub id; or an open_clip
    # model: open_clip:ARCH:TAG_OR_FILE (the --clip spec: one file serves tower and VCR) or
    # hf-hub:ORG/NAME, from the local cache only; its trunk must be model.vision's
    vision_weights: str | None = None
    llm: str = "lmsys/vicuna-7b-v1.5"  # local folder or hub id
    # hub ids load from the Hugging Face cache only (an offline machine fails at once, saying what
    # to download); true lets transformers and timm download what is missing
    download: bool = False
    image_size: int = 320
    head_hidden: int = 512
    # the LLM's attention kernel: sdpa (PyTorch's fused attention, the default), eager, or
    # flash_attention_2 (needs the flash-attn package and a CUDA GPU; refused before a run otherwise)
    attn_implementation: str = "sdpa"
    # Model shapes for the memory planner (`dx profiles show --memory`), so it needs no download:
    # a file name in dxcli/profiles/models/ without .json (e.g. "dx-llava-7b"), or a path to such a
    # file or to an LLM's HF config.json. None: the tiny preset's keys, or model.llm/config.json.
    shapes: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class HardwareConfig:
    nproc_per_node: int = 1
    nnodes: int = 1
    zero_stage: int = 2
    offload_optimizer: bool = False  # optimizer states and fp32 gradients in CPU memory (ZeRO 2/3)
    offload_params: bool = False  # bf16 parameters in CPU memory, fetched per layer (ZeRO-3 only)
    # GiB (2**30 bytes) per GPU as CUDA reports the card's total, what the memory plan is checked
    # against: torch.cuda.get_device_properties(0).total_memory / 2**30, the "total capacity" of an
    # out-of-memory message. Not the GB on the spec sheet: an "80 GB" H100 reports 79.1 (nvidia-smi:
    # 81559 MiB = 79.6 GiB, part of it held by the driver), a "141 GB" H200 139.7. 0 = unknown, no check
    gpu_memory_gb: float = 0.0
    skip_memory_check: bool = False  # train even when the memory planner says it will not fit
    precision: str = "fp32"  # fp32 | bf16 | fp16
    micro_batch: int = 1
    grad_accum: int = 1
    num_workers: int = 2  # DataLoader workers per process
    threads: int = 0  # torch CPU threads per process; 0 = torch's default (tiny models run faster on 1)
    # PRPO rollouts and eval infer decode with a static KV cache (length rounded up to 256) and
    # transformers' compiled decoding step (inductor, CUDA graphs): on one H200, 7B-shaped, G=8,
    # 8.0 ms per step against 30.3 ms with the dynamic cache, after a ~37 s compile on the first
    # call (tests/gpu/bench_decode.py). Off until validated in a full multi-step GPU run; on the
    # CPU the static cache runs uncompiled (a warning says so). `dx detect` stays dynamic.
    compiled_decode: bool = False
    # fused GPU kernels (dxcli/model/kernels.py): "none" = plain PyTorch; "liger" = Liger-Kernel's
    # RMSNorm, SwiGLU and RoPE in the LLM, and the SFT loss and the RL log-probs computed from the
    # hidden states by its fused linear cross-entropy, so the B x T x vocab logits are never built
    # (the logged entropy then comes in vocabulary chunks). Needs a CUDA GPU and
    # `pip install liger-kernel`; refused before anything loads otherwise. Off until GPU numbers
    # (tests/gpu/check_kernels.py: equality, log-prob memory) say it should be on
    kernels: str = "none"
    # sustained write speed of the run folder's disk in GB/s (1e9 bytes), all ranks of a checkpoint
    # together: only the planner reads it, to print each stage's checkpoint write time and the share
    # of training time the train.save_every_minutes cadence spends writing. 1 GB/s is a conservative
    # figure for a local NVMe or a parallel filesystem; measure yours (e.g. dd of a 10 GB file)
    checkpoint_write_gbps: float = 1.0


@dataclass
class TrainConfig:
    """Shared by every training stage."""

    epochs: float = 1.0
    max_steps: int = 0  # a cap on optimizer steps for quick runs; 0 = no cap
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    grad_checkpointing: bool = False
    seed: int = 42
    save_every: int = 0  # optimizer steps between checkpoints; 0 = by time only (and at the end)
    save_every_minutes: float = 10.0  # also checkpoint after this much training time; 0 = off
    keep_checkpoints: int = 2  # newest resumable checkpoints kept in RUN/checkpoints
    log_every: int = 1
    # experiment trackers fed by the metrics sink beside metrics.jsonl (main rank only):
    # "tensorboard" (RUN/tensorboard/) and/or "wandb" (RUN/wandb/, offline unless WANDB_MODE is set)
    report_to: list[str] = field(default_factory=list)


@dataclass
class AlignConfig:
    lr: float = 1e-3
    epochs: float | None = None  # None -> train.epochs
    bin_alpha: float = 10.0  # the head learns from the start
    # align's own ZeRO stage (0-3); None -> hardware.zero_stage. Align trains ~25M parameters
    # (projector + head) of a frozen 7B: ZeRO-3 would gather every frozen weight in each forward
    # and backward to save memory that align does not need. The hardware offload keys apply where
    # this stage allows them (optimizer offload from ZeRO-2, parameter offload under ZeRO-3 only).
    zero_stage: int | None = None


@dataclass
class InstructConfig:
    lr: float = 2e-5
    epochs: float | None = None
    bin_alpha: float = 10.0  # L = L_lm + alpha * L_bin
    unfreeze_vision: bool = False  # only for towers without pretrained weights
    vision_lr: float | None = None  # the unfrozen tower's own lr; None -> instruct.lr


@dataclass
class PrpoConfig:
    algo: str = "prpo"  # prpo | grpo
    labels: str = "gt"  # gt | majority | none
    # a group's top verdict is its pseudo-label (labels=majority) only when it holds MORE than this
    # share of all G samples, invalid ones counting against it; else the group teaches nothing
    majority_min_share: float = 0.5
    lr: float = 3e-7
    epochs: float | None = None
    group_size: int = 8  # G samples per image
    images_per_step: int = 1  # per process
    temperature: float = 1.0
    top_p: float = 0.7
    max_new_tokens: int = 1024
    beta: float = 0.01  # KL(k3) weight; 0 -> no reference model
    eps_low: float = 0.2
    eps_high: float = 0.2
    vcr_weight: float = 0.5
    pcr_weight: float = 0.5
    loss_agg: str = "token_mean"  # token_mean | seq_mean
    # which tokens carry the final paragraph's advantage: "verdict" (only the verdict word; the
    # marker and EOS take the mean of the response's other tokens) or "paragraph" (all of them, the
    # original rule); METHOD.md §11: under "paragraph" the policy learns to put off concluding
    final_credit: str = "verdict"
    # the final paragraph's PCR when the paragraphs before it give a tie or no votes (METHOD.md §9):
    # 0 (evidence-free conclusions earn nothing), 1 the original code's; 0 <= value <= 1
    pcr_no_majority: float = 0.0
    updates_per_rollout: int = 1  # optimizer steps per rollout (METHOD.md §13); > 1: the ratio moves, clipping acts
    clip: str | None = None  # VCR: CLIPModel folder/hub id or "open_clip:ARCH[:PRETRAINED_OR_FILE]"; None -> off
    lexicon: str | None = None  # PCR evidence lexicon YAML; None -> dxcli/rl/lexicon.yaml
    adv_eps: float = 1e-4
    # append each rank's rollouts ({"step", "rank", "image", "texts"}: the G responses per image) to
    # RUN/rollouts-rank{r}.jsonl, to read what the policy wrote; off by default (it grows every step)
    save_rollouts: bool = False
    # the collapse guard (METHOD.md §12): every guard_every steps (and after the last) the policy
    # answers guard_probe_size of the run's prompts greedily; when the smaller verdict class falls
    # under guard_min_class_share of the valid answers (where the start called both) or the invalid
    # rate rises by more than guard_max_invalid_rise, the run stops with the last healthy weights
    guard: bool = True
    guard_every: int = 10
    guard_probe_size: int = 16
    guard_min_class_share: float = 0.1
    guard_max_invalid_rise: float = 0.25


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class DatasetConfig:
    min_side: int = 32  # warn below this many pixels on the short side
    max_pixels: int = 89_478_485  # Pillow's decompression-bomb limit
    imbalance_ratio: float = 1.5  # warn when one label outnumbers the other by more
    workers: int = 0  # 0 = all cores


@dataclass
class DxConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    prpo: PrpoConfig = field(default_factory=PrpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)


@dataclass
class Resolved:
    config: DxConfig
    sources: dict[str, str]  # dotted key -> "default" | "profile NAME" | "--set" | "flag"
    profile: str | None
