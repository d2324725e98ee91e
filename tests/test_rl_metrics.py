"""RL metrics reduced over ranks: every rank sends the same keys in the same order (a collective
over tensors of different lengths mixes values under gloo and hangs NCCL), and metrics only some
ranks have (accuracies over labelled images) are pooled as (sum, count) pairs."""

from __future__ import annotations

import threading

import pytest
import torch

from dxcli import config
from dxcli.rl.rewards import load_lexicon
from dxcli.runtime import dist as distmod
from dxcli.runtime.dist import Dist, MetricKeys, Ratio, reduce_metrics
from helpers_rl import scripted_generate, text_bundle

KEYS = MetricKeys(means=("reward", "loss"), ratios=("answer_accuracy", "pseudo_label_accuracy"), same=("step",))


def reduce_on_ranks(rows: list[dict], keys: MetricKeys, monkeypatch) -> list[dict]:
    """Run `reduce_metrics` on len(rows) threads, one per rank, over a fake all-reduce that, like
    a real one, waits for every rank and sums their vectors; it refuses vectors of different
    lengths (where gloo would silently mix metrics and NCCL would hang)."""
    world = len(rows)
    sent: dict[int, list[float]] = {}
    meet = threading.Barrier(world)

    def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
        sent[dist.rank] = list(values)
        meet.wait()
        if len({len(v) for v in sent.values()}) != 1:
            raise AssertionError(f"ranks sent vectors of different lengths: {sent}")
        return [sum(column) for column in zip(*(sent[r] for r in range(world)))]

    monkeypatch.setattr(distmod, "all_reduce_sum", all_reduce_sum)
    results: list[dict | BaseException] = [{}] * world

    def run(rank: int) -> None:
        try:
            results[rank] = reduce_metrics(rows[rank], keys, Dist(rank, world, rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            results[rank] = exc
            meet.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    errors = [result for result in results if isinstance(result, BaseException)]
    if errors:  # the rank that failed, not the one its abort woke up
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


def row(reward: float, loss: float, answers: tuple[float, float], pseudo: tuple[float, float]) -> dict:
    return {"step": 4, "reward": reward, "answer_accuracy": Ratio(*answers), "loss": loss,
            "pseudo_label_accuracy": Ratio(*pseudo)}


def test_a_metric_only_one_rank_has_is_that_ranks_value_on_every_rank(monkeypatch):
    labelled = row(0.5, 1.0, answers=(3, 4), pseudo=(1, 1))
    unlabelled = row(0.25, 3.0, answers=(0, 0), pseudo=(0, 0))
    rank0, rank1 = reduce_on_ranks([labelled, unlabelled], KEYS, monkeypatch)
    assert rank0 == rank1  # every rank logs (and decides on) the same row
    assert rank0 == {"step": 4, "reward": 0.375, "answer_accuracy": 0.75, "loss": 2.0, "pseudo_label_accuracy": 1.0}
    assert list(rank0) == list(labelled)  # the row keeps its order


def test_ratios_pool_their_counts_over_ranks(monkeypatch):
    """5 of 12 labelled answers right: 5/12, not the mean of the ranks' 1/4 and 4/8."""
    rows = [row(0.0, 0.0, answers=(1, 4), pseudo=(0, 1)), row(0.0, 0.0, answers=(4, 8), pseudo=(2, 2))]
    result, _ = reduce_on_ranks(rows, KEYS, monkeypatch)
    assert result["answer_accuracy"] == pytest.approx(5 / 12)
    assert result["pseudo_label_accuracy"] == pytest.approx(2 / 3)


def test_a_step_without_any_labelled_image_logs_no_accuracy(monkeypatch):
    rows = [row(1.0, 1.0, answers=(0, 0), pseudo=(0, 0)), row(1.0, 1.0, answers=(0, 0), pseudo=(0, 0))]
    for result in reduce_on_ranks(rows, KEYS, monkeypatch):
        assert result == {"step": 4, "reward": 1.0, "loss": 1.0}


def test_a_row_that_does_not_match_its_keys_fails_before_the_collective(monkeypatch):
    monkeypatch.setattr(distmod, "all_reduce_sum", lambda *a: pytest.fail("reached the collective"))
    good = row(0.0, 0.0, answers=(0, 0), pseudo=(0, 0))
    with pytest.raises(ValueError, match=r"unknown \['vcr'\]"):  # a metric nobody declared
        reduce_metrics({**good, "vcr": 0.5}, KEYS, Dist(0, 2, 0))
    with pytest.raises(ValueError, match=r"missing \['loss'\]"):
        reduce_metrics({k: v for k, v in good.items() if k != "loss"}, KEYS, Dist(0, 2, 0))
    with pytest.raises(TypeError, match="answer_accuracy"):  # a local mean cannot be pooled
        reduce_metrics({**good, "answer_accuracy": 0.5}, KEYS, Dist(0, 2, 0))


def test_one_process_reduces_to_its_own_values():
    result = reduce_metrics(row(0.5, 2.0, answers=(1, 2), pseudo=(0, 0)), KEYS, Dist())
    assert result == {"step": 4, "reward": 0.5, "answer_accuracy": 0.5, "loss": 2.0}


# two images of four samples each; the first is labelled "fake", the second not
TEXTS = ["### Answer: fake", "### Answer: fake", "### Answer: fake", "no verdict here",
         "### Answer: real", "### Answer: real", "### Answer: real", "### Answer: fake"]


@pytest.mark.parametrize("algo", ["prpo", "grpo"])
def test_rollout_reports_accuracies_as_ratios_over_the_labelled_images(monkeypatch, algo):
    from dxcli.training import rollout as rollout_mod

    monkeypatch.setattr(rollout_mod, "generate", scripted_generate(TEXTS))
    cfg = config.resolve("cpu-tiny", [f"prpo.algo={algo}", "prpo.group_size=4", "prpo.labels=majority"]).config.prpo
    images = [torch.zeros(1)] * 2  # never looked at: generation is scripted and there is no CLIP

    def stats(labels: list[str | None]) -> dict:
        return rollout_mod.rollout(text_bundle(TEXTS), images, ["q", "q"], labels, cfg=cfg, clip=None,
                                   lexicon=load_lexicon(), seed=0).stats

    partly = stats(["fake", None])
    assert partly["answer_accuracy"] == Ratio(3.0, 4.0)  # 3 of the labelled image's 4 answers
    assert partly["pseudo_label_accuracy"] == Ratio(1.0, 1.0)  # its majority (3 of 4) is "fake"
    assert stats([None, None])["answer_accuracy"] == Ratio(0.0, 0.0)
    both = stats(["fake", "fake"])
    assert (both["answer_accuracy"], both["pseudo_label_accuracy"]) == (Ratio(4.0, 8.0), Ratio(1.0, 2.0))
    # the keys are the config's, not the data's: the loop declares them up front
    means, ratios = rollout_mod.rollout_stat_keys(cfg, vcr=False)
    assert set(partly) == set(means) | set(ratios)
