"""PRPO and GRPO building blocks (METHOD.md §7-§13).

- `paragraphs`: split a response into paragraphs with character spans and map generated tokens
  onto them (every token belongs to exactly one paragraph).
- `rewards`: keywords (YAKE), the evidence lexicons (`lexicon.yaml`), paragraph labels with
  negation, the Prediction Consistency Reward, the Visual Consistency Reward (a frozen CLIP).
- `objective`: paragraph / GRPO advantages and the token-level clipped surrogate with k3 KL.
- `explain`: the per-paragraph breakdown behind `dx eval rewards`.
"""
