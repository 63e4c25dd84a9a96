"""The arithmetic task and its checkers, and loading a reward function by name."""

import pytest

from minigpt.finetuning.reward_tasks import answer_format, arithmetic_task, correct_answer, load_reward, load_task


def test_correct_answer_checks_exactly():
    assert correct_answer("7 + 12 = ", "19") == 1.0
    assert correct_answer("7 + 12 = ", " 19 ") == 1.0  # spaces around the number are not the model's error
    assert correct_answer("7 + 12 = ", "19.") == 0.0
    assert correct_answer("7 + 12 = ", "019") == 0.0
    assert correct_answer("7 + 12 = ", "20") == 0.0
    assert correct_answer("max(7, 12) = ", "12") == 1.0
    assert correct_answer("max(7, 12) = ", "7") == 0.0
    with pytest.raises(ValueError, match="form 'a \\+ b = ' or 'max\\(a, b\\) = '"):
        correct_answer("seven plus twelve", "19")


def test_answer_format_wants_a_bare_integer():
    assert answer_format("", " 42") == 1.0
    assert answer_format("", "-3") == 1.0
    for answer in ("", "42 + 1 = 43", "forty-two", "4 2"):
        assert answer_format("", answer) == 0.0


def test_arithmetic_split_is_fixed_disjoint_and_complete():
    task = arithmetic_task("add", max_operand=9, test_share=0.25, seed=3)
    assert (len(task.train), len(task.test)) == (75, 25)
    prompts = {p.prompt for p in task.train + task.test}
    assert len(prompts) == 100 and not {p.prompt for p in task.train} & {p.prompt for p in task.test}
    assert task.test == arithmetic_task("add", max_operand=9, test_share=0.25, seed=3).test  # same seed, same split
    assert task.test != arithmetic_task("add", max_operand=9, test_share=0.25, seed=4).test
    assert all(correct_answer(p.prompt, p.answer) == 1.0 for p in task.train + task.test)
    assert load_task("arithmetic").accuracy_reward == "correct"
    assert len(load_task("larger").test) == 80 and load_task("larger").test[0].prompt.startswith("max(")
    with pytest.raises(ValueError, match="unknown task 'algebra'; choose one of arithmetic"):
        load_task("algebra")


def test_load_reward_by_name():
    assert load_reward("minigpt.finetuning.reward_tasks:correct_answer") is correct_answer


@pytest.mark.parametrize(("spec", "message"), [
    ("correct_answer", "not of the form module:function"),
    ("minigpt.finetuning.reward_tasks:", "not of the form module:function"),
    ("no_such_module_here:f", "cannot import module 'no_such_module_here'"),
    ("minigpt.finetuning.reward_tasks:nope", "minigpt.finetuning.reward_tasks has no attribute 'nope'"),
    ("minigpt.finetuning.reward_tasks:OPERATIONS", "OPERATIONS is a dict, not a function"),
])
def test_load_reward_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward(spec)
