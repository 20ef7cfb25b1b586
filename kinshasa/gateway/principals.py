"""Who is calling: Bearer keys, stored only as hashes, mapped to agent and operator principals."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kinshasa.schemas.operations import OperationSpec

PrincipalKind = Literal["agent", "operator"]
KEY_PREFIX = "ksk_"


class CredentialsError(ValueError):
    """The credentials file is missing, unreadable or malformed."""


def hash_key(key: str) -> str:
    """sha256 of the key: keys are 256-bit random tokens, so a fast hash suffices (nothing to guess)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


ENTRY_POINT_MAX = 256


def read_scope(service: str) -> str:
    """The scope that lets an agent read a service's entities: `<service>:read`."""
    return f"{service}:read"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    `scopes` are globs an agent's requests are matched against: operation names for writes
    (`orders.*` calls every operation of an `orders` service) and `<service>:read` for reads of that
    service's entities (`orders:read`; `*:read` reads every service). `*` matches both, so it grants
    everything. A write scope does not grant reads: `orders.*` cannot match `orders:read`. Operators
    read and act on everything whatever their scopes.

    `entry_points` are the entry points the agent may start runs at; None (the default) is any.
    Entry points select a policy layer, so they are the operator's to hand out.
    """

    id: str
    kind: PrincipalKind
    scopes: frozenset[str] = field(default_factory=lambda: frozenset({"*"}))
    entry_points: frozenset[str] | None = None

    @property
    def is_operator(self) -> bool:
        return self.kind == "operator"

    @property
    def is_agent(self) -> bool:
        return self.kind == "agent"

    def may_call(self, spec: OperationSpec) -> bool:
        names = (spec.command_type, spec.graphql_name)
        return any(fnmatch.fnmatchcase(name, scope) for scope in self.scopes for name in names)

    def may_read(self, service: str) -> bool:
        """May this principal read the entities of `service`? Operators always may."""
        if self.is_operator:
            return True
        wanted = read_scope(service)
        return any(fnmatch.fnmatchcase(wanted, scope) for scope in self.scopes)

    def may_start_at(self, entry_point: str) -> bool:
        return self.entry_points is None or entry_point in self.entry_points


class PrincipalRegistry:
    """Key hash -> principal. Lookup is one sha256 and one dict probe: no I/O on the hot path."""

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._by_hash: dict[str, Principal] = {}
        for key_hash, principal in entries:
            self.add(key_hash, principal)

    def add(self, key_hash: str, principal: Principal) -> None:
        if key_hash in self._by_hash:
            raise CredentialsError(f"two principals share one key ({principal.id}): give each its own key")
        self._by_hash[key_hash] = principal

    def authenticate(self, key: str) -> Principal | None:
        return self._by_hash.get(hash_key(key))

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def principals(self) -> list[Principal]:
        return list(self._by_hash.values())

    @classmethod
    def from_document(cls, document: Mapping[str, Any], source: str = "credentials") -> PrincipalRegistry:
        """Read `{"principals": [{id, kind, scopes, entryPoints?, key | key_sha256}]}`; plain keys are hashed
        at once. `entryPoints` (agents only) lists where the agent may start runs; absent means anywhere."""
        rows = document.get("principals")
        if not isinstance(rows, list):
            raise CredentialsError(f"{source}: expected an object with a 'principals' list")
        registry = cls()
        for index, row in enumerate(rows):
            where = f"{source}: principals[{index}]"
            if not isinstance(row, Mapping):
                raise CredentialsError(f"{where} must be an object")
            pid, kind = row.get("id"), row.get("kind")
            if not isinstance(pid, str) or not pid:
                raise CredentialsError(f"{where}: 'id' must be a non-empty string")
            if kind not in ("agent", "operator"):
                raise CredentialsError(f"{where}: 'kind' must be 'agent' or 'operator', got {kind!r}")
            scopes = row.get("scopes", ["*"])
            if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                raise CredentialsError(f"{where}: 'scopes' must be a list of strings such as ['orders.*']")
            entry_points = row.get("entryPoints")
            if entry_points is not None and (
                kind != "agent"
                or not isinstance(entry_points, list)
                or not all(isinstance(e, str) and 0 < len(e.strip()) <= ENTRY_POINT_MAX for e in entry_points)
            ):
                raise CredentialsError(
                    f"{where}: 'entryPoints' must be a list of entry point names (1-{ENTRY_POINT_MAX} "
                    "characters) an agent may start runs at, such as ['support-bot']; omit it to allow any"
                )
            if isinstance(row.get("key_sha256"), str):
                key_hash = row["key_sha256"].lower()
            elif isinstance(row.get("key"), str) and row["key"]:
                key_hash = hash_key(row["key"])
            else:
                raise CredentialsError(
                    f"{where}: give 'key' or 'key_sha256' (`kinshasa gateway new-key` prints a fresh pair)"
                )
            registry.add(
                key_hash,
                Principal(
                    id=pid,
                    kind=kind,
                    scopes=frozenset(scopes),
                    entry_points=None if entry_points is None else frozenset(e.strip() for e in entry_points),
                ),
            )
        return registry

    @classmethod
    def from_file(cls, path: Path) -> PrincipalRegistry:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CredentialsError(f"credentials file {path} does not exist") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise CredentialsError(f"credentials file {path} is not readable JSON: {exc}") from exc
        return cls.from_document(document, str(path))


def write_dev_credentials(
    path: Path, agents: Iterable[str] = ("agent",), operators: Iterable[str] = ("operator",)
) -> dict[str, Any]:
    """Generate one key per principal into `path` (mode 0600) and return the document written.

    Dev mode only: the plain keys are in the file so a developer can copy them into a client. The dev
    agent's scope `*` lets it call every operation and read every service (`<service>:read`), at any
    entry point.
    """
    document = {
        "principals": [
            *({"id": a, "kind": "agent", "scopes": ["*"], "key": new_key()} for a in agents),
            *({"id": o, "kind": "operator", "scopes": ["*"], "key": new_key()} for o in operators),
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create with 0600 from the start (a chmod after writing would leave a window where others can
    # read), and write beside the target then rename, so a reader never sees a half-written file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
    os.chmod(partial, 0o600)
    os.replace(partial, path)
    return document


def load_registry(credentials_file: Path | None, data_dir: Path, dev_mode: bool) -> PrincipalRegistry:
    """The configured keys, or in dev mode a generated `<data_dir>/credentials.json` when none exist."""
    path = credentials_file or data_dir / "credentials.json"
    if path.exists():
        return PrincipalRegistry.from_file(path)
    if credentials_file is not None or not dev_mode:
        raise CredentialsError(
            f"no credentials at {path}: set KINSHASA_GATEWAY_CREDENTIALS_FILE to a file of principals "
            "or start the gateway with KINSHASA_GATEWAY_DEV_MODE=true to generate keys"
        )
    return PrincipalRegistry.from_document(write_dev_credentials(path), str(path))
