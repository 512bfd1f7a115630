"""web/public.py /health: 503 naming the failing part when the directory refuses our bind or is down,
on a private slapd of this module (its service password changed, then the server stopped)."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from bench.client import peer_environ
from bench.platform import cli
from directory_sync.slapd import SERVICE_DN, PrivateSlapd
from registration_app.settings import load_settings
from registration_app.web.app import create_app
from registration_app.wiring import build_services
from tests.ldap_admin import MODIFY_REPLACE, LdapAdmin


@pytest.fixture(scope="module")
def own_slapd(tmp_path_factory):
    """A slapd of this module only: its tests change the service password and stop it."""
    instance = PrivateSlapd(tmp_path_factory.mktemp("health-slapd"))
    instance.start()
    instance.load_demo()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def initialised(tmp_path_factory, own_slapd):
    folder = tmp_path_factory.mktemp("health")
    config = folder / "autoenroll.toml"
    config.write_text(f'data_dir = "data"\n[ldap]\nurl = "{own_slapd.url}"\ntimeout_seconds = 2.0\n')
    cli("autoenroll", "--config", str(config), "init")
    return load_settings(config, environ={})


@pytest.fixture
def server(initialised):
    """The application in this process with a health cache whose clock the test moves."""
    services = build_services(initialised, run_migrations=False)
    app = create_app(initialised, services)
    clock = [1000.0]
    app.extensions["autoenroll.health"].clock = lambda: clock[0]
    agent = x509.load_pem_x509_certificate(initialised.path("agent.pem").read_bytes()).public_bytes(Encoding.DER)

    class Server:
        def get(self, *, as_agent: bool = False):
            clock[0] += 60  # past the cache
            answer = app.test_client().get("/health", environ_base=peer_environ(agent) if as_agent else {})
            return answer.status_code, answer.get_json()

    try:
        yield Server(), services
    finally:
        services.close()


def set_service_password(slapd: PrivateSlapd, password: str) -> None:
    with LdapAdmin.for_slapd(slapd) as admin:
        assert admin.modify(SERVICE_DN, {"userPassword": [(MODIFY_REPLACE, [password])]}), admin.result


def test_health_is_up_when_database_directory_and_key_store_answer(server):
    client, _services = server
    assert client.get() == (200, {"status": "up"})
    status, body = client.get(as_agent=True)
    assert status == 200 and body["status"] == "up"
    assert (body["checks"]["database"], body["checks"]["directory"], body["checks"]["key_store"]) == ("ok", "ok", "ok")
    assert body["checks"]["outbox"]["depth"] == 0


def test_health_is_503_naming_the_directory_when_it_refuses_a_bind_the_pool_made_before(server, own_slapd):
    """The pool's connection was bound with the old password and still searches: only a new bind shows
    that the next connection (after a restart, or when the pool grows) would be refused."""
    client, services = server
    assert services.directory.find_user("alice@example.org") is not None  # a pooled connection, bound now
    set_service_password(own_slapd, "rotated-elsewhere")
    try:
        assert services.directory.find_user("alice@example.org") is not None  # the old binding still works
        assert client.get() == (503, {"status": "down", "failing": ["directory"]})
        status, body = client.get(as_agent=True)
        assert (status, body["failing"], body["checks"]["database"]) == (503, ["directory"], "ok")
        assert body["checks"]["directory"] == "error: The LDAP directory refused the service account's bind"
    finally:
        set_service_password(own_slapd, own_slapd.service_password)
    assert client.get() == (200, {"status": "up"})


def test_health_is_503_naming_the_directory_when_the_settings_hold_a_wrong_password(initialised):
    wrong = dataclasses.replace(initialised, ldap=dataclasses.replace(initialised.ldap, password="not-it"))
    services = build_services(wrong, run_migrations=False)
    try:
        answer = create_app(wrong, services).test_client().get("/health")
    finally:
        services.close()
    assert (answer.status_code, answer.get_json()) == (503, {"status": "down", "failing": ["directory"]})


def test_health_is_503_naming_the_directory_while_slapd_is_stopped_and_200_once_it_is_back(server, own_slapd):
    client, _services = server
    own_slapd.stop()
    try:
        assert client.get() == (503, {"status": "down", "failing": ["directory"]})
        status, body = client.get(as_agent=True)
        assert status == 503 and body["checks"]["directory"].startswith("error: ")
        assert body["checks"]["database"] == "ok" and body["checks"]["key_store"] == "ok"
    finally:
        own_slapd.start()
    assert client.get() == (200, {"status": "up"})


def test_health_is_503_naming_the_key_store_while_the_token_is_gone(tmp_path, own_slapd, softhsm):
    """The CA and KRA keys in a SoftHSM2 token: its folder moved out of SoftHSM's token folder (the tests
    run as root: modes are no barrier) and back."""
    import shutil

    from tests.softhsm import key_store_options
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    before = set(softhsm.tokens.iterdir())
    options = key_store_options(softhsm, "health-token", data)
    (token_dir,) = set(softhsm.tokens.iterdir()) - before
    config = data / "autoenroll.toml"
    config.write_text(f'data_dir = "."\nhttp_url = "http://pki.example.com:8080"\n[ldap]\nurl = "{own_slapd.url}"\n')
    cli("autoenroll", "--config", str(config), "init", *options)
    settings = load_settings(config, environ={})
    services = build_services(settings, run_migrations=False)
    try:
        app = create_app(settings, services)
        clock = [1000.0]
        app.extensions["autoenroll.health"].clock = lambda: clock[0]
        agent = x509.load_pem_x509_certificate(settings.path("agent.pem").read_bytes()).public_bytes(Encoding.DER)

        def health():
            clock[0] += 60
            answer = app.test_client().get("/health", environ_base=peer_environ(agent))
            return answer.status_code, answer.get_json()

        status, body = health()
        assert (status, body["checks"]["key_store"]) == (200, "ok")
        shutil.move(token_dir, tmp_path / "token-away")
        try:
            status, body = health()
        finally:
            shutil.move(tmp_path / "token-away", token_dir)
        assert (status, body["status"], body["failing"]) == (503, "down", ["key_store"])
        assert body["checks"]["key_store"].startswith("error: ") and "health-token" in body["checks"]["key_store"]
        assert health()[0] == 200
    finally:
        services.close()
