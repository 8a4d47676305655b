import pytest

from modal_services.env_numbers import env_number
from modal_services.errors import ErrorCode, ToolboxError


def test_unset_and_blank_give_the_default():
    assert env_number("TOOLBOX_X", 16, minimum=1, maximum=64, environ={}) == 16
    assert env_number("TOOLBOX_X", 16, minimum=1, maximum=64, environ={"TOOLBOX_X": "  "}) == 16


def test_a_value_in_range_is_read_as_its_kind():
    assert env_number("TOOLBOX_X", 16, minimum=1, maximum=64, environ={"TOOLBOX_X": "2.5"}) == 2.5
    assert env_number("TOOLBOX_X", 4, minimum=1, maximum=9, whole=True, environ={"TOOLBOX_X": "7"}) == 7


@pytest.mark.parametrize("value", ["abc", "nan", "0", "65", "inf", "1e400"])
def test_a_bad_value_names_the_variable_its_range_and_default(value):
    with pytest.raises(ToolboxError) as raised:
        env_number("TOOLBOX_X", 16, minimum=1, maximum=64, environ={"TOOLBOX_X": value})
    assert raised.value.code is ErrorCode.INVALID_INPUT
    assert "TOOLBOX_X must be a number from 1 to 64 (default 16)" in raised.value.message


def test_a_whole_number_setting_refuses_a_fraction():
    with pytest.raises(ToolboxError, match="a whole number from 1 to 9"):
        env_number("TOOLBOX_X", 4, minimum=1, maximum=9, whole=True, environ={"TOOLBOX_X": "2.5"})
