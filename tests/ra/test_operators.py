"""The operator's use cases (ra/operators.py) called directly, as the click commands call them, on a
real slapd and database."""

from __future__ import annotations

import pytest
from cryptography import x509
from sqlalchemy import select

from registration_app.core.errors import BadRequest, NotEntitled
from registration_app.ra import operators
from registration_app.store.models import Certificate, EnrollmentCode
from registration_app.store.repos import outbox_status
from tests.directory_sync.world import issue, make_services


@pytest.fixture(scope="module")
def services(tmp_path_factory, slapd):
    services = make_services(tmp_path_factory.mktemp("operators"), slapd.settings())
    yield services
    services.close()


def test_invite_gives_an_entitled_user_a_code_and_refuses_others(services, new_user):
    _, member = new_user(groups=("smime-users",))
    invitation = operators.invite(services, member.upper(), hours=2, operator="operator:test")
    assert invitation.email == member and invitation.code and invitation.ttl.total_seconds() == 7200
    with services.db.read() as session:
        assert session.execute(select(EnrollmentCode.email).where(EnrollmentCode.email == member)).scalar_one()
    _, outsider = new_user()
    with pytest.raises(NotEntitled):
        operators.invite(services, outsider, hours=None, operator="operator:test")


def test_revoke_revokes_once_and_publishes_the_change(services, new_user):
    _, email = new_user(groups=("smime-users",))
    issued = issue(services, email)
    assert operators.revoke(services, "0x" + issued.serial.upper(), x509.ReasonFlags.key_compromise,
                            operator="operator:test") is True
    with services.db.read() as session:
        assert session.get(Certificate, issued.serial).status == "revoked"
    assert services.directory.find_user(email).certificates == ()
    assert outbox_status(services.db)["depth"] == 0
    assert operators.revoke(services, issued.serial, x509.ReasonFlags.key_compromise,
                            operator="operator:test") is False


def test_revoke_agent_refuses_what_is_not_a_certificate(services):
    with pytest.raises(BadRequest, match="agent.pem is not a PEM certificate"):
        operators.revoke_agent(services.settings, b"not a certificate", reason="keyCompromise",
                               operator="operator:test", source="agent.pem")


def test_directory_status_shows_the_outbox_and_the_crl(services):
    services.ca.refresh_crl()
    status = operators.directory_status(services.db)
    assert status["depth"] == outbox_status(services.db)["depth"]
    assert status["crl"]["number"] >= 1 and status["crl"]["next_update"] > status["crl"]["this_update"]
