"""Who may do what: named bearer tokens, their scopes, and the principal a request acts as.

Each operator, load balancer adapter and application gets a token of its own, with a
name (recorded as "who" in the history and the audit log) and a scope. Scopes are
ordered, each including the ones before it:

- `read`: every read route (decision, weights, history, plans, OFREP);
- `lb`: for load balancer adapters: reads, and the status reports they send to
  `POST /v1/lbs/{name}` (what they applied, when, and their errors; see `lbreports`);
- `operate`: also drain, undrain, fail over, override, switch features and remove
  intents;
- `admin`: also freeze and unfreeze automation, and the debug routes.

The legacy `auth.admin_token` and `auth.read_token` are tokens named `admin` and `read`
with those scopes.

Matching is constant time over every token: the presented secret's SHA-256 is compared
with each token's with `hmac.compare_digest`, all of them, whichever matches, so neither
the position nor a prefix of a secret shows in the time an answer takes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass, field


class Scope(enum.StrEnum):
    READ = "read"
    LB = "lb"
    OPERATE = "operate"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Scope) -> bool:
        """Whether a token of this scope may do what needs `needed`."""
        return self.rank >= needed.rank


_RANK = {Scope.READ: 0, Scope.LB: 1, Scope.OPERATE: 2, Scope.ADMIN: 3}
SCOPES = tuple(s.value for s in Scope)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: the name of the token it presented, and that token's scope."""

    name: str
    scope: Scope


# Reads when no read token is configured (or on the always-open routes).
ANONYMOUS = Principal("anonymous", Scope.READ)


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    scope: Scope
    secret: str = field(repr=False)
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", _digest(self.secret.encode("utf-8", "surrogateescape")))


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


@dataclass(frozen=True, slots=True)
class Tokens:
    """Every token an agent accepts.

    `admin` and `read` are the legacy single tokens (named `admin` and `read`); `named`
    are the `auth.tokens` entries. `open_reads`: None means reads are open unless a token
    of scope `read` is configured (how `auth.read_token` always worked).
    """

    admin: str | None = None
    read: str | None = None
    named: tuple[Token, ...] = ()
    open_reads: bool | None = None
    entries: tuple[Token, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        legacy = []
        if self.admin is not None:
            legacy.append(Token("admin", Scope.ADMIN, self.admin))
        if self.read is not None:
            legacy.append(Token("read", Scope.READ, self.read))
        object.__setattr__(self, "entries", (*legacy, *self.named))

    @property
    def reads_open(self) -> bool:
        if self.open_reads is not None:
            return self.open_reads
        return not any(t.scope is Scope.READ for t in self.entries)

    def can_grant(self, needed: Scope) -> bool:
        """Whether any configured token has a scope that allows `needed`."""
        return any(t.scope.allows(needed) for t in self.entries)

    def match(self, presented: bytes) -> Token | None:
        """The token whose secret is `presented`, compared in constant time with every one."""
        digest = _digest(presented)
        found: Token | None = None
        for token in self.entries:
            if hmac.compare_digest(digest, token.digest) and found is None:
                found = token
        return found

    def names(self) -> list[str]:
        return [t.name for t in self.entries]
