"""The one table from error code to HTTP status (web/status.py): every code of the tree has its row,
a refusal is a 4xx, a dependency that is down a 503, and a code without a row takes its family's."""

from __future__ import annotations

import registration_app.authorities.escrow_crypto  # noqa: F401 - its error class joins the tree
import registration_app.authorities.kra_verify  # noqa: F401
from registration_app.core import errors
from registration_app.web.status import STATUS_OF_CODE, status_of


def every_error_class() -> list[type[errors.AutoenrollError]]:
    found, todo = [], [errors.AutoenrollError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_code_of_the_tree_has_a_row_of_its_own():
    missing = sorted({cls.code for cls in every_error_class()} - set(STATUS_OF_CODE))
    assert missing == []


def test_core_errors_carry_no_http_status():
    assert not any("status" in vars(cls) for cls in every_error_class())


def test_refusals_are_4xx_and_dependencies_503():
    assert status_of(errors.NotEntitled()) == 403
    assert status_of(errors.BadNonce()) == 401
    assert status_of(errors.BodyTooLarge()) == 413
    assert status_of(errors.RateLimited()) == 429
    assert status_of(errors.DatabaseUnavailable()) == 503
    assert status_of(errors.EscrowFailed()) == 503
    assert status_of(errors.ConfigError()) == 500


def test_a_code_without_a_row_takes_the_status_of_its_family():
    newcomer = errors.Conflict("a code added without its row")
    newcomer.code = "newcomer"
    assert status_of(newcomer) == 409
    other_side = errors.Forbidden("relayed")
    other_side.code = "a_code_only_the_other_side_knows"  # authorities/remote.py keeps the remote code
    assert status_of(other_side) == 403
