"""PRPO and GRPO building blocks (METHOD.md §7-§13).

- `paragraphs`: split a response into paragraphs with character spans and map generated tokens
  onto them (every token belongs to exactly one paragraph).
- `rewards`: keywords (YAKE), the evidence lexicons (`lexicon.yaml`), paragraph labels with
  negation, the Prediction Consistency Reward, the paragraph reward from PCR and VCR.
- `clip`: the Visual Consistency Reward's frozen CLIP (transformers' CLIPModel or open_clip).
- `objective`: paragraph / GRPO advantages and the token-level clipped surrogate with k3 KL.
- `explain`: the per-paragraph breakdown behind `dx eval rewards`.
"""
