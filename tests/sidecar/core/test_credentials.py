from sidecar.core.credentials import CredentialHolder, Credentials


def _credentials(service: str = "item") -> Credentials:
    return Credentials(b"CERT", b"-----BEGIN PRIVATE KEY-----secret", b"ROOTS", "meshlet.local", service, 1.0, 2.0)


def test_install_moves_the_generation() -> None:
    holder = CredentialHolder()
    assert (holder.current, holder.generation) == (None, 0)
    first = _credentials()
    holder.install(first)
    assert (holder.current, holder.generation) == (first, 1)
    holder.install(_credentials("user"))
    assert holder.generation == 2
    assert holder.current is not None and holder.current.service == "user"


def test_repr_never_shows_the_key() -> None:
    assert "secret" not in repr(_credentials())
    assert "item" in repr(_credentials())
