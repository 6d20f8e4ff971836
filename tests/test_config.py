import pytest

import flashfx
from flashfx.config import Config


def test_defaults_are_valid():
    c = Config()
    assert c.attention == "exact" and c.fusion and c.remat is None and c.quantize is None


@pytest.mark.parametrize("field,value", [
    ("attention", "sparse"), ("attention", True), ("fusion", "yes"), ("autotune", 1), ("debug", None),
    ("remat", 0.0), ("remat", 1.5), ("remat", -3), ("remat", "half"), ("remat", True),
    ("remat_compress", "int8"), ("quantize", "int8"), ("cache_dir", 3),
])
def test_bad_value_names_field_value_and_choices(field, value):
    with pytest.raises(ValueError) as e:
        Config(**{field: value})
    msg = str(e.value)
    assert field in msg and repr(value) in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ValueError, match="'exact', 'off'"):
        Config(attention="flash2")


@pytest.mark.parametrize("value", [None, 0.5, 1.0, 1 << 30, "auto", "speed"])
def test_remat_accepts_fraction_bytes_auto(value):
    assert Config(remat=value).remat == value


def test_unknown_option_is_type_error_with_did_you_mean():
    with pytest.raises(TypeError, match="did you mean 'attention'"):
        Config(atention="exact")
    with pytest.raises(TypeError, match="known options"):
        Config(zzz=1)


def test_optimize_validates_options():
    import torch

    with pytest.raises(TypeError, match="did you mean 'fusion'"):
        flashfx.optimize(torch.nn.Linear(2, 2), fuson=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        flashfx.optimize(lambda x: x)


def test_replace_revalidates():
    c = Config().replace(fusion=False)
    assert c.fusion is False
    with pytest.raises(ValueError):
        c.replace(remat=2.0)


def test_small_int_remat_suggests_a_fraction():
    with pytest.raises(ValueError, match="remat=1.0"):
        Config(remat=1)
