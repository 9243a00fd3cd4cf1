"""The recipe helpers shared by the ledger and branch comparison."""
from mlx_ar.recipe import ABSENT, recipe_diff, same_value


def test_same_value_treats_json_round_trips_as_equal_but_not_int_and_float():
    assert same_value((0.8, 0.95), [0.8, 0.95])
    assert not same_value(1, 1.0) and not same_value(True, 1)


def test_recipe_diff_names_changed_added_and_removed_keys_in_order():
    a = {"DEPTH": 4, "BETAS": (0.8, 0.95), "OLD": 1}
    b = {"DEPTH": 6, "BETAS": [0.8, 0.95], "NEW": "x"}
    diff = recipe_diff(a, b)
    assert list(diff) == ["DEPTH", "OLD", "NEW"]
    assert diff["DEPTH"] == (4, 6) and diff["OLD"] == (1, ABSENT) and diff["NEW"] == (ABSENT, "x")
    assert recipe_diff(a, b, missing=None)["NEW"] == (None, "x")
    assert recipe_diff(a, dict(a)) == {}


def test_arithmetic_that_cannot_be_computed_is_a_recipe_error_not_a_traceback():
    import pytest

    from mlx_ar.recipe import RecipeError, parse_recipe, parse_value

    with pytest.raises(RecipeError, match=r"train.py:2: LR = `1 / 0`: cannot compute it: division by zero"):
        parse_recipe("DEPTH = 4\nLR = 1 / 0\n")
    with pytest.raises(RecipeError, match="cannot compute it"):
        parse_recipe("BIG = 1e300 ** 2\n")
    with pytest.raises(ValueError, match="cannot compute it"):
        parse_value("2 % 0")
