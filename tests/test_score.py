"""`dx eval score`: metrics equal scikit-learn's under the null-flip rule (METHOD.md §6)."""

import json
import random
import re
import sys

import pytest
from rich.console import Console
import numpy as np
from scipy.optimize import brentq
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score,
                             confusion_matrix, precision_recall_fscore_support, roc_auc_score,
                             roc_curve)
from typer.testing import CliRunner

from dxcli.cli import main as cli_main
from dxcli.base.errors import DxError
from dxcli.evaluation import score as scoring
from dxcli.evaluation.report import print_summary

DOMAINS = ("ddim", "pixart", "sd", "stylegan")
SCALAR_KEYS = ("accuracy", "precision", "recall", "f1", "accuracy_valid", "precision_valid",
               "recall_valid", "f1_valid", "invalid", "invalid_rate", "head_auc",
               "head_accuracy", "agreement", "n", "n_valid", "n_head", "balanced_accuracy", "ap",
               "eer")
runner = CliRunner()


def random_answers(seed: int, n: int = 400):
    """(answer lines, verdicts) where verdicts is what each line means, known without parsing."""
    rng = random.Random(seed)
    lines, verdicts = [], []
    for i in range(n):
        label = rng.choice(["real", "fake"])
        verdict = rng.choice([label, label, "real", "fake", None])  # ~20% null
        line = {"question_id": f"q{i}", "image": f"img{i}.png", "domain": rng.choice(DOMAINS),
                "label": label, "model": "tiny"}
        if rng.random() < 0.5:
            line["predict"] = verdict
            line["text"] = "ignored when predict is present: Answer: real"
        else:  # no `predict`: the verdict must come from the text
            line["text"] = (f"**Skin**: smooth.\n\n### Answer: {verdict.capitalize()}."
                            if verdict else "I can't tell whether it is real or fake.")
        if rng.random() < 0.8:
            mean = 0.65 if label == "fake" else 0.35
            line["head_prob"] = min(1.0, max(0.0, rng.gauss(mean, 0.2)))
        else:
            line["head_prob"] = None
        lines.append(line)
        verdicts.append(verdict)
    return lines, verdicts


def write_jsonl(path, lines, tail=""):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    return path


def sklearn_expected(lines, verdicts):
    """Every figure straight from scikit-learn, with null scored as the opposite label."""
    y = [int(line["label"] == "fake") for line in lines]
    pred = [1 - t if v is None else int(v == "fake") for t, v in zip(y, verdicts)]
    valid = [(t, int(v == "fake")) for t, v in zip(y, verdicts) if v is not None]
    expected = {"n": len(y), "n_valid": len(valid), "invalid": len(y) - len(valid),
                "invalid_rate": (len(y) - len(valid)) / len(y),
                "accuracy": accuracy_score(y, pred),
                "balanced_accuracy": balanced_accuracy_score(y, pred),
                "confusion": confusion_matrix(y, pred, labels=[0, 1]).tolist()}
    p, r, f, _ = precision_recall_fscore_support(y, pred, average="binary", zero_division=0)
    expected.update(precision=p, recall=r, f1=f)
    if valid:
        yv, pv = zip(*valid)
        p, r, f, _ = precision_recall_fscore_support(yv, pv, average="binary", zero_division=0)
        expected.update(accuracy_valid=accuracy_score(yv, pv), precision_valid=p,
                        recall_valid=r, f1_valid=f)
    else:
        expected.update(dict.fromkeys(["accuracy_valid", "precision_valid", "recall_valid",
                                       "f1_valid"]))
    head = [(t, line["head_prob"], v) for t, line, v in zip(y, lines, verdicts)
            if line["head_prob"] is not None]
    ht = [t for t, _, _ in head]
    hp = [p for _, p, _ in head]
    expected["n_head"] = len(head)
    both_classes = len(set(ht)) == 2
    expected["head_auc"] = roc_auc_score(ht, hp) if both_classes else None
    expected["ap"] = average_precision_score(ht, hp) if both_classes else None
    expected["eer"] = eer_by_root_finding(ht, hp) if both_classes else None
    expected["head_accuracy"] = accuracy_score(ht, [int(p >= 0.5) for p in hp]) if head else None
    both = [(int(v == "fake"), int(p >= 0.5)) for _, p, v in head if v is not None]
    expected["agreement"] = accuracy_score(*zip(*both)) if both else None
    return expected


def eer_by_root_finding(truth, probs):
    """The usual recipe, independent of the code under test: the root of 1 - x - tpr(x)."""
    fpr, tpr, _ = roc_curve(truth, probs)
    return brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0, xtol=1e-12)


def assert_matches(got, expected):
    for key in SCALAR_KEYS:
        if expected[key] is None:
            assert got[key] is None, key
        else:
            # the EER reference is a numerical root, exact to its tolerance only
            tolerance = 1e-9 if key == "eer" else 1e-12
            assert got[key] == pytest.approx(expected[key], abs=tolerance), key
    assert got["confusion"] == expected["confusion"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_equals_sklearn_overall_and_per_domain(tmp_path, seed):
    lines, verdicts = random_answers(seed)
    result = scoring.score_file(write_jsonl(tmp_path / "answers.jsonl", lines))

    assert set(result) == {"overall", "domains", "errors"} and result["errors"] == 0
    assert_matches(result["overall"], sklearn_expected(lines, verdicts))
    assert set(result["domains"]) == set(DOMAINS)
    for domain in DOMAINS:
        picked = [i for i, line in enumerate(lines) if line["domain"] == domain]
        expected = sklearn_expected([lines[i] for i in picked], [verdicts[i] for i in picked])
        assert_matches(result["domains"][domain], expected)


def test_null_is_scored_as_the_opposite_label():
    rows = [{"label": "fake", "predict": None}, {"label": "real", "predict": None},
            {"label": "fake", "predict": "fake"}, {"label": "real", "predict": "real"}]
    metrics = scoring.compute_metrics(rows)
    # the null fake becomes a false negative, the null real a false positive
    assert metrics["confusion"] == [[1, 1], [1, 1]]
    assert metrics["accuracy"] == 0.5 and metrics["accuracy_valid"] == 1.0
    assert metrics["invalid"] == 2 and metrics["invalid_rate"] == 0.5


def test_metrics_are_none_safe_without_valid_answers_or_head():
    metrics = scoring.compute_metrics([{"label": "fake", "predict": None},
                                       {"label": "fake", "predict": None, "head_prob": 0.9}])
    assert metrics["accuracy"] == 0.0 and metrics["n_valid"] == 0
    assert metrics["f1_valid"] is None and metrics["accuracy_valid"] is None
    assert metrics["head_auc"] is None and metrics["ap"] is None  # one class only
    assert metrics["eer"] is None
    assert metrics["head_accuracy"] == 1.0 and metrics["n_head"] == 1
    assert metrics["agreement"] is None  # no row with both a verdict and a head


def test_eer_by_hand_on_a_small_case():
    # real (0): 0.2, 0.5   fake (1): 0.5, 0.8   -- one real and one fake tie at 0.5.
    # ROC points, threshold from high to low (fpr = share of reals >= t, tpr = of fakes):
    #   t = inf: (0, 0)      t = 0.8: (0, 1/2)      t = 0.5: (1/2, 1)      t = 0.2: (1, 1)
    # fnr - fpr = 1 - tpr - fpr at those points: 1, 1/2, -1/2, -1. It changes sign on the
    # segment from (0, 1/2) to (1/2, 1), halfway along it (1/2 -> -1/2), i.e. at
    # fpr = 1/4, tpr = 3/4, fnr = 1/4: EER = 0.25.
    assert scoring.equal_error_rate([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.8]) == pytest.approx(0.25)
    # real: 0.1, 0.4   fake: 0.6, 0.9 -- perfectly separated: ROC (0,0) (0,1/2) (0,1) (1/2,1)
    # (1,1); fnr - fpr reaches 0 exactly at (0, 1): EER = 0.
    assert scoring.equal_error_rate([0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9]) == 0.0
    # every fake below every real: ROC (0,0) (1/2,0) (1,0) (1,1/2) (1,1); the gap 1, 1/2, 0
    # hits 0 at (1, 0): fpr = fnr = 1.
    assert scoring.equal_error_rate([1, 1, 0, 0], [0.1, 0.4, 0.6, 0.9]) == 1.0


def test_group_by_another_field(tmp_path):
    lines, _ = random_answers(3, n=60)
    for i, line in enumerate(lines):
        line["model"] = "a" if i % 3 else "b"
    result = scoring.score_file(write_jsonl(tmp_path / "a.jsonl", lines), by="model")
    assert set(result["domains"]) == {"a", "b"}
    assert sum(m["n"] for m in result["domains"].values()) == result["overall"]["n"] == 60


def test_group_by_a_field_no_line_has_is_one_line_usage_error(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", random_answers(11, n=20)[0])
    monkeypatch.setattr(sys, "argv", ["dx", "eval", "score", str(path), "--by", "nofield"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main.run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "'nofield'" in err and "domain" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_json_single_file(tmp_path):
    lines, _ = random_answers(4, n=120)
    path = write_jsonl(tmp_path / "answers.jsonl", lines)
    result = runner.invoke(cli_main.app, ["eval", "score", str(path), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert set(printed) == {"overall", "domains", "errors"}
    assert printed == json.loads(json.dumps(scoring.score_file(path)))
    assert {"n", "accuracy", "precision", "recall", "f1", "invalid", "accuracy_valid",
            "f1_valid", "head_auc", "confusion"} <= set(printed["overall"])


def test_cli_several_files_side_by_side(tmp_path):
    paths = [write_jsonl(tmp_path / f"run{seed}.jsonl", random_answers(seed, n=80)[0])
             for seed in (5, 6)]
    result = runner.invoke(cli_main.app, ["eval", "score", *map(str, paths), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert list(printed) == ["files"] and list(printed["files"]) == [str(p) for p in paths]
    for path in paths:
        assert printed["files"][str(path)] == json.loads(json.dumps(scoring.score_file(path)))

    table = runner.invoke(cli_main.app, ["eval", "score", *map(str, paths)])
    assert table.exit_code == 0, table.output
    assert f"A = {paths[0]}" in table.stdout and f"B = {paths[1]}" in table.stdout


def test_summary_table_shows_domains_and_overall(tmp_path):
    lines, _ = random_answers(7, n=100)
    result = scoring.score_file(write_jsonl(tmp_path / "a.jsonl", lines))
    console = Console(record=True, width=140)
    print_summary(result, console)
    text = console.export_text()
    for name in (*DOMAINS, "overall"):
        assert name in text
    overall = result["overall"]
    assert f"{100 * overall['f1']:.1f}" in text and f"{100 * overall['head_auc']:.1f}" in text


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = json.dumps({"label": "real", "predict": "real"})
    path.write_text(f"{good}\n\n{{not json\n{good}\n")
    with pytest.raises(DxError, match=re.escape(f"{path}:3: malformed")):
        scoring.load_answers(path)


@pytest.mark.parametrize("bad, field", [({"label": "maybe", "predict": "real"}, "label"),
                                         ({"predict": "real"}, "label"),
                                         ({"label": "real", "predict": "yes"}, "predict"),
                                         ({"label": "real", "head_prob": 1.5}, "head_prob")])
def test_bad_field_names_the_line(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "answers.jsonl", [{"label": "fake", "predict": "fake"}, bad])
    with pytest.raises(DxError, match=re.escape(f"{path}:2: `{field}`")):
        scoring.load_answers(path)


def test_torn_last_line_is_skipped_with_a_warning(tmp_path):
    lines, _ = random_answers(8, n=30)
    path = write_jsonl(tmp_path / "answers.jsonl", lines, tail='{"question_id": "q30", "lab')
    assert scoring.torn_tail(path)
    assert len(scoring.load_answers(path)) == 30
    result = runner.invoke(cli_main.app, ["eval", "score", str(path), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["overall"]["n"] == 30
    assert "torn last line" in result.stderr
    assert not scoring.torn_tail(write_jsonl(tmp_path / "whole.jsonl", lines))


def test_cli_errors_are_one_red_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"label": "real", "predict": "real"}\n[1, 2\n')
    for argv, needle, code in (([str(tmp_path / "missing.jsonl")], "no such file", 2), ([str(bad)], ":2:", 1)):
        monkeypatch.setattr(sys, "argv", ["dx", "eval", "score", *argv])
        with pytest.raises(SystemExit) as exit_info:
            cli_main.run()
        assert exit_info.value.code == code
        err = capsys.readouterr().err
        assert needle in err and err.startswith("error:") and "Traceback" not in err


def test_plot_writes_a_png(tmp_path):
    paths = [write_jsonl(tmp_path / f"run{seed}.jsonl", random_answers(seed, n=60)[0])
             for seed in (9, 10)]
    out = tmp_path / "plots" / "score.png"
    result = runner.invoke(cli_main.app, ["eval", "score", *map(str, paths), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_that_cannot_be_written_comes_after_the_table(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", random_answers(12, n=40)[0])
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the plot's folder should be")  # fails even as root
    out = blocker / "roc.png"
    monkeypatch.setattr(sys, "argv", ["dx", "eval", "score", str(path), "--plot", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli_main.run()
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "overall" in captured.out and "head" in captured.out  # the table came first
    assert captured.err.startswith("error:") and str(out) in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    with pytest.raises(DxError, match=r"pip install 'dxcli\[plot\]'"):
        scoring.plot([{"label": "fake", "predict": "fake", "head_prob": 0.9}],
                     tmp_path / "x.png")


def test_head_accuracy_counts_a_probability_of_exactly_one_half_as_fake():
    rows = [{"question_id": i, "label": label, "predict": label, "head_prob": prob, "domain": "d"}
            for i, (label, prob) in enumerate([("fake", 0.5), ("real", 0.2), ("fake", 0.9), ("real", 0.1)])]
    assert scoring.score_rows(rows)["overall"]["head_accuracy"] == 1.0


def test_rows_whose_image_was_not_read_are_left_out_of_the_figures():
    rows = [{"question_id": 1, "label": "fake", "predict": "fake", "head_prob": 0.9, "domain": "d"},
            {"question_id": 2, "label": "real", "predict": "real", "head_prob": 0.1, "domain": "d"},
            {"question_id": 3, "label": "real", "predict": None, "head_prob": None, "domain": "d",
             "error": "FileNotFoundError: x.png"}]
    result = scoring.score_rows(rows)
    assert result["errors"] == 1 and result["overall"]["n"] == 2 and result["overall"]["invalid"] == 0
    assert result["overall"]["confusion"] == [[1, 0], [0, 1]]
