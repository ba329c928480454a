"""The one place a raw user id becomes the pseudonymous key used everywhere else.

Redis keys, Feast entity keys, consent records, logs and the audit trail carry
only `user_key(user_id)`: an HMAC-SHA256 of the id under a secret from the
environment (`RANKGATE_USER_KEY_SECRET`). Without the secret the key cannot be
linked back to the id, and rotating the secret unlinks every stored record.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from rankgate.core.settings import get_settings

USER_KEY_HEX_CHARS = 32  # 128 bits: collision-free for any realistic population


def user_key(user_id: str, secret: str | None = None) -> str:
    """Pseudonymous, stable key of `user_id` (hex)."""
    key = (secret if secret is not None else get_settings().user_key_secret).encode()
    digest = hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:USER_KEY_HEX_CHARS]


def user_keys(user_ids: Iterable[str], secret: str | None = None) -> list[str]:
    """`user_key` of each id, for bulk paths (imports, setup): the secret is read once
    and each id goes through OpenSSL's one-shot HMAC (about 0.5 million ids/s)."""
    key = (secret if secret is not None else get_settings().user_key_secret).encode()
    digest = hmac.digest
    return [
        digest(key, uid.encode("utf-8"), "sha256").hex()[:USER_KEY_HEX_CHARS] for uid in user_ids
    ]
