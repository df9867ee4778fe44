import pytest
from pydantic import BaseModel, ConfigDict

from medfed.registry import Registry, UnknownComponentError


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = 1


def make() -> Registry[tuple[str, int]]:
    reg: Registry[tuple[str, int]] = Registry("widget")
    reg.register("a", options=Opts)(lambda o: ("a", o.k))
    reg.register("plain")(lambda: ("plain", 0))
    return reg


def test_duplicate_registration_raises():
    reg = make()
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(lambda: ("x", 0))


def test_create_validates_options_and_lists_names():
    reg = make()
    assert reg.create("a", {"k": 3}) == ("a", 3)
    assert reg.create("a") == ("a", 1)
    assert reg.create("plain") == ("plain", 0)
    with pytest.raises(ValueError, match="invalid options for widget 'a'"):
        reg.create("a", {"kk": 3})
    with pytest.raises(ValueError, match="takes no options"):
        reg.create("plain", {"k": 1})
    with pytest.raises(UnknownComponentError, match="unknown widget 'b'; allowed: a, plain"):
        reg.create("b")
    assert reg.names() == ["a", "plain"] and "a" in reg and "b" not in reg
