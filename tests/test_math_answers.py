"""Answer extraction and matching on top of math_verify, including use from worker threads."""
from __future__ import annotations

import threading

import pytest

from sparselayer.tasks.math_answers import answers_match, extract_answer, reference_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("Total cost is 1,000 + 234.\n#### 1,234", "1234"),
        ("first #### 3 then\n#### 12,345,678", "12345678"),
        ("so the area is \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{1} and later \\boxed{2}", "2"),
        ("  42 \n", "42"),
    ],
)
def test_reference_answer_takes_final_part(text: str, expected: str) -> None:
    assert reference_answer(text) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("We get \\boxed{7} then \\boxed{\\frac{1}{2}}. Done: 3", "\\frac{1}{2}"),
        ("Reasoning 5 + 6 = 11.\n#### 11.\nExtra 99", "11"),
        ("The answer is 1,234.", "1234"),
        ("It drops to -3 degrees", "-3"),
        ("pages 10-5", "5"),
        ("pi is about 3.14159", "3.14159"),
        ("\\boxed{3", "3"),  # truncated box: fall back to the last number
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "completion, reference",
    [
        ("The total is 1,234", "#### 1234"),
        ("The total is 1234", "Adding up.\n#### 1,234"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("so 72.0 dollars", "#### 72"),
        ("\\boxed{72}", "72.0"),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        ("\\boxed{\\$18}", "18"),
        ("\\boxed{\\text{Paris}}", "paris"),
    ],
)
def test_equivalent_answers_match(completion: str, reference: str) -> None:
    assert answers_match(completion, reference)


@pytest.mark.parametrize(
    "completion, reference",
    [
        ("\\boxed{3}", "4"),
        ("The answer is 1,235", "#### 1,234"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("no answer at all", "72"),
        ("", "72"),
        ("\\boxed{}", "72"),
        ("\\boxed{72}", ""),
        ("\\boxed{72}", "   "),
    ],
)
def test_different_or_missing_answers_do_not_match(completion: str, reference: str) -> None:
    assert not answers_match(completion, reference)


def test_none_inputs_are_false_not_errors() -> None:
    assert answers_match(None, "3") is False  # type: ignore[arg-type]
    assert answers_match("\\boxed{3}", None) is False  # type: ignore[arg-type]


def test_unparseable_answers_fall_back_to_string_comparison() -> None:
    assert answers_match("\\boxed{\\text{blue whale}}", "Blue Whale")
    assert not answers_match("\\boxed{\\text{blue whale}}", "orca")


def test_power_tower_is_not_handed_to_sympy() -> None:
    # sympy would spend its whole timeout (or forever, in a thread) comparing these
    assert not answers_match("\\boxed{9^{9^{9^{9}}}}", "9^{9^{9^{8}}}")
    assert answers_match("\\boxed{9^{9^{9^{9}}}}", "9^{9^{9^{9}}}")


def test_symbolic_matching_works_in_a_worker_thread() -> None:
    # math_verify's signal-based timeouts raise outside the main thread unless disabled
    results: list[bool] = []
    worker = threading.Thread(
        target=lambda: results.extend(
            [answers_match("\\boxed{0.5}", "\\frac{1}{2}"), answers_match("\\boxed{0.4}", "\\frac{1}{2}")]
        )
    )
    worker.start()
    worker.join(timeout=30)
    assert results == [True, False]
