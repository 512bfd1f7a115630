# The slapd fixtures come from tests/conftest.py (`from tests.conftest_slapd import *`); until that file
# provides them, import them here so that tests/directory_sync runs on its own.
try:
    from tests.conftest import slapd as _slapd  # noqa: F401
except ImportError:
    from tests.conftest_slapd import *  # noqa: F401,F403
