"""Hand-labelled sentences for the PCR evidence rules (METHOD.md §9): plain data, imported by
tests/test_reward_rules.py and tests/bench/bench_negation_probes.py.

Each probe is one sentence written the way a model's forensic reasoning reads, with the label a
careful human reader gives it: "real" when the sentence is evidence of a real image, "fake" when
it is evidence of a fake one, None when it is neither or weighs both equally. The labels say what
the sentence means, whatever any matching rule makes of it; several probes are missed by every
rule on purpose (they show what a keyword count cannot read).
"""

from __future__ import annotations

from typing import NamedTuple


class Probe(NamedTuple):
    text: str
    label: str | None
    why: str  # what the probe checks


NEGATION_PROBES: tuple[Probe, ...] = (
    # negator right before the term
    Probe("There are no visible artifacts.", "real", "negator two words before"),
    Probe("It isn't natural.", "fake", "n't right before"),
    Probe("The skin is not overly smooth.", "real", "negated multi-word term"),
    Probe("There are no inconsistencies in the lighting.", "real", "negated plural"),
    Probe("The image does not look fake.", "real", "negated verdict word"),
    Probe("The skin isn't unnaturally smooth.", "real", "negated negative term"),
    # negator further away inside the same clause
    Probe("The texture does not appear to be natural.", "fake", "negator four words before"),
    Probe("There are no signs of manipulation.", "real", "negator three words before"),
    Probe("There is no evidence of any manipulation or tampering.", "real",
          "negator four words before; 'tampering' is not a term"),
    Probe("Neither the eyes nor the mouth show any distortion.", "real",
          "'nor' four words before"),
    # one negator governing two terms
    Probe("Edges are sharp, without any warping or distortion.", "real",
          "'without' reaches the second term of a list"),
    Probe("The hair strands are never blurred or smudged.", "real", "'never' over two terms"),
    Probe("The skin does not look waxy or plastic.", "real", "'not' over two terms"),
    Probe("The skin lacks pores and fine detail.", "fake", "'lacks' over two real terms"),
    Probe("The face shows a lack of natural pores.", "fake", "multi-word negator over two terms"),
    Probe("The skin is free of any distortion.", "real", "multi-word negator 'free of'"),
    # negators in another clause must not reach the term
    Probe("No artifacts; the skin is natural.", "real", "negator before a semicolon"),
    Probe("The background is not in focus, and the skin texture looks natural.", "real",
          "negator in the previous clause"),
    Probe("Although there is no obvious blur, the edges look warped.", "fake",
          "negator in a subordinate clause"),
    Probe("I cannot find any artifacts, and the lighting is consistent.", "real",
          "negator reaches the first term, not the second"),
    Probe("No warping is visible, and the edges are crisp and natural.", "real",
          "negator at the start, real term in the next clause"),
    Probe("Without a doubt, the lighting is inconsistent.", "fake", "'without' in an idiom"),
    Probe("The reflections in the eyes do not match, which is unnatural.", "fake",
          "negated verb, then a term in a relative clause"),
    Probe("The edges do not show any halo, and the colors are natural.", "real",
          "negated term, then a real term in the next clause"),
    Probe("The teeth do not line up, and the gums look artificial.", "fake",
          "negated verb, fake term in the next clause"),
    # negators a few words away inside the same clause that do negate the term
    Probe("Not a single pore is visible on the cheeks.", "fake", "'not a single' before the term"),
    Probe("The eyes are not symmetric and look deformed.", "fake",
          "'not' negates 'symmetric', not 'deformed'"),
    Probe("There's no way this skin texture is natural.", "fake", "'no way' six words before"),
    Probe("The face does not have the uncanny smoothness typical of generated images.", "real",
          "'not' over a term and a second one six words later"),
    # far-away negators inside the same clause, and negators that negate nothing
    Probe("There is no doubt that the skin shows clear warping artifacts.", "fake",
          "'no doubt' is far from the terms and does not negate them"),
    Probe("There is no question that the lighting is inconsistent.", "fake",
          "'no question' six words before affirms"),
    Probe("I see no reason to doubt that the lighting is natural.", "real",
          "'no reason to doubt' affirms"),
    Probe("The image is not only blurry but also shows warping around the jaw.", "fake",
          "'not only ... but also' affirms both"),
    # what a keyword count cannot read
    Probe("Nothing about the lighting looks unnatural.", "real", "'nothing' is not a negator"),
    Probe("The pores are not visible.", "fake", "negation after the term"),
    Probe("Artifacts are absent.", "real", "negation by a predicate adjective"),
    Probe("Far from being natural, the skin looks waxy.", "fake", "'far from' negates"),
    Probe("It is hard to say whether the texture is natural or not.", None, "undecided"),
)
