"""GitHub's OAuth web flow through authlib: the authorize URL, the code exchange, the user.

Authorization code grant with PKCE (S256); the client secret goes in the token
request body, as GitHub documents. The endpoints come from settings so tests can
run the whole dance against a loopback server that speaks GitHub's protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx2
import msgspec
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

from services.settings import Settings

CALLBACK_PATH = "/auth/github/callback"
_API_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}


@dataclass(frozen=True, slots=True)
class GitHubUser:
    id: int
    login: str


class _UserPayload(msgspec.Struct):
    id: int
    login: str


class GitHubError(Exception):
    """The exchange or the user lookup failed; `reason` is safe to log (never a code or token).

    `refused`: GitHub said no (a bad, used or foreign code); otherwise it was unreachable or odd.
    """

    def __init__(self, reason: str, *, refused: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refused = refused


class GitHubOAuth:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.redirect_uri = f"{settings.public_url}{CALLBACK_PATH}"

    @property
    def configured(self) -> bool:
        return bool(self._settings.github_client_id and self._settings.github_client_secret)

    def _client(self) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self._settings.github_client_id,
            client_secret=self._settings.github_client_secret,
            token_endpoint_auth_method="client_secret_post",
            code_challenge_method="S256",
            redirect_uri=self.redirect_uri,
            timeout=10.0,
            headers={"User-Agent": "mac-provider"},
        )

    def authorize_url(self, state: str, code_verifier: str) -> str:
        client = self._client()
        # Public profile only: no scope asks for nothing beyond the user's id and login.
        url, _ = client.create_authorization_url(
            self._settings.github_authorize_url, state=state, code_verifier=code_verifier
        )
        return str(url)

    async def user_for_code(self, code: str, code_verifier: str) -> GitHubUser:
        """Exchange the code (with the verifier) for a token, then read who signed in."""
        async with self._client() as client:
            try:
                await client.fetch_token(self._settings.github_token_url, code=code, code_verifier=code_verifier)
                response = await client.get(f"{self._settings.github_api_url}/user", headers=_API_HEADERS)
            except OAuthError as exc:
                raise GitHubError(f"token exchange refused: {exc.error}", refused=True) from None
            except (httpx2.HTTPError, ValueError) as exc:
                reason = f"GitHub unreachable or answered badly: {type(exc).__name__}"
                raise GitHubError(reason, refused=False) from None
        if response.status_code != 200:
            raise GitHubError(f"GET /user answered {response.status_code}", refused=False)
        try:
            user = msgspec.json.decode(response.content, type=_UserPayload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise GitHubError("GET /user answered without an id and login", refused=False) from None
        return GitHubUser(id=user.id, login=user.login)
