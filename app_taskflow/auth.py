"""Authentication of the REST API and the dashboard, and the cross-site check of actions.

The container's ``auth`` provider returns one FastAPI dependency, chosen by the ``auth``
section of the configuration: ``no_auth`` (kind ``none``), ``BasicAuth`` (``basic``) or
``BearerAuth`` (``bearer``). An app replaces it with a dependency of its own::

    container.auth.override(providers.Object(require_admin))

``taskflow.install(app)`` adds that dependency to every route of the REST API and the
dashboard, and adds ``check_same_origin`` to every route that changes a task.
"""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Header, HTTPException, Request, status
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)

REQUEST_HEADER = "X-Taskflow-Request"
"""The header every action request must carry; the dashboard sends it with value ``1``."""

REALM = "app-taskflow"
"""The realm the browser shows in its username and password prompt."""

_basic_scheme = HTTPBasic(realm=REALM, auto_error=False)
_bearer_scheme = HTTPBearer(auto_error=False)


def no_auth() -> None:
    """Accept every request: the dependency of auth kind ``none``."""


class BasicAuth:
    """A dependency that requires HTTP Basic credentials equal to one username and password.

    Browsers ask for them once and send them with every later request of the dashboard,
    its event stream included.
    """

    def __init__(self, username: str, password: str) -> None:
        if not username or not password:
            raise ValueError("BasicAuth needs a non-empty username and password.")
        self._username = username.encode()
        self._password = password.encode()

    def __repr__(self) -> str:
        return f"BasicAuth(username={self._username.decode()!r}, password='***')"

    def __call__(
        self, credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic_scheme)]
    ) -> None:
        """Raise ``HTTPException(401)`` unless the request carries the right credentials."""
        if credentials is not None:
            # Both comparisons always run, so the time taken does not tell which one failed.
            username_matches = secrets.compare_digest(credentials.username.encode(), self._username)
            password_matches = secrets.compare_digest(credentials.password.encode(), self._password)
            if username_matches and password_matches:
                return
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Invalid or missing username and password.",
            headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
        )


class BearerAuth:
    """A dependency that requires ``Authorization: Bearer <token>`` with one token.

    Suits API clients and proxies that add the header. A browser does not add it by itself,
    so a dashboard behind bearer auth needs such a proxy.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("BearerAuth needs a non-empty token.")
        self._token = token.encode()

    def __repr__(self) -> str:
        return "BearerAuth(token='***')"

    def __call__(
        self,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
    ) -> None:
        """Raise ``HTTPException(401)`` unless the request carries the right token."""
        if credentials is not None and secrets.compare_digest(
            credentials.credentials.encode(), self._token
        ):
            return
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Invalid or missing bearer token.",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
        )


def check_same_origin(
    request: Request,
    x_taskflow_request: Annotated[
        str | None,
        Header(
            description=(
                "Required, with any value (the dashboard sends 1): a page of another site "
                "cannot add it, so it proves the request is not cross-site."
            )
        ),
    ] = None,
) -> None:
    """Reject a request that changes tasks unless it comes from the app's own pages.

    A page of another site can make a logged-in browser send a POST with its credentials
    (cross-site request forgery). The request is rejected in three cases:

    - the browser marks it ``Sec-Fetch-Site: cross-site``;
    - its ``Origin`` names another host than ``Host``, or than ``X-Forwarded-Host`` when a
      proxy rewrites ``Host``;
    - it lacks the ``X-Taskflow-Request`` header. A cross-origin page can only add that
      header after a CORS preflight, which the app does not grant.

    Raises:
        HTTPException: 403 with the reason.
    """
    headers = request.headers
    if headers.get("sec-fetch-site") == "cross-site":
        _reject("the browser marked it as sent by another site (Sec-Fetch-Site: cross-site)")

    origin = headers.get("origin")
    if origin is not None:
        origin_host = urlsplit(origin).netloc.lower()
        allowed_hosts = {headers.get("host", "").lower()}
        forwarded = headers.get("x-forwarded-host")
        if forwarded:
            allowed_hosts.update(host.strip().lower() for host in forwarded.split(","))
        if not origin_host or origin_host not in allowed_hosts:
            _reject(f"its Origin {origin!r} does not match the Host of the app")

    if x_taskflow_request is None:
        _reject(f"it lacks the {REQUEST_HEADER} header; send '{REQUEST_HEADER}: 1' with it")


def _reject(reason: str) -> None:
    raise HTTPException(
        status_code=status.HTTP_403_FORBIDDEN,
        detail=f"Request rejected as possibly cross-site: {reason}.",
    )
