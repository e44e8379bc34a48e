"""The sign-in and consent pages: plain HTML, every value escaped, no script; the server adds the headers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from html import escape

from mcpguard.oauth.users import Account

__all__ = ["PAGE_HEADERS", "ConsentView", "render_consent", "render_error", "render_sign_in"]

# No script, no framing, no referrer leaking the request's query, nothing cached.
PAGE_HEADERS = (
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)

_SCOPE_TEXT = {
    "mcp:read": "read data and call read-only tools",
    "mcp:write": "call tools that change data",
    "mcp:admin": "call destructive tools and administer",
    "mcp:audit": "read the audit trail",
}
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;color:#222}"
    "h1{font-size:1.3rem}.warn{background:#fff4e5;border:1px solid #f0b060;padding:.6rem;border-radius:4px}"
    ".err{color:#a00}label{display:block;margin:.8rem 0 .2rem}input,select{width:100%;padding:.4rem}"
    "button{margin:1rem .5rem 0 0;padding:.5rem 1.2rem}code{word-break:break-all}"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentView:
    """What the pages show about the request, and the hidden fields that carry it."""

    client_name: str
    client_id: str
    redirect_host: str
    loopback: bool
    scopes: tuple[str, ...]
    params: Mapping[str, str]
    csrf: str


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width"><style>{_STYLE}</style></head><body>{body}</body></html>'
    )


def _hidden(view: ConsentView, **extra: str) -> str:
    fields = {**view.params, "csrf": view.csrf, **extra}
    return "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items())


def _summary(view: ConsentView) -> str:
    warning = ""
    if view.loopback:
        warning = (
            '<p class="warn">This client receives the answer on this computer only '
            f"(<code>{escape(view.redirect_host)}</code>). Approve only if you started it yourself.</p>"
        )
    return (
        f"<p><strong>{escape(view.client_name)}</strong> (<code>{escape(view.client_id)}</code>) "
        f"asks for access. The answer goes to <code>{escape(view.redirect_host)}</code>.</p>{warning}"
    )


def _scope_list(scopes: tuple[str, ...]) -> str:
    items = "".join(f"<li><code>{escape(s)}</code>: {escape(_SCOPE_TEXT.get(s, 'access'))}</li>" for s in scopes)
    return f"<ul>{items}</ul>"


def render_sign_in(view: ConsentView, *, error: str | None = None) -> str:
    """Step one: who is approving."""
    problem = f'<p class="err" role="alert">{escape(error)}</p>' if error else ""
    return _page(
        "Sign in",
        f"<h1>Sign in to authorize {escape(view.client_name)}</h1>{_summary(view)}"
        f"<p>It asks for:</p>{_scope_list(view.scopes)}{problem}"
        f'<form method="post" action="/authorize">{_hidden(view, step="sign_in")}'
        '<label for="username">Email</label>'
        '<input id="username" name="username" type="email" autocomplete="username" required>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password" required>'
        '<button type="submit" id="sign-in">Sign in</button></form>',
    )


def render_consent(view: ConsentView, *, account: Account, granted: tuple[str, ...], ticket: str) -> str:
    """Step two: the decision, with the tenant the grant will be bound to."""
    if len(account.tenants) == 1:
        only = escape(account.tenants[0])
        tenant = f'<p>Tenant: <strong>{only}</strong></p><input type="hidden" name="tenant" value="{only}">'
    else:
        options = "".join(f'<option value="{escape(t)}">{escape(t)}</option>' for t in account.tenants)
        tenant = (
            '<label for="tenant">Tenant this access is bound to</label>'
            f'<select id="tenant" name="tenant">{options}</select>'
        )
    withheld = [s for s in view.scopes if s not in granted]
    note = ""
    if withheld:
        note = f'<p class="warn">Your account cannot grant: {escape(", ".join(withheld))}.</p>'
    approve = '<button type="submit" name="decision" value="approve" id="approve">Approve</button>' if granted else ""
    return _page(
        "Authorize",
        f"<h1>Authorize {escape(view.client_name)}?</h1><p>Signed in as {escape(account.name)}.</p>{_summary(view)}"
        f"<p>It will be able to:</p>{_scope_list(granted)}{note}"
        f'<form method="post" action="/authorize">{_hidden(view, step="decide", ticket=ticket)}{tenant}'
        f'{approve}<button type="submit" name="decision" value="deny" id="deny">Deny</button></form>',
    )


def render_error(message: str, *, back: str | None = None) -> str:
    """A page that never redirects by itself: with ``back``, a link the person may follow to the application."""
    link = f'<p><a id="back" href="{escape(back)}">Return to the application</a></p>' if back else ""
    return _page(
        "Cannot authorize", f'<h1>Cannot authorize</h1><p class="err" role="alert">{escape(message)}</p>{link}'
    )
