"""API keys: ``ehr_<key id>_<secret>`` bearer tokens, stored as salted SHA-256 hashes.

The secret is 32 random bytes, so a salted hash is enough (a slow KDF protects guessable
passwords, not random keys) and keeps verification cheap on every request. Each key belongs to a
tenant; patients belong to the tenant that posted them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

import sqlalchemy as sa

from ehrflow.config import Settings
from ehrflow.serve.jobs import make_engine
from ehrflow.serve.settings import serve_settings

_META = sa.MetaData()
API_KEYS = sa.Table(
    "api_keys",
    _META,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("salt", sa.String(64), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
)
PREFIX = "ehr"


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


class KeyStore:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        _META.create_all(self.engine)

    def create(self, tenant: str) -> str:
        """A new key for ``tenant``; the returned token is shown once and never stored."""
        if not tenant or len(tenant) > 128:
            raise ValueError("tenant: must be 1-128 characters")
        key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
        with self.engine.begin() as conn:
            conn.execute(
                API_KEYS.insert().values(
                    key_id=key_id,
                    tenant=tenant,
                    salt=salt,
                    secret_hash=_hash(salt, secret),
                    created_at=dt.datetime.now(dt.UTC),
                    revoked=False,
                )
            )
        return f"{PREFIX}_{key_id}_{secret}"

    def tenant_of(self, token: str) -> str | None:
        """The tenant of a valid, unrevoked token, else ``None``."""
        prefix, sep, rest = token.partition("_")
        key_id, sep2, secret = rest.partition("_")
        if prefix != PREFIX or not sep or not sep2 or not key_id or not secret:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(API_KEYS.c.tenant, API_KEYS.c.salt, API_KEYS.c.secret_hash, API_KEYS.c.revoked).where(
                    API_KEYS.c.key_id == key_id
                )
            ).one_or_none()
        if row is None or row.revoked:
            return None
        return row.tenant if hmac.compare_digest(row.secret_hash, _hash(row.salt, secret)) else None

    def revoke(self, token_or_key_id: str) -> bool:
        parts = token_or_key_id.split("_")
        key_id = parts[1] if len(parts) >= 3 and parts[0] == PREFIX else token_or_key_id
        with self.engine.begin() as conn:
            return conn.execute(API_KEYS.update().where(API_KEYS.c.key_id == key_id).values(revoked=True)).rowcount == 1


def create_api_key(settings: Settings, tenant: str) -> str:
    """What ``ehrflow serve create-key TENANT`` calls: a new bearer token for ``tenant``."""
    serve = serve_settings(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    return KeyStore(serve.resolved_jobs_url(settings)).create(tenant)
