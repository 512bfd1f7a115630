import pytest

from tests.auth.helpers import Nonces, World, world


@pytest.fixture
def w() -> World:
    return world()


@pytest.fixture
def nonces() -> Nonces:
    return Nonces()
