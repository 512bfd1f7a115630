"""The tests' SoftHSM2 (bench/softhsm.py): what pkcs11-tool shows, and the key-store variants of the
fixtures ("files", "softhsm")."""

from __future__ import annotations

from pathlib import Path

from bench.softhsm import MODULE, SoftHsm, init_options

__all__ = ["MODULE", "SoftHsm", "access_of", "key_store_options", "key_store_params", "private_key_blocks",
           "usage_of"]


def private_key_blocks(listing: str) -> dict[str, str]:
    """The private key objects of a `pkcs11-tool --list-objects` listing, by label."""
    blocks, current = {}, None
    for line in listing.splitlines():
        if line.startswith("Private Key Object"):
            current = [line]
        elif current is not None and line.startswith("  "):
            current.append(line)
            if line.strip().startswith("label:"):
                blocks[line.split(":", 1)[1].strip()] = current
        else:
            current = None
    return {label: "\n".join(lines) for label, lines in blocks.items()}


def access_of(block: str) -> set[str]:
    """The `Access:` flags of one key object of the listing (sensitive, never extractable, local...)."""
    line = next(line for line in block.splitlines() if line.strip().startswith("Access:"))
    return {flag.strip() for flag in line.split(":", 1)[1].split(",")}


def usage_of(block: str) -> set[str]:
    line = next(line for line in block.splitlines() if line.strip().startswith("Usage:"))
    return {flag.strip() for flag in line.split(":", 1)[1].split(",")}


def key_store_options(hsm: SoftHsm, label: str, data: Path, *file_keys: str) -> list[str]:
    """`autoenroll init` options that generate the keys in a new token `label` (except `file_keys`)."""
    return init_options(hsm, label, data, *file_keys)


def key_store_params(request, data, label: str) -> tuple[str, ...]:
    """init's options for a fixture parametrised with "files" (the default) or "softhsm" (every key in a
    token of its own: tests/softhsm.py)."""
    if getattr(request, "param", "files") != "softhsm":
        return ()
    return tuple(key_store_options(request.getfixturevalue("softhsm"), label, data))
