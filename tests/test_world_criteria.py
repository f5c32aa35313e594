"""The base criteria of the synthetic world, on a hand-made povid_eval results fixture."""

import pytest

from povid_demo.criteria import addition_counts, base_criteria, criteria_as_dict, criteria_met, criteria_table


def _caption(ground_truth, correct, hallucinated):
    return {
        "ground_truth": sorted(ground_truth),
        "correct": [[o, o] for o in correct],
        "hallucinated": [[o, o] for o in hallucinated],
    }


DETAILS = [
    _caption(["pizza"], ["pizza"], ["donut"]),  # addition: 1 mention
    _caption(["book", "kite"], ["book"], ["clock"]),  # kite not named: substitution, 1 mention
    _caption(["kite"], ["kite"], ["frisbee", "frisbee"]),  # addition: 2 mentions (repeats count)
    _caption(["pizza", "donut"], ["pizza", "donut"], []),  # no hallucination
    _caption(["clock"], [], ["donut"]),  # substitution: 1 mention
]


def _results(details, chair_i=0.08, recall=0.95, pope=None):
    pope = pope if pope is not None else {"random": 0.9, "popular": 0.85, "adversarial": 0.7}
    chair = {"metrics": {"chair_i": chair_i, "recall": recall}, "details": details}
    return chair, {"metrics": {split: {"accuracy": acc} for split, acc in pope.items()}}


def test_addition_counts_classify_captions_by_whether_every_present_object_is_named():
    assert addition_counts(DETAILS) == {
        "hallucinated_mentions": 5,
        "addition_mentions": 3,
        "hallucinating_captions": 4,
        "addition_captions": 2,
    }


def test_criteria_values_thresholds_and_verdicts():
    criteria = {c.key: c for c in base_criteria(*_results(DETAILS))}
    assert list(criteria) == [
        "pope_random_accuracy", "pope_popular_accuracy", "pope_adversarial_accuracy",
        "chair_i", "recall", "addition_share",
    ]  # fmt: skip
    assert criteria["addition_share"].value == pytest.approx(3 / 5)
    passed = {key: c.passed for key, c in criteria.items()}
    assert passed == {
        "pope_random_accuracy": True,
        "pope_popular_accuracy": True,  # exactly at the threshold passes
        "pope_adversarial_accuracy": False,
        "chair_i": True,
        "recall": True,
        "addition_share": False,
    }
    assert not criteria_met(list(criteria.values()))
    assert criteria_as_dict(list(criteria.values()))["chair_i"] == {
        "label": "CHAIR_I (long descriptions)", "value": 0.08, "threshold": 0.05, "passed": True,
    }  # fmt: skip


def test_table_states_each_result_plainly():
    table = criteria_table(base_criteria(*_results(DETAILS)))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| POPE") or "%" in line}
    assert "| 90.0 % | >= 85 % | PASS |" in rows["POPE accuracy, random"]
    assert "| 70.0 % | >= 85 % | NOT MET |" in rows["POPE accuracy, adversarial"]
    assert "| 60.0 % | >= 70 % | NOT MET |" in rows["hallucinated mentions that are additions"]
    assert "NOT MET (2 of 6): POPE accuracy, adversarial; hallucinated mentions that are additions" in table


def test_all_met_and_unmeasurable_criteria():
    good = base_criteria(*_results(DETAILS[:1] + DETAILS[2:4], pope={"random": 0.9, "popular": 0.9, "adversarial": 0.86}))
    assert criteria_met(good)
    assert "all base criteria met" in criteria_table(good)

    # No hallucination at all, and a POPE split that was not run: neither can pass.
    criteria = {c.key: c for c in base_criteria(*_results(DETAILS[3:4], chair_i=0.0, pope={"random": 0.9}))}
    assert criteria["addition_share"].value is None and not criteria["addition_share"].passed
    assert criteria["pope_adversarial_accuracy"].value is None
    assert "| n/a |" in criteria_table(list(criteria.values()))
